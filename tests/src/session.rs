//! InfraBox's RSA signing key and the JWTs it issues: user session tokens
//! (`{"user":{"id"},"type":"user"}`) and global tokens
//! (`{"id","type":"global"}`), RS256, without `exp`/`iat` — as InfraBox does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use uuid::Uuid;

/// An RSA-2048 key pair in PEM files (made with the `openssl` CLI).
#[derive(Clone)]
pub struct SigningKey {
    private_pem: String,
    public_pem: String,
    private_path: PathBuf,
    public_path: PathBuf,
    encoding: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("public_path", &self.public_path).finish_non_exhaustive()
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).output().context("running openssl (is it installed?)")?;
    if !out.status.success() {
        bail!("openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn key_registry() -> &'static Mutex<HashMap<String, String>> {
    static KEYS: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    KEYS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The private PEM of a `SigningKey` generated or loaded in this process
/// whose public PEM is `public_pem` (lets the fake InfraBox issue tokens).
pub fn private_pem_for(public_pem: &str) -> Option<String> {
    key_registry().lock().unwrap_or_else(|e| e.into_inner()).get(public_pem.trim()).cloned()
}

impl SigningKey {
    /// Generates `dir/id_rsa` (PKCS#8 PEM) and `dir/id_rsa.pub` (SPKI PEM).
    pub fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let private_path = dir.join("id_rsa");
        let public_path = dir.join("id_rsa.pub");
        let private = private_path.to_str().context("non-UTF-8 key path")?;
        let public = public_path.to_str().context("non-UTF-8 key path")?;
        openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", private])?;
        openssl(&["pkey", "-in", private, "-pubout", "-out", public])?;
        Self::load(&private_path, &public_path)
    }

    /// Loads an existing PEM key pair.
    pub fn load(private_path: &Path, public_path: &Path) -> Result<Self> {
        let private_pem = std::fs::read_to_string(private_path)
            .with_context(|| format!("reading {}", private_path.display()))?;
        let public_pem = std::fs::read_to_string(public_path)
            .with_context(|| format!("reading {}", public_path.display()))?;
        let encoding = EncodingKey::from_rsa_pem(private_pem.as_bytes()).context("parsing the RSA private key")?;
        key_registry()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(public_pem.trim().to_string(), private_pem.clone());
        Ok(Self {
            private_pem,
            public_pem,
            private_path: private_path.to_path_buf(),
            public_path: public_path.to_path_buf(),
            encoding,
        })
    }

    /// One key pair for the whole test process, in `target/e2e/<pid>/infrabox-rsa`.
    pub fn shared() -> &'static SigningKey {
        static SHARED: OnceLock<SigningKey> = OnceLock::new();
        SHARED.get_or_init(|| {
            SigningKey::generate(&crate::scratch::process_dir().join("infrabox-rsa"))
                .expect("generating the shared InfraBox RSA key")
        })
    }

    /// The public key, SPKI PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// The private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn private_pem(&self) -> &str {
        &self.private_pem
    }

    /// Path of the public key file (for `INFRABOX_PUBLIC_KEY_PATH`-style configuration).
    pub fn public_path(&self) -> &Path {
        &self.public_path
    }

    /// Path of the private key file.
    pub fn private_path(&self) -> &Path {
        &self.private_path
    }

    /// RS256 JWT over arbitrary claims.
    pub fn sign_claims(&self, claims: &Value) -> Result<String> {
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &self.encoding).context("signing JWT")
    }

    /// A user session JWT, exactly `{"user":{"id":"<uuid>"},"type":"user"}`.
    pub fn sign_user_session(&self, user_id: Uuid) -> String {
        self.sign_claims(&json!({"user": {"id": user_id.to_string()}, "type": "user"}))
            .expect("signing with a loaded RSA key cannot fail")
    }

    /// A global token JWT, exactly `{"id":"<global_token.id>","type":"global"}`.
    pub fn sign_global_token(&self, global_token_id: Uuid) -> String {
        self.sign_claims(&json!({"id": global_token_id.to_string(), "type": "global"}))
            .expect("signing with a loaded RSA key cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, DecodingKey, Validation};

    fn validation() -> Validation {
        let mut v = Validation::new(Algorithm::RS256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        v
    }

    #[test]
    fn user_session_and_global_tokens_verify_with_the_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(dir.path()).unwrap();
        assert!(key.public_pem().contains("BEGIN PUBLIC KEY"));
        assert!(key.private_pem().contains("PRIVATE KEY"));
        let decoding = DecodingKey::from_rsa_pem(key.public_pem().as_bytes()).unwrap();

        let user = Uuid::new_v4();
        let jwt = key.sign_user_session(user);
        let data = decode::<Value>(&jwt, &decoding, &validation()).unwrap();
        assert_eq!(data.claims, json!({"user": {"id": user.to_string()}, "type": "user"}));
        assert_eq!(data.header.alg, Algorithm::RS256);

        let gt = Uuid::new_v4();
        let jwt = key.sign_global_token(gt);
        let data = decode::<Value>(&jwt, &decoding, &validation()).unwrap();
        assert_eq!(data.claims, json!({"id": gt.to_string(), "type": "global"}));

        // A different key must not verify it.
        let other = SigningKey::generate(&dir.path().join("other")).unwrap();
        let other_dec = DecodingKey::from_rsa_pem(other.public_pem().as_bytes()).unwrap();
        assert!(decode::<Value>(&jwt, &other_dec, &validation()).is_err());
    }
}
