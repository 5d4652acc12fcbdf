//! The request pipeline on MCP paths (DESIGN §4), as two pure functions
//! around the one asynchronous step (the rate limit):
//!
//! ```text
//! admit:     canonical path → policy present → authenticate → route match
//! (adapter:  rate limit per (user, class))
//! authorize: project scope → write permission → Forward
//! ```
//!
//! Paths outside the MCP surface only get the credential check of DESIGN §3.

use crate::credential::{self, Bearer};
use crate::denial::{Denial, ErrorCode};
use crate::path::{self, Area};
use crate::route::{Class, Kind, Lookup, Params, RouteTable, Shaping};
use crate::policy::Policy;
use crate::token::Token;

/// What the pipeline reads of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// `:path`, query included.
    pub path: &'a str,
    /// Every `Authorization` header value.
    pub authorization: &'a [&'a str],
    /// Every `Cookie` header value.
    pub cookie: &'a [&'a str],
}

/// The outcome of [`admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Not an MCP request and no MCP credential: forward untouched.
    PassThrough,
    /// Refused; final.
    Deny(Denial),
    /// Authenticated and routed; next: rate limit, then [`authorize`].
    Admitted(Admitted),
}

/// An authenticated, routed MCP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Index of the token's grant in the policy it was admitted with.
    pub grant: u32,
    /// Index of the matched route.
    pub route: usize,
    pub params: Params,
    pub query: Option<String>,
}

/// Where and how to forward an authorized request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub method: String,
    pub path: String,
    /// The user's upstream credential for the route's kind (always present:
    /// [`authorize`] refuses with 503 when the user has none).
    pub credential: Option<String>,
    pub shaping: Shaping,
}

/// Steps 1–3: canonical path, authentication, route match.
pub fn admit(head: &RequestHead<'_>, policy: Option<&Policy>, routes: &RouteTable, now: i64) -> Admission {
    let (rest, query) = match path::area(head.path) {
        Area::Mcp { rest, query } => (rest, query),
        Area::TokenApi | Area::Other => {
            return if credential::carries_mcp_credential(head.authorization, head.cookie) {
                Admission::Deny(Denial::new(
                    ErrorCode::McpTokenNotAccepted,
                    "MCP tokens are accepted only under /api/v1/mcp/",
                ))
            } else {
                Admission::PassThrough
            };
        }
    };
    if let Err(why) = path::check_canonical(rest) {
        return Admission::Deny(Denial::new(ErrorCode::BadPath, why));
    }
    let lookup = routes.lookup(head.method, rest);
    if let Lookup::BadId(why) = lookup {
        return Admission::Deny(Denial::new(ErrorCode::BadPath, why));
    }
    let Some(policy) = policy else {
        return Admission::Deny(Denial::new(
            ErrorCode::PolicyUnavailable,
            "the gateway has not received its policy yet; retry shortly",
        ));
    };
    let grant = match authenticate(head.authorization, policy, now) {
        Ok(g) => g,
        Err(d) => return Admission::Deny(d),
    };
    match lookup {
        Lookup::Found { route, params } => Admission::Admitted(Admitted {
            grant,
            route,
            params,
            query: query.map(str::to_string),
        }),
        Lookup::MethodNotAllowed { allow } => Admission::Deny(
            Denial::new(ErrorCode::MethodNotAllowed, format!("{} is not allowed here", head.method))
                .with_header("allow", allow),
        ),
        Lookup::NotFound | Lookup::BadId(_) => {
            Admission::Deny(Denial::new(ErrorCode::UnknownEndpoint, "no such MCP endpoint"))
        }
    }
}

/// Step 2: the bearer token must be well formed, known, and not expired.
/// Revoked tokens are absent from the policy, so they are unknown.
fn authenticate(authorization: &[&str], policy: &Policy, now: i64) -> Result<u32, Denial> {
    let invalid = |m: &str| Denial::new(ErrorCode::InvalidToken, m);
    let value = match credential::bearer(authorization) {
        Bearer::Value(v) => v,
        Bearer::Missing => return Err(invalid("missing Authorization: Bearer ib_mcp_… header")),
        Bearer::Ambiguous => return Err(invalid("more than one Authorization header")),
        Bearer::NotBearer => return Err(invalid("the Authorization scheme must be Bearer")),
    };
    let token = Token::parse(value).map_err(|e| invalid(&format!("malformed token: {e}")))?;
    let (ix, grant) = policy
        .grant_by_hash(&token.hash())
        .filter(|(_, g)| g.token_id() == token.token_id())
        .ok_or_else(|| invalid("unknown or revoked token"))?;
    if grant.expires_at() <= now {
        return Err(invalid("token expired"));
    }
    Ok(ix)
}

/// Steps 5–6 and the forward plan of step 7.
pub fn authorize(admitted: &Admitted, policy: &Policy, routes: &RouteTable, now: i64) -> Result<Forward, Denial> {
    let grant = policy
        .grant(admitted.grant)
        .ok_or_else(|| Denial::new(ErrorCode::InvalidToken, "unknown or revoked token"))?;
    if grant.expires_at() <= now {
        return Err(Denial::new(ErrorCode::InvalidToken, "token expired"));
    }
    let route = routes
        .get(admitted.route)
        .ok_or_else(|| Denial::new(ErrorCode::UnknownEndpoint, "no such MCP endpoint"))?;
    if let Some(project) = admitted.params.project.as_deref() {
        match policy.project_expiry(grant, project) {
            Some(exp) if exp > now => {}
            Some(_) => return Err(Denial::new(ErrorCode::ProjectForbidden, "access to this project has expired")),
            None => return Err(Denial::new(ErrorCode::ProjectForbidden, "this token may not access this project")),
        }
    }
    if route.kind() == Kind::Write && !grant.allow_trigger() {
        return Err(Denial::new(ErrorCode::WriteForbidden, "this token may not trigger, restart, rerun or abort"));
    }
    let user = policy.user(grant.user);
    let credential = match route.kind() {
        Kind::Read => user.and_then(|u| u.read_credential.as_deref()),
        Kind::Write => user.and_then(|u| u.write_credential.as_deref()),
    };
    // Never forward without the user's own credential: InfraBox would
    // answer 401 and the agent could not tell why.
    let Some(credential) = credential else {
        return Err(Denial::new(
            ErrorCode::UpstreamCredentialMissing,
            "the gateway holds no InfraBox credential of this kind for the token's user yet; retry shortly",
        ));
    };
    Ok(Forward {
        method: route.upstream_method().to_string(),
        path: route.upstream_path(&admitted.params, admitted.query.as_deref()),
        credential: Some(credential.to_string()),
        shaping: route.shaping(),
    })
}

/// The rate-limit class of an admitted request.
pub fn class_of(admitted: &Admitted, routes: &RouteTable) -> Class {
    routes.get(admitted.route).map(|r| r.class()).unwrap_or(Class::Default)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::snapshot::{Limits, Snapshot, SnapshotToken, SnapshotUser, SCHEMA};
    use crate::token;

    const PA: &str = "0b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
    const PB: &str = "1b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";
    const B1: &str = "2b7a4c2e-1f3d-4c5b-9a8e-7d6c5b4a3f21";

    fn tok(n: u8) -> String {
        token::mint(&[n; 24])
    }

    /// A test's outcome: a failed expectation is an `Err` with the reason.
    type Outcome<T = ()> = Result<T, String>;
    /// What the pipeline did with one request: forwarded or denied.
    type Decided = Result<Forward, Denial>;

    fn grant(n: u8, trigger: bool, projects: BTreeMap<String, Option<i64>>) -> SnapshotToken {
        SnapshotToken {
            token_id: tok(n)[7..23].to_string(),
            token_hash: token::hash_hex(&tok(n)),
            user_id: "u1".into(),
            expires_at: 1_000,
            allow_trigger: trigger,
            projects,
        }
    }

    /// User `u1` with a read credential `R` and, if given, a write credential.
    fn compile(tokens: Vec<SnapshotToken>, write_credential: Option<&str>) -> Outcome<Policy> {
        Policy::compile(&Snapshot {
            schema: SCHEMA,
            version: "v".into(),
            generated_at: 0,
            limits: Limits::default(),
            tokens,
            users: BTreeMap::from([(
                "u1".into(),
                SnapshotUser { read_credential: Some("R".into()), write_credential: write_credential.map(Into::into) },
            )]),
        })
        .map_err(|e| e.to_string())
    }

    fn policy() -> Outcome<Policy> {
        compile(
            vec![
                grant(1, false, BTreeMap::from([(PA.into(), None), (PB.into(), Some(500))])),
                grant(2, true, BTreeMap::from([(PA.into(), None)])),
            ],
            Some("W"),
        )
    }

    fn run_with(p: &Policy, method: &str, path: &str, auth: &[&str], now: i64) -> Outcome<Decided> {
        let routes = RouteTable::default();
        let head = RequestHead { method, path, authorization: auth, cookie: &[] };
        match admit(&head, Some(p), &routes, now) {
            Admission::Admitted(a) => Ok(authorize(&a, p, &routes, now)),
            Admission::Deny(d) => Ok(Err(d)),
            Admission::PassThrough => Err(format!("{method} {path} passed through")),
        }
    }

    fn run(method: &str, path: &str, auth: &[&str], now: i64) -> Outcome<Decided> {
        run_with(&policy()?, method, path, auth, now)
    }

    fn denial(r: Outcome<Decided>) -> Outcome<Denial> {
        match r? {
            Err(d) => Ok(d),
            Ok(f) => Err(format!("forwarded to {} instead of denied", f.path)),
        }
    }

    fn code(r: Outcome<Decided>) -> Outcome<ErrorCode> {
        denial(r).map(|d| d.code)
    }

    fn forwarded(r: Outcome<Decided>) -> Outcome<Forward> {
        r?.map_err(|d| format!("denied ({}) instead of forwarded", d.code.as_str()))
    }

    #[test]
    fn forwards_with_the_read_credential() -> Outcome {
        let auth = format!("Bearer {}", tok(1));
        let f = forwarded(run("GET", &format!("/api/v1/mcp/projects/{PA}/builds?size=5"), &[&auth], 10))?;
        assert_eq!(f.path, format!("/api/v1/projects/{PA}/builds/?size=5"));
        assert_eq!(f.method, "GET");
        assert_eq!(f.credential.as_deref(), Some("R"));
        Ok(())
    }

    #[test]
    fn decision_order() -> Outcome {
        let good = format!("Bearer {}", tok(1));
        let unknown = format!("Bearer {}", tok(9));
        // bad path wins over a bad token
        assert_eq!(code(run("GET", "/api/v1/mcp/projects/%2e", &[&unknown], 10))?, ErrorCode::BadPath);
        assert_eq!(code(run("GET", "/api/v1/mcp/projects/NOTAUUID", &[&unknown], 10))?, ErrorCode::BadPath);
        // a bad token wins over an unknown endpoint
        assert_eq!(code(run("GET", "/api/v1/mcp/nope", &[&unknown], 10))?, ErrorCode::InvalidToken);
        assert_eq!(code(run("GET", "/api/v1/mcp/nope", &[&good], 10))?, ErrorCode::UnknownEndpoint);
        assert_eq!(code(run("GET", &format!("/api/v1/mcp/projects/{PA}/trigger"), &[&good], 10))?, ErrorCode::MethodNotAllowed);
        assert_eq!(code(run("POST", &format!("/api/v1/mcp/projects/{PA}/trigger"), &[&good], 10))?, ErrorCode::WriteForbidden);
        assert_eq!(code(run("GET", &format!("/api/v1/mcp/projects/{B1}"), &[&good], 10))?, ErrorCode::ProjectForbidden);
        assert_eq!(code(run("GET", &format!("/api/v1/mcp/projects/{PB}"), &[&good], 600))?, ErrorCode::ProjectForbidden);
        assert!(run("GET", &format!("/api/v1/mcp/projects/{PB}"), &[&good], 499)?.is_ok());
        assert_eq!(code(run("GET", &format!("/api/v1/mcp/projects/{PA}"), &[&good], 1_000))?, ErrorCode::InvalidToken);
        Ok(())
    }

    #[test]
    fn write_uses_the_write_credential() -> Outcome {
        let auth = format!("Bearer {}", tok(2));
        let f = forwarded(run("POST", &format!("/api/v1/mcp/projects/{PA}/builds/{B1}/restart?x=1"), &[&auth], 10))?;
        assert_eq!(f.method, "GET");
        assert_eq!(f.path, format!("/api/v1/projects/{PA}/builds/{B1}/restart"));
        assert_eq!(f.credential.as_deref(), Some("W"));
        Ok(())
    }

    #[test]
    fn no_credential_no_forward() -> Outcome {
        // A user with a read credential only, and a token that may trigger.
        let p = compile(vec![grant(2, true, BTreeMap::from([(PA.into(), None)]))], None)?;
        let auth = format!("Bearer {}", tok(2));
        let d = denial(run_with(&p, "POST", &format!("/api/v1/mcp/projects/{PA}/trigger"), &[&auth], 10))?;
        assert_eq!(d.code, ErrorCode::UpstreamCredentialMissing);
        assert_eq!(d.status(), 503);
        let f = forwarded(run_with(&p, "GET", &format!("/api/v1/mcp/projects/{PA}"), &[&auth], 10))?;
        assert_eq!(f.credential.as_deref(), Some("R"));
        Ok(())
    }

    #[test]
    fn malformed_tokens_are_401() -> Outcome {
        let t = tok(1);
        for auth in [
            String::new(),
            format!("Bearer {}", &t[..t.len() - 1]),
            format!("Bearer {}", t.to_uppercase()),
            format!("Bearer {}x", t),
            format!("Bearer {}", t.replace('1', "z")),
            format!("token {t}"),
        ] {
            let auth: Vec<&str> = if auth.is_empty() { vec![] } else { vec![&auth] };
            let d = denial(run("GET", &format!("/api/v1/mcp/projects/{PA}"), &auth, 10))?;
            assert_eq!(d.code, ErrorCode::InvalidToken);
            assert!(!d.message.contains(&t[7..]), "message must not echo the token");
        }
        let a = format!("Bearer {t}");
        assert_eq!(code(run("GET", &format!("/api/v1/mcp/projects/{PA}"), &[&a, &a], 10))?, ErrorCode::InvalidToken);
        Ok(())
    }

    #[test]
    fn outside_the_mcp_surface() {
        let routes = RouteTable::default();
        let t = tok(1);
        let auth = format!("bearer {t}");
        let cookie = format!("token={t}");
        let cases: Vec<(&str, Vec<&str>, Vec<&str>, bool)> = vec![
            ("/api/v1/projects/x", vec![auth.as_str()], vec![], true),
            ("/api/v1/projects/x", vec![], vec![cookie.as_str()], true),
            ("/api/v1/mcp/tokens", vec![auth.as_str()], vec![], true),
            ("/api/v1/projects/x", vec!["Bearer eyJ"], vec!["token=eyJ"], false),
            ("/api/v1/mcp/tokens", vec!["Bearer eyJ"], vec![], false),
        ];
        for (path, a, c, denied) in cases {
            let h = RequestHead { method: "GET", path, authorization: &a, cookie: &c };
            let r = admit(&h, None, &routes, 0);
            assert_eq!(matches!(r, Admission::Deny(ref d) if d.code == ErrorCode::McpTokenNotAccepted), denied, "{path}");
            if !denied {
                assert_eq!(r, Admission::PassThrough);
            }
        }
        let h = RequestHead { method: "GET", path: "/api/v1/mcp/projects", authorization: &[], cookie: &[] };
        assert!(matches!(admit(&h, None, &routes, 0), Admission::Deny(d) if d.code == ErrorCode::PolicyUnavailable));
    }
}
