//! Validation of token API request bodies (pure, no I/O). Field names follow
//! InfraBox's own `/api/v1/mcp/tokens` handler: `name`, `enabled_projects`
//! (project id → expiry string or null; `{}` = all collaborator projects),
//! `expires_days`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::ApiError;
use crate::expiry::parse_expiry;

/// Longest token name (InfraBox's `varchar(128)`).
pub const MAX_NAME_CHARS: usize = 128;
/// Most projects one token may list.
pub const MAX_PROJECTS: usize = 1000;

/// Validated `enabled_projects`: normalized project ids → expiry text or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnabledProjects(pub BTreeMap<Uuid, Option<String>>);

impl EnabledProjects {
    /// The JSON stored in `mcp_token.enabled_projects` and returned to clients.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(p, e)| (p.to_string(), e.clone().map(Value::String).unwrap_or(Value::Null)))
                .collect::<Map<_, _>>(),
        )
    }
}

/// A validated POST body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateToken {
    pub name: String,
    pub enabled_projects: EnabledProjects,
    pub expires_days: i64,
}

/// A validated PATCH body (at least one field present).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateToken {
    pub name: Option<String>,
    pub enabled_projects: Option<EnabledProjects>,
    pub expires_days: Option<i64>,
}

/// Validates a POST body; a missing `expires_days` means the maximum (as in InfraBox).
pub fn parse_create(body: &Value, max_days: i64) -> Result<CreateToken, ApiError> {
    let obj = object(body)?;
    let name = match obj.get("name") {
        None | Some(Value::Null) => return Err(ApiError::bad_request("name is required")),
        Some(v) => name(v)?,
    };
    let enabled_projects = match obj.get("enabled_projects") {
        None | Some(Value::Null) => EnabledProjects::default(),
        Some(v) => enabled_projects(v)?,
    };
    let expires_days = match obj.get("expires_days") {
        None | Some(Value::Null) => max_days,
        Some(v) => expires_days(v, max_days)?,
    };
    Ok(CreateToken { name, enabled_projects, expires_days })
}

/// Validates a PATCH body.
pub fn parse_update(body: &Value, max_days: i64) -> Result<UpdateToken, ApiError> {
    let obj = object(body)?;
    let update = UpdateToken {
        name: obj.get("name").map(name).transpose()?,
        enabled_projects: match obj.get("enabled_projects") {
            None => None,
            Some(Value::Null) => Some(EnabledProjects::default()),
            Some(v) => Some(enabled_projects(v)?),
        },
        expires_days: obj.get("expires_days").map(|v| expires_days(v, max_days)).transpose()?,
    };
    if update == UpdateToken::default() {
        return Err(ApiError::bad_request("nothing to update: give name, enabled_projects or expires_days"));
    }
    Ok(update)
}

fn object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object().ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))
}

fn name(v: &Value) -> Result<String, ApiError> {
    let s = v.as_str().ok_or_else(|| ApiError::bad_request("name must be a string"))?.trim();
    let n = s.chars().count();
    if n == 0 || n > MAX_NAME_CHARS {
        return Err(ApiError::bad_request(format!("name must be 1-{MAX_NAME_CHARS} characters")));
    }
    if s.chars().any(char::is_control) {
        return Err(ApiError::bad_request("name must not contain control characters"));
    }
    // Format characters (Unicode category Cf): bidirectional overrides and
    // isolates, zero-width characters, tags. They make a name display as
    // something it is not (a "Trojan Source" name in the token list).
    if s.chars().any(|c| unicode_general_category::get_general_category(c) == unicode_general_category::GeneralCategory::Format) {
        return Err(ApiError::bad_request(
            "name must not contain invisible format characters (Unicode category Cf: bidirectional controls, zero-width characters)",
        ));
    }
    Ok(s.to_owned())
}

fn enabled_projects(v: &Value) -> Result<EnabledProjects, ApiError> {
    let obj = v.as_object().ok_or_else(|| {
        ApiError::bad_request("enabled_projects must be an object of project id to expiry (RFC 3339) or null")
    })?;
    if obj.len() > MAX_PROJECTS {
        return Err(ApiError::bad_request(format!("enabled_projects may list at most {MAX_PROJECTS} projects")));
    }
    let mut out = BTreeMap::new();
    for (key, expiry) in obj {
        let id = Uuid::parse_str(key)
            .map_err(|_| ApiError::bad_request("enabled_projects keys must be project ids (UUIDs)"))?;
        let expiry = match expiry {
            Value::Null => None,
            Value::String(s) if parse_expiry(s).is_some() => Some(s.trim().to_owned()),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "enabled_projects[{id}] must be an RFC 3339 date-time (e.g. 2026-12-01T00:00:00Z) or null"
                )))
            }
        };
        if out.insert(id, expiry).is_some() {
            return Err(ApiError::bad_request(format!("enabled_projects lists {id} twice")));
        }
    }
    Ok(EnabledProjects(out))
}

fn expires_days(v: &Value, max_days: i64) -> Result<i64, ApiError> {
    let bad = || ApiError::bad_request(format!("expires_days must be an integer from 1 to {max_days}"));
    let days = match v {
        // Strict: a JSON integer only (no strings, no fractions).
        Value::Number(n) => n.as_i64().ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if !(1..=max_days).contains(&days) {
        return Err(bad());
    }
    Ok(days)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P: &str = "0b5e1c9a-3c1f-4e0e-9a57-1e2f3a4b5c6d";

    #[test]
    fn create_defaults_and_normalizes() {
        let c = parse_create(&json!({"name": "  ci  "}), 365).unwrap();
        assert_eq!(c, CreateToken { name: "ci".into(), enabled_projects: EnabledProjects::default(), expires_days: 365 });
        let c = parse_create(
            &json!({"name": "x", "enabled_projects": {P.to_uppercase(): null, "11111111-2222-3333-4444-555555555555": "2026-12-01T00:00:00"}, "expires_days": 30}),
            365,
        )
        .unwrap();
        assert_eq!(c.expires_days, 30);
        assert_eq!(
            c.enabled_projects.to_json(),
            json!({P: null, "11111111-2222-3333-4444-555555555555": "2026-12-01T00:00:00"})
        );
    }

    #[test]
    fn create_rejects_bad_fields() {
        for (body, needle) in [
            (json!([]), "JSON object"),
            (json!({}), "name is required"),
            (json!({"name": ""}), "name must be 1-128"),
            (json!({"name": "   "}), "name must be 1-128"),
            (json!({"name": "a".repeat(129)}), "name must be 1-128"),
            (json!({"name": 5}), "name must be a string"),
            (json!({"name": "ci\u{0007}"}), "control characters"),
            (json!({"name": "invoice\u{202E}fdp.exe"}), "format characters"),
            (json!({"name": "a\u{2066}b\u{2069}"}), "format characters"),
            (json!({"name": "zero\u{200B}width"}), "format characters"),
            (json!({"name": "bom\u{FEFF}"}), "format characters"),
            (json!({"name": "soft\u{00AD}hyphen"}), "format characters"),
            (json!({"name": "tag\u{E0041}"}), "format characters"),
            (json!({"name": "lrm\u{200E}"}), "format characters"),
            (json!({"name": "x", "enabled_projects": []}), "must be an object"),
            (json!({"name": "x", "enabled_projects": {"p1": null}}), "UUIDs"),
            (json!({"name": "x", "enabled_projects": {P: "soon"}}), "RFC 3339"),
            (json!({"name": "x", "enabled_projects": {P: 5}}), "RFC 3339"),
            (json!({"name": "x", "expires_days": 0}), "expires_days"),
            (json!({"name": "x", "expires_days": 366}), "expires_days"),
            (json!({"name": "x", "expires_days": 1.5}), "expires_days"),
            (json!({"name": "x", "expires_days": true}), "expires_days"),
        ] {
            let e = parse_create(&body, 365).unwrap_err();
            assert_eq!(e.code, "bad_request");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
        assert_eq!(parse_create(&json!({"name": "a".repeat(128), "expires_days": 7}), 365).unwrap().expires_days, 7);
        // Letters, marks and emoji of any script are fine.
        assert_eq!(parse_create(&json!({"name": "Überprüfung – 検証 🚀 نص"}), 365).unwrap().name, "Überprüfung – 検証 🚀 نص");
        assert!(parse_create(&json!({"name": "x", "expires_days": "7"}), 365).is_err(), "strings are not integers");
        assert!(parse_create(&json!({"name": "x", "expires_days": 400}), 500).is_ok());
    }

    #[test]
    fn update_needs_a_field() {
        assert!(parse_update(&json!({}), 365).unwrap_err().message.contains("nothing to update"));
        let u = parse_update(&json!({"expires_days": 3}), 365).unwrap();
        assert_eq!(u.expires_days, Some(3));
        assert_eq!(u.name, None);
        let u = parse_update(&json!({"enabled_projects": {}}), 365).unwrap();
        assert_eq!(u.enabled_projects, Some(EnabledProjects::default()));
        assert!(parse_update(&json!({"name": ""}), 365).is_err());
    }
}
