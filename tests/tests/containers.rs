//! The container variant (issue "Containers and the mesh"): the core
//! end-to-end scenarios — authentication, isolation, forwarding, revocation —
//! with Envoy and the built filter running in a container of the Envoy
//! image, plus the images themselves: the control-plane image starts as a
//! non-root user and answers its health check, and the filter's Wasm image
//! has the single-layer `plugin.wasm` layout Istio's WasmPlugin accepts.
//!
//! Images come from `make images` (nothing is pulled). Without a Docker
//! engine every test here says why and skips — unless
//! `MCP_E2E_RUNTIME=container` asks for containers, then it fails.

use std::io::Read;
use std::time::Duration;

use base64::Engine as _;
use mcp_gateway_tests::container::{self, ContainerSpec, RunningContainer, Runtime};
use mcp_gateway_tests::envoy::wasm_path;
use mcp_gateway_tests::http::{RawRequest, RawResponse};
use mcp_gateway_tests::ports::free_port;
use mcp_gateway_tests::scratch::fresh_dir;
use mcp_gateway_tests::stack::{random_key_hex, Stack, StackOptions};
use serde_json::{json, Value};
use uuid::Uuid;

/// Whether the container variant can run; prints why not (and fails when
/// containers were asked for explicitly).
fn docker_or_skip(test: &str) -> bool {
    match container::engine() {
        Ok(_) => true,
        Err(why) if Runtime::container_required() => panic!("MCP_E2E_RUNTIME=container, but {why}"),
        Err(why) => {
            println!("SKIPPED {test}: the container variant needs a Docker engine: {why}");
            eprintln!("SKIPPED {test}: the container variant needs a Docker engine: {why}");
            false
        }
    }
}

/// A stack whose Envoy runs in a container; InfraBox checks the
/// credentials it receives the way InfraBox does.
async fn container_stack() -> Stack {
    let s = Stack::start(StackOptions { envoy_runtime: Some(Runtime::Container), enforce_auth: true, ..Default::default() })
        .await
        .expect("stack with Envoy in a container");
    assert_eq!(s.envoy.runtime(), Runtime::Container);
    s
}

fn assert_error(resp: &RawResponse, status: u16, code: &str) {
    assert_eq!(resp.status, status, "{}", resp.text());
    let v: Value = resp.json().unwrap_or_else(|e| panic!("not JSON ({e}): {}", resp.text()));
    assert_eq!(v["error"], code, "{v}");
    assert!(v["request_id"].is_string(), "{v}");
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
}

/// The claims of the `Bearer <JWT>` InfraBox received.
fn upstream_claims(headers: &[(String, String)]) -> Value {
    let auth = header(headers, "authorization");
    assert_eq!(auth.len(), 1, "exactly one Authorization upstream: {headers:?}");
    let jwt = auth[0].strip_prefix("Bearer ").expect("a bearer credential upstream");
    let payload = jwt.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("claims")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_in_a_container_accepts_issued_tokens_and_refuses_the_rest() {
    if !docker_or_skip("auth_in_a_container_accepts_issued_tokens_and_refuses_the_rest") {
        return;
    }
    let mut s = container_stack().await;

    // It is the container's Envoy that answers: the image asked for, the
    // configuration path that exists only inside the container, the version.
    let c = s.envoy.container().expect("a container");
    assert_eq!(c.image(), container::envoy_image());
    let (status, info) = s.envoy.admin_get("/server_info").unwrap();
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["command_line_options"]["config_path"], "/etc/envoy/envoy.yaml", "{info}");
    if std::env::var("MCP_ENVOY_IMAGE").is_err() {
        let version = std::env::var("ENVOY_VERSION").unwrap_or_else(|_| "1.40.0".into());
        assert!(info["version"].as_str().unwrap().contains(&format!("/{version}/")), "{}", info["version"]);
    }

    let (user, projects) = s.user_with_projects("ct-alice", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    let (_, token) = s.create_token(user, json!({}), 30).await.unwrap();
    let ok = s.wait_until_status(&token, &path, 200).await;
    assert_eq!(ok.json().unwrap()["id"], projects[0].to_string());

    s.infrabox.clear();
    let missing = s.send(RawRequest::get(&path)).await.unwrap();
    assert_error(&missing, 401, "invalid_token");
    assert_eq!(missing.header("www-authenticate"), Some(r#"Bearer realm="infrabox-mcp""#));
    let hex = &token[7..];
    for bad in [format!("ib_mcp_{}", hex.to_uppercase()), format!("{token}00"), format!("ib_mcp_{}", "0123456789abcdef".repeat(3))] {
        assert_error(&s.mcp_get(&bad, &path).await.unwrap(), 401, "invalid_token");
    }
    assert!(s.infrabox.requests().is_empty(), "a refused request reached InfraBox: {:?}", s.infrabox.requests());

    // Stopping the container takes the gateway away; its log stays
    // readable and never holds the token.
    s.envoy.stop().unwrap();
    assert!(s.send(RawRequest::get(&path)).await.is_err(), "the gateway still answers after its container stopped");
    let log = s.envoy.log_contents();
    assert!(log.contains("starting main dispatch loop"), "{log}");
    assert!(!log.contains(hex), "the Envoy container's log holds the token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_in_a_container_keeps_tokens_to_their_projects_and_paths() {
    if !docker_or_skip("isolation_in_a_container_keeps_tokens_to_their_projects_and_paths") {
        return;
    }
    let s = container_stack().await;
    let (alice, alice_projects) = s.user_with_projects("ct-iso-a", 2).await.unwrap();
    let (_, bob_projects) = s.user_with_projects("ct-iso-b", 1).await.unwrap();
    let (a, a2, b) = (alice_projects[0], alice_projects[1], bob_projects[0]);
    let (_, scoped) = s.create_token(alice, json!({a.to_string(): null}), 30).await.unwrap();
    s.wait_until_status(&scoped, &format!("/api/v1/mcp/projects/{a}"), 200).await;

    s.infrabox.clear();
    // Another of the user's own projects, outside the token's scope.
    assert_error(&s.mcp_get(&scoped, &format!("/api/v1/mcp/projects/{a2}")).await.unwrap(), 403, "project_forbidden");
    // Another user's project.
    assert_error(&s.mcp_get(&scoped, &format!("/api/v1/mcp/projects/{b}/builds")).await.unwrap(), 403, "project_forbidden");
    // The projects list only shows the token's project.
    let list = s.mcp_get(&scoped, "/api/v1/mcp/projects").await.unwrap();
    assert_eq!(list.status, 200, "{}", list.text());
    let ids: Vec<String> = list.json().unwrap().as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, vec![a.to_string()]);
    // Writes need allow_trigger.
    let trigger = s
        .send(RawRequest::post(&format!("/api/v1/mcp/projects/{a}/trigger")).header("Authorization", &format!("Bearer {scoped}")).json(&json!({"branch_or_sha": "main"})))
        .await
        .unwrap();
    assert_error(&trigger, 403, "write_forbidden");
    // The MCP token anywhere else: refused, never forwarded.
    for (name, value) in [("Authorization", format!("bearer {scoped}")), ("Cookie", format!("token={scoped}"))] {
        let r = s.send(RawRequest::get(&format!("/api/v1/projects/{a}")).header(name, &value)).await.unwrap();
        assert_error(&r, 403, "mcp_token_not_accepted");
    }
    let forwarded: Vec<_> = s.infrabox.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(forwarded, vec!["/api/v1/projects/".to_string()], "only the (filtered) list went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_in_a_container_maps_the_request_and_swaps_the_credential() {
    if !docker_or_skip("forward_in_a_container_maps_the_request_and_swaps_the_credential") {
        return;
    }
    let s = container_stack().await;
    let (user, projects) = s.user_with_projects("ct-fwd", 1).await.unwrap();
    let p = projects[0];
    let (token_id, token) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &format!("/api/v1/mcp/projects/{p}"), 200).await;

    s.infrabox.clear();
    let r = s
        .send(
            RawRequest::get(&format!("/api/v1/mcp/projects/{p}/builds?page=2"))
                .header("Authorization", &format!("Bearer {token}"))
                .header("Cookie", "token=eyJsession")
                .header("X-Mcp-User-Id", "spoofed")
                .header("X-Original-Method", "DELETE"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.infrabox.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let up = &seen[0];
    assert_eq!((up.method.as_str(), up.path.as_str()), ("GET", format!("/api/v1/projects/{p}/builds/?page=2").as_str()));
    // InfraBox (enforcing global-token auth) accepted the user's own read
    // credential; nothing of the client's credentials went along.
    let claims = upstream_claims(&up.headers);
    assert_eq!(claims["type"], "global", "{claims}");
    assert!(header(&up.headers, "cookie").is_empty(), "{:?}", up.headers);
    assert!(header(&up.headers, "x-original-method").is_empty(), "{:?}", up.headers);
    assert!(up.headers.iter().all(|(_, v)| !v.contains(&token[7..]) && v != "spoofed"), "{:?}", up.headers);
    assert_eq!(header(&up.headers, "x-mcp-token-id"), vec![token_id.as_str()]);
    assert_eq!(header(&up.headers, "x-mcp-user-id"), vec![user.to_string().as_str()]);

    // Non-MCP traffic passes through untouched; /internal is never routed.
    s.infrabox.clear();
    let plain = "/api/v1/settings?x=1";
    let r = s.send(RawRequest::get(plain).header("Authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.infrabox.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, plain);
    assert_eq!(header(&seen[0].headers, "authorization"), vec!["Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"]);
    s.infrabox.clear();
    let r = s.send(RawRequest::post("/internal/api/job/consoleupdate").body("{}")).await.unwrap();
    assert_eq!(r.status, 404);
    assert!(s.infrabox.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_in_a_container_reaches_the_edge() {
    if !docker_or_skip("revoke_in_a_container_reaches_the_edge") {
        return;
    }
    let s = container_stack().await;
    let (user, projects) = s.user_with_projects("ct-revoke", 1).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    let (id, token) = s.create_token(user, json!({}), 30).await.unwrap();
    let (_, other) = s.create_token(user, json!({}), 30).await.unwrap();
    s.wait_until_status(&token, &path, 200).await;
    s.wait_until_status(&other, &path, 200).await;
    let del = s.token_api(user, "DELETE", &format!("/api/v1/mcp/tokens/{id}"), None).await.unwrap();
    assert!(del.status < 300, "{}", del.text());
    let r = s.wait_until_status(&token, &path, 401).await;
    assert_error(&r, 401, "invalid_token");
    // Only the revoked token is affected.
    assert_eq!(s.mcp_get(&other, &path).await.unwrap().status, 200);
}

/// Polls the container's log for `needle` while it runs.
fn wait_for_log(c: &RunningContainer, needle: &str, timeout: Duration) -> String {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let log = c.log_contents();
        if let Some(line) = log.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(c.is_running(), "the container exited before logging {needle:?}:\n{log}");
        assert!(std::time::Instant::now() < deadline, "no {needle:?} in the container's log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_image_starts_as_non_root_and_answers_its_health_check() {
    if !docker_or_skip("control_plane_image_starts_as_non_root_and_answers_its_health_check") {
        return;
    }
    let pg = mcp_gateway_tests::postgres::PostgresServer::shared();
    let database_url = pg.create_unique_database("cpimage").await.unwrap();
    let db = sqlx::PgPool::connect(&database_url).await.unwrap();
    mcp_gateway_tests::infrabox_db::load_infrabox_schema(&db).await.unwrap();
    let key = mcp_gateway_tests::session::SigningKey::shared();
    let snapshot_secret = format!("snap-{}", Uuid::new_v4().simple());
    let credential_key = random_key_hex();
    let (http, internal, grpc) = (free_port(), free_port(), free_port());
    let env = [
        ("DATABASE_URL", database_url.clone()),
        ("MCP_SNAPSHOT_SECRET", snapshot_secret.clone()),
        ("INFRABOX_PUBLIC_KEY_PATH", "/etc/mcp/infrabox-public.pem".into()),
        ("MCP_CREDENTIAL_KEY_PATH", "/etc/mcp/credential-key".into()),
        ("INFRABOX_URL", "http://127.0.0.1:9".into()),
        ("REDIS_URL", mcp_gateway_tests::redis::RedisServer::shared().url()),
        ("MCP_HTTP_ADDR", format!("127.0.0.1:{http}")),
        ("MCP_INTERNAL_ADDR", format!("127.0.0.1:{internal}")),
        ("MCP_GRPC_ADDR", format!("127.0.0.1:{grpc}")),
    ];
    let spec = ContainerSpec {
        role: "control-plane".into(),
        image: container::control_plane_image(),
        cmd: Vec::new(),
        env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        files: vec![
            ("/etc/mcp/infrabox-public.pem".into(), key.public_pem().as_bytes().to_vec(), 0o444),
            ("/etc/mcp/credential-key".into(), credential_key.clone().into_bytes(), 0o444),
        ],
    };
    let c = RunningContainer::start(spec, &fresh_dir("cp-image").join("control-plane.log")).unwrap();
    let line = wait_for_log(&c, "listening http=", Duration::from_secs(30));
    assert!(line.contains(&format!("internal=127.0.0.1:{internal}")), "{line}");

    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], internal));
    let health = RawRequest::get("/healthz").send(addr, Duration::from_secs(5)).await.unwrap();
    assert_eq!(health.status, 200, "{}", health.text());
    // The snapshot needs the secret: the image runs the real control plane.
    let anonymous = RawRequest::get("/v1/snapshot").send(addr, Duration::from_secs(5)).await.unwrap();
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    let snap = RawRequest::get("/v1/snapshot")
        .header("Authorization", &format!("Bearer {snapshot_secret}"))
        .send(addr, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(snap.status, 200, "{}", snap.text());
    assert!(snap.json().unwrap()["version"].is_string() || snap.json().unwrap()["version"].is_number(), "{}", snap.text());

    // Its process runs as the image's non-root user.
    let pid = c.host_pid().unwrap().expect("a running control plane");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    assert!(uid.split_whitespace().all(|u| u == "65532"), "Uid line: {uid}");

    let log = c.log_contents();
    for secret in [&snapshot_secret, &credential_key] {
        assert!(!log.contains(secret.as_str()), "the control plane's log holds a secret");
    }
}

#[test]
fn wasm_plugin_image_is_a_single_layer_holding_plugin_wasm() {
    if !docker_or_skip("wasm_plugin_image_is_a_single_layer_holding_plugin_wasm") {
        return;
    }
    let image = container::wasm_plugin_image();
    let archive = container::engine::save_image(&image).unwrap_or_else(|e| panic!("docker save {image}: {e:#} (run `make images`)"));
    let mut files = std::collections::BTreeMap::new();
    for entry in tar::Archive::new(archive.as_slice()).entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        files.insert(path, data);
    }
    let manifest: Value = serde_json::from_slice(files.get("manifest.json").expect("manifest.json in docker save")).unwrap();
    let manifest = manifest.as_array().and_then(|m| m.first()).expect("one image");
    let layers = manifest["Layers"].as_array().expect("Layers");
    assert_eq!(layers.len(), 1, "a compat Wasm image has exactly one layer: {manifest}");
    let layer = files.get(layers[0].as_str().unwrap()).expect("the layer in the archive");
    let mut content = Vec::new();
    for entry in tar::Archive::new(layer.as_slice()).entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        if entry.header().entry_type().is_file() {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            content.push((path, data));
        }
    }
    let names: Vec<&str> = content.iter().map(|(p, _)| p.trim_start_matches("./")).collect();
    assert_eq!(names, vec!["plugin.wasm"], "the layer must hold plugin.wasm and nothing else");
    let built = std::fs::read(wasm_path()).unwrap();
    assert!(content[0].1 == built, "{image} holds another build of the filter than {}: run `make images`", wasm_path().display());
    assert_eq!(&content[0].1[..4], b"\0asm");
}
