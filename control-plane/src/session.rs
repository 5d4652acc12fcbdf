//! Session authentication for the token API (DESIGN §12): an InfraBox user
//! JWT (RS256, no `exp`) from `Authorization` (`Bearer`/`token`, any case)
//! or, without an `Authorization` header, the `token` cookie.
//!
//! An `ib_mcp_` token is refused here: MCP tokens cannot manage MCP tokens.
//! Error messages never contain the presented credential.
//!
//! InfraBox's public key is accepted in the forms its setups carry it
//! ([`public_key`]): PEM, SPKI (`BEGIN PUBLIC KEY`, what `openssl rsa
//! -pubout` writes) or PKCS#1 (`BEGIN RSA PUBLIC KEY`), and OpenSSH
//! (`ssh-rsa AAAA…`, in InfraBox's k3s and e2e setups).

use std::collections::HashSet;

use axum::http::{header, HeaderMap};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mcp_filter_core::token::PREFIX;
use serde::Deserialize;
use uuid::Uuid;

use crate::error::ApiError;

/// An authenticated InfraBox user (existence in `"user"` is checked by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user_id: Uuid,
    /// The verified JWT, to call InfraBox on the user's behalf (upstream
    /// credentials). Never logged.
    pub jwt: SessionJwt,
    /// It came from the `token` cookie (which a browser attaches to
    /// cross-site requests too), not from an `Authorization` header.
    pub from_cookie: bool,
}

/// A verified session JWT; its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SessionJwt(String);

impl SessionJwt {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SessionJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionJwt(<redacted>)")
    }
}

/// Verifies InfraBox session JWTs with InfraBox's public key.
#[derive(Clone)]
pub struct SessionVerifier {
    key: DecodingKey,
    validation: Validation,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    user: Option<ClaimUser>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct ClaimUser {
    id: serde_json::Value,
}

/// What [`public_key`] says of a key it cannot read (never quoting it).
pub const ACCEPTED_KEY_FORMATS: &str = "not an RSA public key; accepted are PEM (-----BEGIN PUBLIC KEY----- as openssl rsa -pubout \
     writes it, or -----BEGIN RSA PUBLIC KEY-----) and OpenSSH (ssh-rsa AAAA...)";

/// InfraBox's RSA public key from PEM (SPKI or PKCS#1) or OpenSSH text.
pub fn public_key(text: &[u8]) -> Result<DecodingKey, &'static str> {
    let trimmed = std::str::from_utf8(text).map_err(|_| ACCEPTED_KEY_FORMATS)?.trim();
    if let Some(rest) = trimmed.strip_prefix("ssh-rsa ") {
        let blob = rest.split_whitespace().next().ok_or(ACCEPTED_KEY_FORMATS)?;
        let (n, e) = openssh_rsa(blob).ok_or(ACCEPTED_KEY_FORMATS)?;
        return Ok(DecodingKey::from_rsa_raw_components(&n, &e));
    }
    if trimmed.contains("-----BEGIN") {
        return DecodingKey::from_rsa_pem(trimmed.as_bytes()).map_err(|_| ACCEPTED_KEY_FORMATS);
    }
    Err(ACCEPTED_KEY_FORMATS)
}

/// (modulus, exponent) of an OpenSSH `ssh-rsa` key blob (base64 of: string
/// "ssh-rsa", mpint e, mpint n).
fn openssh_rsa(blob_b64: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    use base64::Engine;
    let blob = base64::engine::general_purpose::STANDARD.decode(blob_b64).ok()?;
    let mut rest = blob.as_slice();
    let mut next = || -> Option<Vec<u8>> {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let field = rest.get(4..4 + len)?.to_vec();
        rest = rest.get(4 + len..)?;
        Some(field)
    };
    if next()? != b"ssh-rsa" {
        return None;
    }
    let strip = |v: Vec<u8>| -> Vec<u8> { v.into_iter().skip_while(|b| *b == 0).collect() };
    let e = strip(next()?);
    let n = strip(next()?);
    (n.len() >= 128 && !e.is_empty()).then_some((n, e))
}

impl SessionVerifier {
    /// Builds a verifier from InfraBox's RSA public key (PEM or OpenSSH).
    pub fn from_public_key(text: &[u8]) -> Result<Self, &'static str> {
        let key = public_key(text)?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        Ok(Self { key, validation })
    }

    /// Authenticates the request headers.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Session, ApiError> {
        let (raw, from_cookie) = credential(headers)?;
        if raw.starts_with(PREFIX) {
            return Err(ApiError::unauthorized(
                "mcp_token_not_allowed",
                "MCP tokens cannot be used to manage MCP tokens; sign in to InfraBox",
            ));
        }
        let invalid = || ApiError::unauthorized("invalid_session", "the session is invalid; sign in to InfraBox again");
        let data = jsonwebtoken::decode::<Claims>(raw, &self.key, &self.validation).map_err(|_| invalid())?;
        if data.claims.kind.as_deref() != Some("user") {
            return Err(invalid());
        }
        let id = data.claims.user.and_then(|u| u.id.as_str().and_then(|s| Uuid::parse_str(s).ok())).ok_or_else(invalid)?;
        Ok(Session { user_id: id, jwt: SessionJwt(raw.to_string()), from_cookie })
    }
}

/// The raw credential from `Authorization` or the `token` cookie, and
/// whether it was the cookie.
fn credential(headers: &HeaderMap) -> Result<(&str, bool), ApiError> {
    let missing = || ApiError::unauthorized("missing_session", "authentication required: sign in to InfraBox");
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("invalid_session", "the Authorization header is not valid text"))?
            .trim();
        let (scheme, rest) = value.split_once(char::is_whitespace).unwrap_or((value, ""));
        let rest = rest.trim();
        if rest.starts_with(PREFIX) || scheme.starts_with(PREFIX) {
            return Ok((if rest.is_empty() { scheme } else { rest }, false));
        }
        if !(scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")) {
            return Err(ApiError::unauthorized(
                "invalid_session",
                "unsupported Authorization scheme; use Bearer with an InfraBox session",
            ));
        }
        if rest.is_empty() {
            return Err(missing());
        }
        return Ok((rest, false));
    }
    for cookies in headers.get_all(header::COOKIE) {
        let Ok(cookies) = cookies.to_str() else { continue };
        for pair in cookies.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=') {
                if name.trim() == "token" {
                    let value = value.trim().trim_matches('"');
                    if !value.is_empty() {
                        return Ok((value, true));
                    }
                }
            }
        }
    }
    Err(missing())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn credential_sources() {
        assert_eq!(credential(&headers(&[("authorization", "Bearer abc")])).unwrap(), ("abc", false));
        assert_eq!(credential(&headers(&[("authorization", "bearer  abc ")])).unwrap(), ("abc", false));
        assert_eq!(credential(&headers(&[("authorization", "TOKEN abc")])).unwrap(), ("abc", false));
        assert_eq!(credential(&headers(&[("cookie", "a=b; token=xyz; c=d")])).unwrap(), ("xyz", true));
        // Authorization wins over the cookie.
        assert_eq!(credential(&headers(&[("authorization", "Bearer abc"), ("cookie", "token=xyz")])).unwrap(), ("abc", false));
        assert_eq!(credential(&headers(&[])).unwrap_err().code, "missing_session");
        assert_eq!(credential(&headers(&[("authorization", "Basic Zm9v")])).unwrap_err().code, "invalid_session");
    }

    #[test]
    fn mcp_tokens_are_refused_without_echo() {
        let tok = mcp_filter_core::token::mint(&[7; 24]);
        let v = SessionVerifier::from_public_key(include_bytes!("../testdata/session_public.pem")).unwrap();
        for h in [
            headers(&[("authorization", &format!("Bearer {tok}"))]),
            headers(&[("authorization", &format!("bearer {tok}"))]),
            headers(&[("authorization", &tok)]),
            headers(&[("cookie", &format!("token={tok}"))]),
        ] {
            let e = v.authenticate(&h).unwrap_err();
            assert_eq!(e.code, "mcp_token_not_allowed");
            assert!(!e.message.contains(&tok));
        }
        let e = v.authenticate(&headers(&[("authorization", "Bearer not.a.jwt")])).unwrap_err();
        assert_eq!(e.code, "invalid_session");
    }

    #[test]
    fn infrabox_keys_are_read_in_every_form_its_setups_use() {
        use rsa::pkcs1::EncodeRsaPublicKey;
        use rsa::pkcs8::DecodePublicKey;
        use rsa::traits::PublicKeyParts;
        let spki = include_str!("../testdata/session_public.pem");
        let key = rsa::RsaPublicKey::from_public_key_pem(spki).unwrap();
        let pkcs1 = key.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let mpint = |v: Vec<u8>| if v.first().is_some_and(|b| b & 0x80 != 0) { [vec![0], v].concat() } else { v };
        let mut blob = Vec::new();
        for field in [b"ssh-rsa".to_vec(), mpint(key.e().to_bytes_be()), mpint(key.n().to_bytes_be())] {
            blob.extend((field.len() as u32).to_be_bytes());
            blob.extend(field);
        }
        use base64::Engine;
        let ssh = format!("ssh-rsa {} infrabox@k3s\n", base64::engine::general_purpose::STANDARD.encode(&blob));
        let id = "2b8f9f4e-1111-4222-8333-444455556666";
        let jwt = sign(include_bytes!("../testdata/session_private.pem"), serde_json::json!({"user": {"id": id}, "type": "user"}));
        let forged = sign(include_bytes!("../testdata/other_private.pem"), serde_json::json!({"user": {"id": id}, "type": "user"}));
        for (form, text) in [("SPKI", spki.to_string()), ("PKCS#1", pkcs1.to_string()), ("OpenSSH", ssh)] {
            let v = SessionVerifier::from_public_key(text.as_bytes()).unwrap_or_else(|e| panic!("{form}: {e}"));
            assert_eq!(v.authenticate(&headers(&[("authorization", &format!("Bearer {jwt}"))])).unwrap().user_id.to_string(), id, "{form}");
            assert!(v.authenticate(&headers(&[("authorization", &format!("Bearer {forged}"))])).is_err(), "{form}: another key's JWT");
        }
        for bad in ["", "ssh-rsa", "ssh-rsa !!!", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", "MIIBIjANBgkqh"] {
            let e = SessionVerifier::from_public_key(bad.as_bytes()).err().unwrap_or_else(|| panic!("accepted {bad:?}"));
            assert!(e.contains("PEM") && e.contains("ssh-rsa"), "{e}");
        }
    }

    fn sign(key: &[u8], claims: serde_json::Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key).unwrap();
        jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::RS256), &claims, &key).unwrap()
    }

    #[test]
    fn verifies_infrabox_user_jwts() {
        let v = SessionVerifier::from_public_key(include_bytes!("../testdata/session_public.pem")).unwrap();
        let good = include_bytes!("../testdata/session_private.pem");
        let other = include_bytes!("../testdata/other_private.pem");
        let id = "2b8f9f4e-1111-4222-8333-444455556666";
        let jwt = sign(good, serde_json::json!({"user": {"id": id}, "type": "user"}));
        let s = v.authenticate(&headers(&[("authorization", &format!("bearer {jwt}"))])).unwrap();
        assert_eq!(s.user_id.to_string(), id);
        let s = v.authenticate(&headers(&[("cookie", &format!("token={jwt}"))])).unwrap();
        assert_eq!(s.user_id.to_string(), id);
        assert_eq!(s.jwt.expose(), jwt);
        assert!(!format!("{s:?}").contains(&jwt), "Debug must not show the session");
        for bad in [
            sign(other, serde_json::json!({"user": {"id": id}, "type": "user"})),
            sign(good, serde_json::json!({"user": {"id": id}, "type": "global"})),
            sign(good, serde_json::json!({"project": {"id": id}, "type": "project"})),
            sign(good, serde_json::json!({"user": {"id": "nope"}, "type": "user"})),
        ] {
            let e = v.authenticate(&headers(&[("authorization", &format!("Bearer {bad}"))])).unwrap_err();
            assert_eq!(e.code, "invalid_session");
            assert!(!e.message.contains(&bad));
        }
    }
}
