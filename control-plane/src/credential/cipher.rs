//! `CredentialCipher`: AES-256-GCM for upstream credentials at rest.
//!
//! Stored form: `0x01 | key id (4 bytes) | nonce (12 bytes) | ciphertext+tag`.
//! The key id is the start of SHA-256 over the key, so a key rotation
//! (`MCP_CREDENTIAL_KEY` new, `MCP_CREDENTIAL_KEY_PREVIOUS` old) keeps old
//! rows readable. The associated data binds a ciphertext to its user and
//! kind, so rows cannot be swapped between users or from read to write.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::CredentialKind;

const FORMAT: u8 = 1;
const HEADER: usize = 1 + 4 + 12;

/// Why a credential could not be encrypted or decrypted. Never carries
/// the plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CipherError(pub &'static str);

impl std::fmt::Display for CipherError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for CipherError {}

struct Key {
    id: [u8; 4],
    aead: Aes256Gcm,
}

impl Key {
    fn new(bytes: &[u8; 32]) -> Self {
        let digest = Sha256::digest(bytes);
        let mut id = [0u8; 4];
        id.copy_from_slice(&digest[..4]);
        Self { id, aead: Aes256Gcm::new(bytes.into()) }
    }
}

/// Encrypts with the current key; decrypts with the current or previous one.
pub struct CredentialCipher {
    current: Key,
    previous: Option<Key>,
}

impl std::fmt::Debug for CredentialCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCipher").finish_non_exhaustive()
    }
}

/// Parses a 32-byte key written as 64 hex characters.
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let mut key = [0u8; 32];
    hex::decode_to_slice(text, &mut key).ok()?;
    Some(key)
}

fn aad(user: Uuid, kind: CredentialKind) -> Vec<u8> {
    format!("ib_mcp_credential:v1:{user}:{}", kind.as_str()).into_bytes()
}

impl CredentialCipher {
    pub fn new(current: &[u8; 32], previous: Option<&[u8; 32]>) -> Self {
        Self { current: Key::new(current), previous: previous.map(Key::new) }
    }

    pub fn encrypt(&self, user: Uuid, kind: CredentialKind, plaintext: &str) -> Result<Vec<u8>, CipherError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|_| CipherError("the OS random generator failed"))?;
        let aad = aad(user, kind);
        let sealed = self
            .current
            .aead
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext.as_bytes(), aad: &aad })
            .map_err(|_| CipherError("encryption failed"))?;
        let mut out = Vec::with_capacity(HEADER + sealed.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.current.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn decrypt(&self, user: Uuid, kind: CredentialKind, stored: &[u8]) -> Result<String, CipherError> {
        if stored.len() <= HEADER || stored.first() != Some(&FORMAT) {
            return Err(CipherError("not a stored credential of a known format"));
        }
        let (id, rest) = stored[1..].split_at(4);
        let (nonce, sealed) = rest.split_at(12);
        let key = [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == id)
            .ok_or(CipherError("the credential was encrypted with a key that is not configured"))?;
        let aad = aad(user, kind);
        let plain = key
            .aead
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: &aad })
            .map_err(|_| CipherError("the credential does not decrypt (wrong key, user or kind)"))?;
        String::from_utf8(plain).map_err(|_| CipherError("the credential is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: Uuid = Uuid::from_u128(0x1234);

    #[test]
    fn round_trips_and_binds_user_and_kind() {
        let c = CredentialCipher::new(&[7; 32], None);
        let sealed = c.encrypt(U, CredentialKind::Read, "eyJ-secret").unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"eyJ-secret"));
        assert_eq!(c.decrypt(U, CredentialKind::Read, &sealed).unwrap(), "eyJ-secret");
        assert!(c.decrypt(U, CredentialKind::Write, &sealed).is_err());
        assert!(c.decrypt(Uuid::from_u128(1), CredentialKind::Read, &sealed).is_err());
        // Nonces differ per encryption.
        assert_ne!(sealed, c.encrypt(U, CredentialKind::Read, "eyJ-secret").unwrap());
    }

    #[test]
    fn rotation_keeps_old_rows_readable() {
        let old = CredentialCipher::new(&[1; 32], None);
        let sealed = old.encrypt(U, CredentialKind::Write, "w").unwrap();
        let rotated = CredentialCipher::new(&[2; 32], Some(&[1; 32]));
        assert_eq!(rotated.decrypt(U, CredentialKind::Write, &sealed).unwrap(), "w");
        let unrelated = CredentialCipher::new(&[3; 32], None);
        assert!(unrelated.decrypt(U, CredentialKind::Write, &sealed).unwrap_err().0.contains("not configured"));
    }

    #[test]
    fn malformed_input_is_an_error() {
        let c = CredentialCipher::new(&[7; 32], None);
        for bad in [&b""[..], &[1u8; 17][..], &[9u8; 40][..]] {
            assert!(c.decrypt(U, CredentialKind::Read, bad).is_err());
        }
        let mut sealed = c.encrypt(U, CredentialKind::Read, "x").unwrap();
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(c.decrypt(U, CredentialKind::Read, &sealed).is_err());
        assert_eq!(parse_key(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_key("abc"), None);
    }
}
