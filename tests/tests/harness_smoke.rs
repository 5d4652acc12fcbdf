//! Smoke test of the harness itself: shared Postgres and Redis, InfraBox's
//! schema and seed rows, and the fake InfraBox enforcing auth like InfraBox.

use std::time::Duration;

use mcp_gateway_tests::fake_infrabox::{FakeInfraBox, FakeInfraBoxConfig};
use mcp_gateway_tests::http::RawRequest;
use mcp_gateway_tests::infrabox_db;
use mcp_gateway_tests::postgres::PostgresServer;
use mcp_gateway_tests::redis::RedisServer;
use mcp_gateway_tests::session::SigningKey;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

const T: Duration = Duration::from_secs(10);

fn redis_ping(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect redis");
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"PING\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_infrabox_enforces_collaborators_and_scope_push() {
    let pg = tokio::task::spawn_blocking(PostgresServer::shared).await.unwrap();
    let redis = tokio::task::spawn_blocking(RedisServer::shared).await.unwrap();
    assert_eq!(redis_ping(redis.port()), "+PONG\r\n");
    let key = tokio::task::spawn_blocking(SigningKey::shared).await.unwrap();

    let url = pg.create_unique_database("smoke").await.unwrap();
    let pool = PgPoolOptions::new().max_connections(4).connect(&url).await.unwrap();
    infrabox_db::load_infrabox_schema(&pool).await.unwrap();
    infrabox_db::load_infrabox_schema(&pool).await.unwrap(); // idempotent

    let alice = infrabox_db::create_user(&pool, "alice").await.unwrap();
    let bob = infrabox_db::create_user(&pool, "bob").await.unwrap();
    let alpha = infrabox_db::create_project(&pool, "alpha", "upload", false).await.unwrap();
    let beta = infrabox_db::create_project(&pool, "beta", "github", false).await.unwrap();
    infrabox_db::add_collaborator(&pool, alice, alpha, "Owner").await.unwrap();
    infrabox_db::add_collaborator(&pool, bob, beta, "Developer").await.unwrap();

    let fake = FakeInfraBox::start(FakeInfraBoxConfig {
        database_url: url.clone(),
        public_key_pem: key.public_pem().to_string(),
        bind: "127.0.0.1:0".parse().unwrap(),
        enforce_auth: true,
    })
    .await
    .unwrap();
    let addr = fake.addr();
    let alice_session = key.sign_user_session(alice);

    // A user session lists only its collaborator projects.
    let resp = RawRequest::get("/api/v1/projects/")
        .header("Cookie", &format!("token={alice_session}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let list = resp.json().unwrap();
    assert_eq!(list, json!([{"id": alpha, "name": "alpha", "type": "upload", "public": false, "userrole": "Owner"}]));

    // No token → 401 like an OPA deny.
    let resp = RawRequest::get("/api/v1/projects/").send(addr, T).await.unwrap();
    assert_eq!(resp.status, 401);
    assert_eq!(resp.json().unwrap()["status"], 401);

    // Alice mints two global tokens through the API.
    let mut tokens = Vec::new();
    for push in [false, true] {
        let resp = RawRequest::post("/api/v1/user/global-tokens")
            .header("Authorization", &format!("bearer {alice_session}"))
            .json(&json!({"description": format!("mcp push={push}"), "scope_push": push, "scope_pull": true, "expires_days": 30}))
            .send(addr, T)
            .await
            .unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        let body = resp.json().unwrap();
        assert_eq!(body["scope_push"], push);
        assert_eq!(body["expires_days"], 30);
        tokens.push(body["token"].as_str().unwrap().to_string());
    }
    let (read_token, write_token) = (tokens[0].clone(), tokens[1].clone());

    // Reads with the read token; builds from the in-memory model.
    let (build, jobs) = fake.add_build(alpha).await.unwrap();
    let resp = RawRequest::get(&format!("/api/v1/projects/{alpha}/builds/"))
        .header("Authorization", &format!("Bearer {read_token}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json().unwrap(), json!([{"id": build, "build_number": 1, "restart_counter": 1}]));

    assert!(fake.set_console(jobs[1], vec![b'x'; 3 * 1024 * 1024]));
    let resp = RawRequest::get(&format!("/api/v1/projects/{alpha}/jobs/{}/console", jobs[1]))
        .header("Authorization", &format!("token {read_token}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), 3 * 1024 * 1024);
    assert!(resp.header("content-type").unwrap().starts_with("text/plain"));

    let resp = RawRequest::get(&format!("/api/v1/projects/{alpha}/jobs/{}/archive/download?filename=report.xml", jobs[1]))
        .header("Authorization", &format!("Bearer {read_token}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp.text().starts_with("<testsuite"));

    // Like InfraBox (`WHERE project_id AND id`): an unknown build is an
    // empty list, not a 404.
    let missing = uuid::Uuid::new_v4();
    let resp = RawRequest::get(&format!("/api/v1/projects/{alpha}/builds/{missing}"))
        .header("Authorization", &format!("Bearer {read_token}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json().unwrap(), json!([]));
    // A missing archive file is InfraBox's 404.
    let resp = RawRequest::get(&format!("/api/v1/projects/{alpha}/jobs/{}/archive/download?filename=nope", jobs[1]))
        .header("Authorization", &format!("Bearer {read_token}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 404);
    assert_eq!(resp.json().unwrap()["status"], 404);

    // scope_push=false → 403 on trigger and on GET restart; scope_push=true succeeds.
    let trigger = |token: &str| {
        RawRequest::post(&format!("/api/v1/projects/{alpha}/trigger"))
            .header("Authorization", &format!("Bearer {token}"))
            .json(&json!({"branch_or_sha": "main"}))
    };
    let resp = trigger(&read_token).send(addr, T).await.unwrap();
    assert_eq!(resp.status, 403, "{}", resp.text());
    let resp = RawRequest::get(&format!("/api/v1/projects/{alpha}/builds/{build}/restart"))
        .header("Authorization", &format!("Bearer {read_token}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 403);
    let resp = trigger(&write_token).send(addr, T).await.unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json().unwrap();
    assert_eq!(body["message"], "Build triggered");
    assert_eq!(body["data"]["build"]["build_number"], 2);
    assert_eq!(body["data"]["build"]["restartCounter"], 1);
    // Rerun with a global token: InfraBox master answers 500 (§8); with
    // the user's session it works.
    let resp = RawRequest::get(&format!("/api/v1/projects/{alpha}/jobs/{}/rerun", jobs[1]))
        .header("Authorization", &format!("Bearer {write_token}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 500);
    let resp = RawRequest::get(&format!("/api/v1/projects/{alpha}/jobs/{}/rerun", jobs[1]))
        .header("Authorization", &format!("Bearer {alice_session}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json().unwrap()["status"], 200);

    // A non-collaborator is refused: Bob on alpha, Alice's token on beta.
    let bob_session = key.sign_user_session(bob);
    let resp = RawRequest::get(&format!("/api/v1/projects/{alpha}"))
        .header("Authorization", &format!("Bearer {bob_session}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 401);
    let resp = RawRequest::get(&format!("/api/v1/projects/{beta}/jobs/"))
        .header("Authorization", &format!("Bearer {write_token}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 401);

    // Collaborator membership is live: removing Alice from alpha revokes the token's access.
    infrabox_db::remove_collaborator(&pool, alice, alpha).await.unwrap();
    let resp = RawRequest::get(&format!("/api/v1/projects/{alpha}"))
        .header("Authorization", &format!("Bearer {read_token}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 401);

    // The catch-all answers unknown paths.
    let resp = RawRequest::get("/api/v1/mcp/projects").header("Authorization", "bearer ib_mcp_x").send(addr, T).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json().unwrap(), json!({"fake": "infrabox", "method": "GET", "path": "/api/v1/mcp/projects"}));

    // Every request was recorded, in order, with headers and bodies; the
    // inspection endpoint is not.
    let recorded = fake.requests();
    assert_eq!(recorded.len(), 18, "{:#?}", recorded.iter().map(|r| &r.path).collect::<Vec<_>>());
    assert_eq!(recorded[0].path, "/api/v1/projects/");
    assert!(recorded[0].header("cookie").unwrap().starts_with("token="));
    assert_eq!(recorded.last().unwrap().header("authorization"), Some("bearer ib_mcp_x"));
    assert!(recorded.windows(2).all(|w| w[0].received_at_ms <= w[1].received_at_ms));
    let triggers = fake.requests_matching(&format!("/api/v1/projects/{alpha}/trigger"));
    assert_eq!(triggers.len(), 2);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&triggers[0].body).unwrap()["branch_or_sha"], "main");
    // The recorder is on a listener of its own; the API port has no such path.
    let recorder = fake.recorder_addr();
    assert_ne!(recorder, addr);
    let via_http = RawRequest::get("/__fake/requests").send(recorder, T).await.unwrap();
    let parsed: Vec<mcp_gateway_tests::fake_infrabox::RecordedRequest> = serde_json::from_slice(&via_http.body).unwrap();
    assert_eq!(parsed, recorded);
    let on_api = RawRequest::get("/__fake/requests").send(addr, T).await.unwrap();
    assert!(!on_api.text().contains("received_at_ms"), "the recorder answered on the API port: {}", on_api.text());
    fake.clear();
    assert_eq!(RawRequest::new("DELETE", "/__fake/requests").send(recorder, T).await.unwrap().status, 204);
    assert!(fake.requests().is_empty());

    // Revoking a global token through the API.
    let resp = RawRequest::new("DELETE", &format!("/api/v1/user/global-tokens/{}", uuid::Uuid::new_v4()))
        .header("Authorization", &format!("Bearer {alice_session}"))
        .send(addr, T)
        .await
        .unwrap();
    assert_eq!(resp.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_infrabox_without_enforcement_passes_everything() {
    let pg = tokio::task::spawn_blocking(PostgresServer::shared).await.unwrap();
    let key = tokio::task::spawn_blocking(SigningKey::shared).await.unwrap();
    let url = pg.create_unique_database("open").await.unwrap();
    let pool = PgPoolOptions::new().max_connections(2).connect(&url).await.unwrap();
    infrabox_db::load_infrabox_schema(&pool).await.unwrap();
    let project = infrabox_db::create_project(&pool, "gamma", "test", false).await.unwrap();
    let fake = FakeInfraBox::start(FakeInfraBoxConfig {
        database_url: url,
        public_key_pem: key.public_pem().to_string(),
        bind: "127.0.0.1:0".parse().unwrap(),
        enforce_auth: false,
    })
    .await
    .unwrap();
    let resp = RawRequest::get(&format!("/api/v1/projects/{project}")).send(fake.addr(), T).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json().unwrap()["name"], "gamma");
    let resp = RawRequest::post(&format!("/api/v1/projects/{project}/builds/")).send(fake.addr(), T).await.unwrap();
    assert_eq!(resp.status, 405);
    let resp = RawRequest::get("/dashboard/").send(fake.addr(), T).await.unwrap();
    assert_eq!(resp.json().unwrap()["fake"], "infrabox");
    assert_eq!(fake.requests().len(), 3);
}

#[test]
fn redis_can_be_stopped_and_restarted_on_the_same_port() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path()).unwrap();
    let port = redis.port();
    assert_eq!(redis_ping(port), "+PONG\r\n");
    redis.stop().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    redis.restart().unwrap();
    assert_eq!(redis.port(), port);
    assert_eq!(redis_ping(port), "+PONG\r\n");
    assert!(redis.url().ends_with(&format!(":{port}/")));
}

#[test]
fn postgres_shared_instance_is_reused() {
    let a = PostgresServer::shared() as *const _;
    let b = PostgresServer::shared() as *const _;
    assert_eq!(a, b);
    assert!(PostgresServer::shared().admin_url().starts_with("postgres://postgres@127.0.0.1:"));
    assert!(PostgresServer::shared().data_dir().ends_with("postgres/data"));
}
