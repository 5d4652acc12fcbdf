//! The request pipeline on MCP paths (DESIGN §4), as two pure functions
//! around the one asynchronous step (the rate limit, which also carries the
//! ownership check of builds and jobs):
//!
//! ```text
//! admit:     host → canonical path → misplaced secret → policy present
//!            → authenticate → route match
//! (adapter:  rate limit per (user, class), ownership of {build}/{job})
//! authorize: project scope → ownership → write permission → Forward
//! ```
//!
//! Paths outside the MCP surface, and every path on a host that is not
//! InfraBox's, only get the credential check of DESIGN §3.

use crate::config::PluginConfig;
use crate::credential::{self, Bearer};
use crate::denial::{Denial, ErrorCode};
use crate::ownership::{Claim, Ownership};
use crate::path::{self, Area};
use crate::route::{Class, Kind, Lookup, Params, RouteTable, Shaping};
use crate::policy::Policy;
use crate::token::Token;

/// What the pipeline reads of a request: its head as Envoy hands it over.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// `:path`, query included.
    pub path: &'a str,
    /// `:authority` (HTTP/1 `Host`, or the authority of an absolute URL).
    pub authority: &'a str,
    /// Every header as (lowercase name, value), pseudo-headers included.
    pub headers: &'a [(String, String)],
}

impl<'a> RequestHead<'a> {
    /// The head of a request with these headers.
    pub fn new(headers: &'a [(String, String)]) -> Self {
        let first = |name: &str| headers.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str());
        Self { method: first(":method"), path: first(":path"), authority: first(":authority"), headers }
    }

    /// Every value of the header `name` (lowercase), in order.
    pub fn values(&self, name: &'a str) -> impl Iterator<Item = &'a str> + Clone + 'a {
        self.headers.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Whether the request is for one of the InfraBox hosts.
    pub fn on_infrabox(&self, config: &PluginConfig) -> bool {
        config.hosts.matches(self.authority)
    }
}

/// Headers for a [`RequestHead`]: the pseudo-headers, then `others`.
pub fn request_headers(method: &str, path: &str, authority: &str, others: &[(&str, &str)]) -> Vec<(String, String)> {
    [(":method", method), (":path", path), (":authority", authority)]
        .iter()
        .chain(others)
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect()
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
    /// The builds/jobs that must belong to the project, if the path names any.
    pub claim: Option<Claim>,
}

/// Where and how to forward an authorized request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub method: String,
    pub path: String,
    /// The user's upstream credential for the route's kind.
    pub credential: String,
    pub shaping: Shaping,
}

/// Steps 1–3: host, canonical path, authentication, route match.
pub fn admit(head: &RequestHead<'_>, policy: Option<&Policy>, config: &PluginConfig, now: i64) -> Admission {
    let area = path::area(head.path);
    let (rest, query) = match area {
        Area::Mcp { rest, query } if head.on_infrabox(config) => (rest, query),
        _ => {
            if let Some(place) = credential::secret_outside_mcp(head) {
                return Admission::Deny(Denial::new(
                    ErrorCode::McpTokenNotAccepted,
                    format!(
                        "MCP tokens are accepted only under /api/v1/mcp/ of the InfraBox host, in the Authorization header; \
                         this request carries one in {}",
                        place.as_str()
                    ),
                ));
            }
            return match area {
                // An MCP path on another host: no surface, no credential.
                Area::Mcp { .. } => Admission::Deny(Denial::new(ErrorCode::UnknownEndpoint, "no such MCP endpoint")),
                Area::TokenApi | Area::Other => Admission::PassThrough,
            };
        }
    };
    if let Err(why) = path::check_canonical(rest) {
        return Admission::Deny(Denial::new(ErrorCode::BadPath, why));
    }
    if let Some(place) = credential::misplaced_secret(head) {
        return Admission::Deny(Denial::new(
            ErrorCode::CredentialMisplaced,
            format!("an MCP token belongs only in the Authorization header (Bearer); this request carries one in {}", place.as_str()),
        ));
    }
    let routes = &config.routes;
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
    let authorization: Vec<&str> = head.values("authorization").collect();
    let grant = match authenticate(&authorization, policy, now) {
        Ok(g) => g,
        Err(d) => return Admission::Deny(d),
    };
    match lookup {
        Lookup::Found { route, params } => match routes.get(route).and_then(|r| r.unavailable()) {
            // InfraBox cannot serve it: say why, forward nothing.
            Some(why) => Admission::Deny(Denial::new(ErrorCode::NotSupportedUpstream, why)),
            None => Admission::Admitted(Admitted {
                grant,
                route,
                claim: Claim::of(&params),
                params,
                query: query.map(str::to_string),
            }),
        },
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
pub fn authenticate(authorization: &[&str], policy: &Policy, now: i64) -> Result<u32, Denial> {
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

/// Steps 5–6 and the forward plan of step 7. `ownership` is the verdict on
/// the request's [`Claim`] (ignored when it has none).
pub fn authorize(
    admitted: &Admitted,
    policy: &Policy,
    routes: &RouteTable,
    now: i64,
    ownership: Ownership,
) -> Result<Forward, Denial> {
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
    if admitted.claim.is_some() {
        match ownership {
            Ownership::Confirmed => {}
            // The same answer as an unknown path: never confirm that an id
            // of another project exists.
            Ownership::Refuted => return Err(Denial::new(ErrorCode::UnknownEndpoint, "no such MCP endpoint")),
            Ownership::Unknown => {
                return Err(Denial::new(
                    ErrorCode::OwnershipUnavailable,
                    "the gateway cannot check right now that this build or job belongs to the project; retry shortly",
                ))
            }
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
    // answer 401 and the agent could not tell why. The gateway mints it
    // with the owner's session (tokens created before the gateway have
    // none): retrying alone cannot help.
    let Some(credential) = credential else {
        return Err(Denial::new(
            ErrorCode::UpstreamCredentialMissing,
            "the gateway holds no InfraBox credential for this token's user: open the token page or call \
             GET /api/v1/mcp/tokens once with your InfraBox session",
        ));
    };
    Ok(Forward {
        method: route.upstream_method().to_string(),
        path: route.upstream_path(&admitted.params, admitted.query.as_deref()),
        credential: credential.to_string(),
        shaping: route.shaping(),
    })
}

/// The rate-limit class of an admitted request.
pub fn class_of(admitted: &Admitted, routes: &RouteTable) -> Class {
    routes.get(admitted.route).map(|r| r.class()).unwrap_or(Class::Default)
}

/// Client headers that never reach the upstream on a forwarded MCP request:
/// credentials (the client's `Authorization` is replaced by the user's
/// upstream credential), `X-Original-Method` (it feeds InfraBox's OPA) and
/// every `x-mcp-*` (the gateway sets its own). InfraBox's WSGI layer reads
/// `_` as `-`, so every spelling counts.
pub fn is_stripped_header(name: &str) -> bool {
    let canon = |b: u8| if b == b'_' { b'-' } else { b.to_ascii_lowercase() };
    let starts = |prefix: &str| name.len() >= prefix.len() && name.bytes().zip(prefix.bytes()).all(|(a, p)| canon(a) == p);
    starts("x-mcp-")
        || ["authorization", "proxy-authorization", "cookie", "x-original-method"]
            .iter()
            .any(|t| name.len() == t.len() && starts(t))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    #[cfg(all(target_family = "wasm", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

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

    const HOST: &str = "infrabox.test";

    fn config() -> Outcome<PluginConfig> {
        PluginConfig::parse(br#"{"snapshot_secret":"0123456789abcdef","hosts":["infrabox.test"]}"#).map_err(|e| e.to_string())
    }

    fn auth_headers<'a>(auth: &[&'a str]) -> Vec<(&'static str, &'a str)> {
        auth.iter().map(|a| ("authorization", *a)).collect()
    }

    /// One request through admit and authorize, with this ownership verdict.
    fn decide(p: &Policy, host: &str, method: &str, path: &str, headers: &[(&str, &str)], now: i64, ownership: Ownership) -> Outcome<Decided> {
        let config = config()?;
        let headers = request_headers(method, path, host, headers);
        let head = RequestHead::new(&headers);
        match admit(&head, Some(p), &config, now) {
            Admission::Admitted(a) => Ok(authorize(&a, p, &config.routes, now, ownership)),
            Admission::Deny(d) => Ok(Err(d)),
            Admission::PassThrough => Err(format!("{method} {path} passed through")),
        }
    }

    fn run_with(p: &Policy, method: &str, path: &str, auth: &[&str], now: i64) -> Outcome<Decided> {
        decide(p, HOST, method, path, &auth_headers(auth), now, Ownership::Confirmed)
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
        assert_eq!(f.credential, "R");
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
        let f = forwarded(run("POST", &format!("/api/v1/mcp/projects/{PA}/builds/{B1}/abort?x=1"), &[&auth], 10))?;
        assert_eq!(f.method, "GET");
        assert_eq!(f.path, format!("/api/v1/projects/{PA}/builds/{B1}/abort"));
        assert_eq!(f.credential, "W");
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
        assert_eq!(f.credential, "R");
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
    fn outside_the_mcp_surface() -> Outcome {
        let config = config()?;
        let t = tok(1);
        let auth = format!("bearer {t}");
        let cookie = format!("token={t}");
        let query = format!("/api/v1/projects/x?t={t}");
        let cases: Vec<(&str, Vec<(&str, &str)>, bool)> = vec![
            ("/api/v1/projects/x", vec![("authorization", auth.as_str())], true),
            ("/api/v1/projects/x", vec![("cookie", cookie.as_str())], true),
            ("/api/v1/projects/x", vec![("proxy-authorization", auth.as_str())], true),
            (query.as_str(), vec![], true),
            ("/api/v1/mcp/tokens", vec![("authorization", auth.as_str())], true),
            ("/api/v1/projects/x", vec![("authorization", "Bearer eyJ"), ("cookie", "token=eyJ")], false),
            ("/api/v1/mcp/tokens", vec![("authorization", "Bearer eyJ")], false),
            // Only the credential places count off the MCP surface.
            ("/api/v1/projects/x", vec![("x-api-key", t.as_str())], false),
        ];
        for (path, headers, denied) in cases {
            let headers = request_headers("GET", path, HOST, &headers);
            let r = admit(&RequestHead::new(&headers), None, &config, 0);
            assert_eq!(matches!(r, Admission::Deny(ref d) if d.code == ErrorCode::McpTokenNotAccepted), denied, "{path} {headers:?}");
            if !denied {
                assert_eq!(r, Admission::PassThrough);
            }
        }
        let headers = request_headers("GET", "/api/v1/mcp/projects", HOST, &[]);
        assert!(matches!(admit(&RequestHead::new(&headers), None, &config, 0), Admission::Deny(d) if d.code == ErrorCode::PolicyUnavailable));
        Ok(())
    }

    #[test]
    fn only_the_infrabox_host_has_an_mcp_surface() -> Outcome {
        let p = policy()?;
        let good = format!("Bearer {}", tok(1));
        let path = format!("/api/v1/mcp/projects/{PA}");
        assert!(decide(&p, "InfraBox.Test:443", "GET", &path, &[("authorization", &good)], 10, Ownership::Confirmed)?.is_ok());
        for host in ["evil.test", "infrabox.test.evil.test", "127.0.0.1", "", "infrabox.test@evil.test", "[::1]"] {
            // No credential: 404, nothing forwarded.
            assert_eq!(code(decide(&p, host, "GET", &path, &[], 10, Ownership::Confirmed))?, ErrorCode::UnknownEndpoint, "{host}");
            // A valid MCP token on another host is refused like anywhere else.
            assert_eq!(
                code(decide(&p, host, "GET", &path, &[("authorization", &good)], 10, Ownership::Confirmed))?,
                ErrorCode::McpTokenNotAccepted,
                "{host}"
            );
        }
        // Other paths on other hosts pass through untouched.
        let config = config()?;
        let headers = request_headers("GET", "/api/v1/projects/", "evil.test", &[("authorization", "Bearer eyJ")]);
        assert_eq!(admit(&RequestHead::new(&headers), Some(&p), &config, 10), Admission::PassThrough);
        Ok(())
    }

    #[test]
    fn a_secret_anywhere_but_the_authorization_header_is_refused() -> Outcome {
        let p = policy()?;
        let t = tok(1);
        let good = format!("Bearer {t}");
        let path = format!("/api/v1/mcp/projects/{PA}");
        let basic = {
            use base64::Engine;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("infrabox:{t}")))
        };
        let with_query = |q: &str| format!("{path}?{q}");
        let cases: Vec<(String, Vec<(&str, String)>)> = vec![
            (with_query(&format!("token={t}")), vec![]),
            (with_query(&format!("t={}", t.replace('_', "%5F"))), vec![]),
            (path.clone(), vec![("cookie", format!("token={t}"))]),
            (path.clone(), vec![("cookie", format!("token=\"ib\\137mcp_{}\"", &t[7..]))]),
            (path.clone(), vec![("proxy-authorization", good.clone())]),
            (path.clone(), vec![("proxy-authorization", basic.clone())]),
            (path.clone(), vec![("x-api-key", t.clone())]),
            (path.clone(), vec![("x-forwarded-authorization", good.clone())]),
        ];
        for (path, extra) in cases {
            let mut headers: Vec<(&str, &str)> = vec![("authorization", good.as_str())];
            headers.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
            assert_eq!(code(decide(&p, HOST, "GET", &path, &headers, 10, Ownership::Confirmed))?, ErrorCode::CredentialMisplaced, "{path} {extra:?}");
        }
        // A proxy credential of another kind is no reason to refuse (the
        // adapter removes it before forwarding).
        let headers = [("authorization", good.as_str()), ("proxy-authorization", "Basic dXNlcjpwYXNz")];
        assert!(decide(&p, HOST, "GET", &path, &headers, 10, Ownership::Confirmed)?.is_ok());
        Ok(())
    }

    #[test]
    fn builds_and_jobs_must_belong_to_the_project() -> Outcome {
        let p = policy()?;
        let good = format!("Bearer {}", tok(1));
        let auth = [("authorization", good.as_str())];
        let job_path = format!("/api/v1/mcp/projects/{PA}/jobs/{B1}/log");
        assert!(decide(&p, HOST, "GET", &job_path, &auth, 10, Ownership::Confirmed)?.is_ok());
        let d = denial(decide(&p, HOST, "GET", &job_path, &auth, 10, Ownership::Refuted))?;
        assert_eq!((d.code, d.status()), (ErrorCode::UnknownEndpoint, 404));
        let unknown_route = denial(run("GET", "/api/v1/mcp/nope", &[&good], 10))?;
        assert_eq!(d.message, unknown_route.message, "a foreign id answers exactly like an unknown endpoint");
        let d = denial(decide(&p, HOST, "GET", &job_path, &auth, 10, Ownership::Unknown))?;
        assert_eq!((d.code, d.status()), (ErrorCode::OwnershipUnavailable, 503));
        // Scope first: a project outside the token's scope is 403 whatever the ids.
        let other = format!("/api/v1/mcp/projects/{B1}/jobs/{PA}/log");
        assert_eq!(code(decide(&p, HOST, "GET", &other, &auth, 10, Ownership::Refuted))?, ErrorCode::ProjectForbidden);
        // Paths without builds or jobs claim nothing.
        assert!(decide(&p, HOST, "GET", &format!("/api/v1/mcp/projects/{PA}/builds"), &auth, 10, Ownership::Unknown)?.is_ok());
        let config = config()?;
        let headers = request_headers("GET", &format!("/api/v1/mcp/projects/{PA}/builds/{B1}/jobs"), HOST, &auth);
        let Admission::Admitted(a) = admit(&RequestHead::new(&headers), Some(&p), &config, 10) else { return Err("not admitted".into()) };
        assert_eq!(a.claim, Some(Claim { project: PA.into(), build: Some(B1.into()), job: None }));
        Ok(())
    }

    #[test]
    fn routes_infrabox_cannot_serve_answer_501_and_forward_nothing() -> Outcome {
        let p = policy()?;
        let good = format!("Bearer {}", tok(2));
        for path in [format!("/builds/{B1}/restart"), format!("/jobs/{B1}/restart"), format!("/jobs/{B1}/rerun")] {
            let path = format!("/api/v1/mcp/projects/{PA}{path}");
            let d = denial(run("POST", &path, &[&good], 10))?;
            assert_eq!((d.code, d.status()), (ErrorCode::NotSupportedUpstream, 501), "{path}");
            assert!(d.message.contains("InfraBox") && d.message.contains("dashboard"), "{}", d.message);
            // Authentication still comes first.
            assert_eq!(code(run("POST", &path, &[], 10))?, ErrorCode::InvalidToken);
        }
        // Switched on by the operator, they are forwarded like any write.
        let config = PluginConfig::parse(br#"{"snapshot_secret":"0123456789abcdef","hosts":["infrabox.test"],"enable_routes":["jobs.rerun"]}"#)
            .map_err(|e| e.to_string())?;
        let headers = request_headers("POST", &format!("/api/v1/mcp/projects/{PA}/jobs/{B1}/rerun"), HOST, &[("authorization", &good)]);
        assert!(matches!(admit(&RequestHead::new(&headers), Some(&p), &config, 10), Admission::Admitted(_)));
        Ok(())
    }

    #[test]
    fn every_spelling_of_a_stripped_header_is_stripped() {
        for name in [
            "authorization", "cookie", "proxy-authorization", "x-original-method", "x_original_method", "X_Original-Method",
            "x-mcp-user-id", "x_mcp_user_id", "x-mcp_token_id", "X-MCP-anything-at-all-that-is-very-long-indeed",
        ] {
            assert!(is_stripped_header(name), "{name}");
        }
        for name in ["x-mcp", "x-mcpx-a", "authorization2", "x-original", "content-type", ":path", "x-request-id"] {
            assert!(!is_stripped_header(name), "{name}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 3000, ..proptest::prelude::ProptestConfig::default() })]

        /// Whatever the path, nothing is forwarded unless it is canonical,
        /// every id in it is a lowercase UUID, and the upstream path stays
        /// under the project it names (no dot segment, no escape, no query
        /// on writes).
        #[test]
        fn only_canonical_paths_with_uuid_ids_are_forwarded(
            segs in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just("projects".to_string()),
                    proptest::prelude::Just("jobs".to_string()),
                    proptest::prelude::Just("builds".to_string()),
                    proptest::prelude::Just("log".to_string()),
                    proptest::prelude::Just(PA.to_string()),
                    proptest::prelude::Just(B1.to_string()),
                    proptest::prelude::Just(PA.to_uppercase()),
                    proptest::prelude::Just("..".to_string()),
                    proptest::prelude::Just(".".to_string()),
                    proptest::prelude::Just(String::new()),
                    "[a-z0-9%._~;:@!$&'()*+,=-]{1,6}",
                    "\\PC{1,3}",
                ],
                0..6,
            ),
            query in proptest::option::of("[ -~]{0,12}"),
            method in proptest::prop_oneof![proptest::prelude::Just("GET"), proptest::prelude::Just("POST"), proptest::prelude::Just("DELETE")],
        ) {
            let p = policy().map_err(proptest::test_runner::TestCaseError::fail)?;
            let good = format!("Bearer {}", tok(2));
            let mut path = format!("/api/v1/mcp/{}", segs.join("/"));
            if let Some(q) = &query {
                path.push('?');
                path.push_str(q);
            }
            let decided = decide(&p, HOST, method, &path, &[("authorization", &good)], 10, Ownership::Confirmed)
                .map_err(proptest::test_runner::TestCaseError::fail)?;
            if let Ok(f) = decided {
                let before_query = path.split('?').next().unwrap_or_default();
                proptest::prop_assert!(crate::path::check_canonical(&before_query["/api/v1/mcp".len()..]).is_ok(), "{}", path);
                for seg in before_query.split('/').skip(4) {
                    proptest::prop_assert!(!(seg.len() == 36 && seg.contains('-')) || crate::path::is_uuid(seg), "{}", path);
                }
                let upstream = f.path.split('?').next().unwrap_or_default();
                proptest::prop_assert!(upstream.starts_with("/api/v1/projects"), "{}", f.path);
                proptest::prop_assert!(!upstream.split('/').any(|s| s == ".." || s == "."), "{}", f.path);
                proptest::prop_assert!(!upstream.contains('%') && !upstream.contains("//"), "{}", f.path);
                if method == "POST" {
                    proptest::prop_assert!(!f.path.contains('?'), "{}", f.path);
                }
            }
        }
    }
}
