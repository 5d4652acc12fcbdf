//! The `ib_mcp_` token format (DESIGN §2): `ib_mcp_` + 48 lowercase hex
//! characters; the token id is the first 16 hex characters after the prefix
//! and the stored hash is the lowercase hex SHA-256 of the whole string.
//!
//! Parsing never allocates and never panics: any other shape is a
//! [`TokenFormatError`], which the pipeline turns into 401 before lookup.

use sha2::{Digest, Sha256};

/// Prefix every MCP token starts with.
pub const PREFIX: &str = "ib_mcp_";
/// Number of hex characters after the prefix (24 random bytes).
pub const SECRET_HEX_LEN: usize = 48;
/// Number of hex characters of the token id.
pub const TOKEN_ID_LEN: usize = 16;
/// Total length of a well-formed token.
pub const TOKEN_LEN: usize = PREFIX.len() + SECRET_HEX_LEN;

/// SHA-256 of the whole token string.
pub type TokenHash = [u8; 32];

/// Why a credential is not a well-formed MCP token. The text never contains
/// the credential itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenFormatError(pub &'static str);

impl std::fmt::Display for TokenFormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for TokenFormatError {}

/// A string that has the exact shape of an MCP token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Token<'a> {
    raw: &'a str,
}

impl std::fmt::Debug for Token<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret part.
        write!(f, "Token({}…)", self.token_id())
    }
}

impl<'a> Token<'a> {
    /// Checks the exact shape of `raw` (prefix, length, lowercase hex).
    pub fn parse(raw: &'a str) -> Result<Self, TokenFormatError> {
        let Some(secret) = raw.strip_prefix(PREFIX) else {
            return Err(TokenFormatError("token does not start with ib_mcp_"));
        };
        if secret.len() != SECRET_HEX_LEN {
            return Err(TokenFormatError("token has the wrong length"));
        }
        if !secret.bytes().all(is_lower_hex) {
            return Err(TokenFormatError("token is not lowercase hex"));
        }
        Ok(Self { raw })
    }

    /// The public token id: the first 16 hex characters after the prefix.
    pub fn token_id(&self) -> &'a str {
        self.raw
            .get(PREFIX.len()..PREFIX.len() + TOKEN_ID_LEN)
            .unwrap_or_default()
    }

    /// SHA-256 of the whole token string.
    pub fn hash(&self) -> TokenHash {
        hash(self.raw)
    }

    /// The whole token (the secret). Callers must not log it.
    pub fn expose_secret(&self) -> &'a str {
        self.raw
    }
}

/// SHA-256 of a token string.
pub fn hash(raw: &str) -> TokenHash {
    Sha256::digest(raw.as_bytes()).into()
}

/// Lowercase hex SHA-256 of a token string, as stored in `mcp_token.token_hash`.
pub fn hash_hex(raw: &str) -> String {
    hex::encode(hash(raw))
}

/// Builds a token from 24 bytes of randomness (the caller supplies them from
/// the OS CSPRNG).
pub fn mint(random: &[u8; 24]) -> String {
    let mut s = String::with_capacity(TOKEN_LEN);
    s.push_str(PREFIX);
    s.push_str(&hex::encode(random));
    s
}

/// Whether `s` is a well-formed token id (16 lowercase hex characters).
pub fn is_token_id(s: &str) -> bool {
    s.len() == TOKEN_ID_LEN && s.bytes().all(is_lower_hex)
}

/// Parses a lowercase 64-hex SHA-256.
pub fn parse_hash_hex(s: &str) -> Option<TokenHash> {
    parse_hash_hex_bytes(s.as_bytes())
}

/// Value of each byte as a lowercase hex digit; `0xff` for any other byte.
// Evaluated at compile time: an index out of range fails the build, never a request.
#[allow(clippy::indexing_slicing)]
const NIBBLE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Parses a lowercase 64-hex SHA-256 given as bytes: one branch-free pass
/// that validates and decodes (snapshots carry 100 000 of these).
pub fn parse_hash_hex_bytes(s: &[u8]) -> Option<TokenHash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut invalid = 0u8;
    for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let nib = |i: usize| pair.get(i).map_or(0xff, |b| NIBBLE.get(usize::from(*b)).copied().unwrap_or(0xff));
        let (hi, lo) = (nib(0), nib(1));
        invalid |= hi | lo;
        *byte = (hi << 4) | (lo & 0x0f);
    }
    (invalid & 0xf0 == 0).then_some(out)
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

    const GOOD: &str = "ib_mcp_0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn accepts_the_exact_shape() -> TestResult {
        let t = Token::parse(GOOD)?;
        assert_eq!(t.token_id(), "0123456789abcdef");
        assert_eq!(hex::encode(t.hash()), hash_hex(GOOD));
        assert!(!format!("{t:?}").contains("0123456789abcdef0123"));
        Ok(())
    }

    #[test]
    fn rejects_other_shapes() -> TestResult {
        for bad in [
            "",
            "ib_mcp_",
            &GOOD[..GOOD.len() - 1],
            &format!("{GOOD}0"),
            &format!("{GOOD} "),
            &GOOD.replace('a', "A"),
            &GOOD.replace('a', "g"),
            &GOOD.replace("ib_mcp_", "IB_MCP_"),
            &GOOD.replace("ib_mcp_", "ib-mcp_"),
        ] {
            assert!(Token::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        Ok(())
    }

    #[test]
    fn mint_round_trips() -> TestResult {
        let t = mint(&[0xab; 24]);
        assert_eq!(t.len(), TOKEN_LEN);
        let parsed = Token::parse(&t)?;
        assert_eq!(parsed.token_id(), "abababababababab");
        assert!(is_token_id(parsed.token_id()));
        assert_eq!(parse_hash_hex(&hash_hex(&t)), Some(hash(&t)));
        assert_eq!(parse_hash_hex("ABC"), None);
        Ok(())
    }

    #[test]
    fn hash_hex_decodes_every_digit_and_refuses_anything_else() -> TestResult {
        let all: String = "0123456789abcdef".repeat(4);
        let want: Vec<u8> = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef].repeat(4);
        assert_eq!(parse_hash_hex(&all).map(|h| h.to_vec()), Some(want));
        for (i, bad) in ["A", "g", "G", " ", "\u{0}", "/", ":", "`", "{"].iter().enumerate() {
            let mut s = all.clone();
            let at = (i * 7) % 63;
            s.replace_range(at..at + 1, bad);
            if s.len() == 64 {
                assert_eq!(parse_hash_hex(&s), None, "{s:?}");
            }
        }
        assert_eq!(parse_hash_hex(&all[..63]), None);
        assert_eq!(parse_hash_hex_bytes(&[b'0'; 65]), None);
        assert_eq!(parse_hash_hex_bytes(&[0xff; 64]), None);
        Ok(())
    }
}
