//! The gateway in front of an InfraBox that already exists (issue
//! "Deploying in front of a real InfraBox"): tokens InfraBox's own token API
//! created, both install orders against InfraBox's own 00047 SQL, the key
//! forms InfraBox's setups use, InfraBox's own audit rows, the operator's
//! verification command, and `make run` on an existing InfraBox's database.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mcp_gateway_tests::control_plane::control_plane_bin;
use mcp_gateway_tests::envoy::repo_root;
use mcp_gateway_tests::fake_infrabox::{FakeInfraBox, FakeInfraBoxConfig};
use mcp_gateway_tests::http::RawRequest;
use mcp_gateway_tests::infrabox_db;
use mcp_gateway_tests::ports::free_port;
use mcp_gateway_tests::postgres::PostgresServer;
use mcp_gateway_tests::redis::RedisServer;
use mcp_gateway_tests::scratch::fresh_dir;
use mcp_gateway_tests::session::SigningKey;
use mcp_gateway_tests::stack::{random_key_hex, Stack, StackOptions};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use uuid::Uuid;

async fn database(name: &str) -> (String, PgPool) {
    let url = PostgresServer::shared().create_unique_database(name).await.unwrap();
    let pool = PgPoolOptions::new().max_connections(3).connect(&url).await.unwrap();
    infrabox_db::load_infrabox_schema(&pool).await.unwrap();
    (url, pool)
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> Option<u64> {
    let r = RawRequest::get("/metrics").send(addr, Duration::from_secs(5)).await.ok()?;
    r.text().lines().find(|l| l.starts_with(&format!("{name} "))).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// Inserts a token the way InfraBox's own token API does (same table, no
/// upstream credential); returns the secret.
async fn infrabox_made_token(db: &PgPool, user: Uuid, allow_trigger: bool) -> String {
    let mut random = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut random);
    let secret = mcp_filter_core::token::mint(&random);
    sqlx::query(
        "INSERT INTO mcp_token (token_id, token_hash, user_id, name, enabled_projects, allow_trigger, expires_at) \
         VALUES ($1, $2, $3, 'made by InfraBox', '{}', $4, (now() AT TIME ZONE 'utc') + interval '7 days')",
    )
    .bind(&secret[7..23])
    .bind(mcp_filter_core::token::hash_hex(&secret))
    .bind(user)
    .bind(allow_trigger)
    .execute(db)
    .await
    .unwrap();
    secret
}

// ---------------------------------------------------------------------------
// Item 2: tokens that predate the gateway

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_made_by_infrabox_get_their_credentials_at_the_owners_next_visit() {
    let s = Stack::start(StackOptions::default()).await.unwrap();
    let (user, projects) = s.user_with_projects("legacy", 1).await.unwrap();
    let p = projects[0];
    let reader = infrabox_made_token(&s.db, user, false).await;
    let writer = infrabox_made_token(&s.db, user, true).await;
    let path = format!("/api/v1/mcp/projects/{p}");
    // In the snapshot, but no credential: a 503 that says what to do.
    let r = s.wait_until_status(&reader, &path, 503).await;
    let body = r.json().unwrap();
    assert_eq!(body["error"], "upstream_credential_missing");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("open the token page or call GET /api/v1/mcp/tokens once with your InfraBox session"), "{message}");
    assert!(!message.contains("retry shortly"), "{message}");
    let internal = s.control_plane.internal_addr();
    // The two inserts may land in two snapshot builds: the gauge follows
    // the second one shortly after the first token is visible.
    let start = Instant::now();
    while metric(internal, "mcp_tokens_without_upstream_credential").await != Some(2) {
        assert!(start.elapsed() < Duration::from_secs(5), "the gauge never counted both tokens without a credential");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.infrabox.requests().is_empty(), "nothing was forwarded without a credential");

    // The owner opens the token page (lists tokens with the session).
    let r = s.token_api(user, "GET", "/api/v1/mcp/tokens", None).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json().unwrap().as_array().map(Vec::len), Some(2));
    s.wait_until_status(&reader, &path, 200).await;
    let trigger = format!("/api/v1/mcp/projects/{p}/trigger");
    let start = Instant::now();
    loop {
        let r = s.send(RawRequest::post(&trigger).header("Authorization", &format!("Bearer {writer}")).json(&json!({"branch_or_sha": "main"}))).await.unwrap();
        if r.status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the write credential never arrived: {}", r.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kinds: Vec<bool> = sqlx::query("SELECT scope_push FROM global_token WHERE user_id = $1 ORDER BY scope_push").bind(user).fetch_all(&s.db).await.unwrap().iter().map(|r| r.get("scope_push")).collect();
    assert_eq!(kinds, vec![false, true], "one read and one write credential minted in InfraBox");
    let start = Instant::now();
    while metric(internal, "mcp_tokens_without_upstream_credential").await != Some(0) {
        assert!(start.elapsed() < Duration::from_secs(5), "the metric did not come down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Item 3: install order, against InfraBox's own 00047 SQL

/// Runs the control plane once, to its first error or until it listens
/// (then stops it): (ready, what it printed).
fn control_plane_outcome(database_url: &str, key: &SigningKey) -> (bool, String) {
    use std::io::{BufRead, Read};
    let mut child = Command::new(control_plane_bin())
        .env("DATABASE_URL", database_url)
        .env("MCP_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("MCP_INTERNAL_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("MCP_GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("MCP_SNAPSHOT_SECRET", "install-order-0123456789")
        .env("INFRABOX_PUBLIC_KEY_PATH", key.public_path())
        .env("INFRABOX_URL", "http://127.0.0.1:9")
        .env("MCP_CREDENTIAL_KEY", random_key_hex())
        .env("REDIS_URL", RedisServer::shared().url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut printed = String::new();
    let ready = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                printed.push_str(&line);
                printed.push('\n');
                if line.contains("listening http=") {
                    break true;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => break false,
            Err(_) => {}
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    printed.push_str(&errors.join().unwrap_or_default());
    (ready, printed)
}

async fn tables(db: &PgPool) -> Vec<String> {
    sqlx::query("SELECT table_name::text AS t FROM information_schema.tables WHERE table_name LIKE 'mcp_%' ORDER BY 1")
        .fetch_all(db)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("t"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_waits_for_infrabox_00047_and_keeps_what_infrabox_made() {
    let key = SigningKey::shared();
    // Gateway first, on an InfraBox at 00045: refused, nothing created,
    // and InfraBox's own upgrade to 00047 then succeeds.
    let (url, db) = database("order-a").await;
    infrabox_db::set_infrabox_schema_version(&db, 45).await.unwrap();
    let (ready, log) = control_plane_outcome(&url, key);
    assert!(!ready, "the control plane started on an InfraBox below 00047:\n{log}");
    assert!(log.contains("upgrade InfraBox to 00047 first") && log.contains("version 45"), "{log}");
    assert!(tables(&db).await.is_empty(), "the gateway created tables InfraBox's 00047 will create");
    infrabox_db::apply_infrabox_00047(&db).await.expect("InfraBox's own 00047 must apply after the refused start");
    infrabox_db::set_infrabox_schema_version(&db, 47).await.unwrap();
    let (ready, log) = control_plane_outcome(&url, key);
    assert!(ready, "after InfraBox's 00047 the control plane must start:\n{log}");

    // InfraBox first, with a token its own API made: the gateway keeps it,
    // adds only its own columns and tables, and the token works.
    let (url, db) = database("order-b").await;
    infrabox_db::apply_infrabox_00047(&db).await.unwrap();
    infrabox_db::set_infrabox_schema_version(&db, 47).await.unwrap();
    let user = infrabox_db::create_user(&db, &format!("keeper-{}", Uuid::new_v4().simple())).await.unwrap();
    let secret = infrabox_made_token(&db, user, false).await;
    let (ready, log) = control_plane_outcome(&url, key);
    assert!(ready, "{log}");
    let all = tables(&db).await;
    for t in ["mcp_access_log", "mcp_token", "mcp_upstream_credential", "mcp_audit_stream", "mcp_audit_gap"] {
        assert!(all.contains(&t.to_string()), "{t} missing: {all:?}");
    }
    let kept: i64 = sqlx::query("SELECT count(*) AS n FROM mcp_token WHERE token_hash = $1").bind(mcp_filter_core::token::hash_hex(&secret)).fetch_one(&db).await.unwrap().get("n");
    assert_eq!(kept, 1, "InfraBox's token was kept");
    let cols: Vec<String> = sqlx::query("SELECT column_name::text AS c FROM information_schema.columns WHERE table_name = 'mcp_access_log'").fetch_all(&db).await.unwrap().iter().map(|r| r.get("c")).collect();
    for c in ["ip", "details", "route", "seq", "count"] {
        assert!(cols.contains(&c.to_string()), "{c}");
    }
    // A database without InfraBox's bookkeeping (not an InfraBox) is the
    // gateway's to set up.
    let (url, db) = database("order-c").await;
    let (ready, log) = control_plane_outcome(&url, key);
    assert!(ready, "{log}");
    assert!(tables(&db).await.contains(&"mcp_token".to_string()));
}

// ---------------------------------------------------------------------------
// Item 4: keys; item 7: InfraBox's own audit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openssh_key_works_and_infrabox_audit_survives_a_deleted_credential() {
    // InfraBox's key as its k3s setups carry it: ssh-rsa.
    let key = SigningKey::shared();
    let ssh = fresh_dir("ssh-key").join("id_rsa.pub");
    std::fs::write(&ssh, openssh_public_key(key.public_pem())).unwrap();
    let s = Stack::start(StackOptions {
        control_plane_env: vec![("INFRABOX_PUBLIC_KEY_PATH".into(), ssh.display().to_string())],
        ..StackOptions::default()
    })
    .await
    .unwrap();
    assert!(s.control_plane.log_contents().contains("listening http="));
    let (user, projects) = s.user_with_projects("audit-keep", 1).await.unwrap();
    let (token_id, token) = s.create_token(user, json!({}), 30).await.unwrap();
    let path = format!("/api/v1/mcp/projects/{}", projects[0]);
    s.wait_until_status(&token, &path, 200).await;
    for _ in 0..3 {
        assert_eq!(s.mcp_get(&token, &format!("{path}/jobs")).await.unwrap().status, 200);
    }
    let logged: Vec<Uuid> = sqlx::query("SELECT l.id FROM global_token_access_log l JOIN global_token g ON g.id = l.token_id WHERE g.user_id = $1")
        .bind(user)
        .fetch_all(&s.db)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("id"))
        .collect();
    assert!(logged.len() >= 4, "InfraBox logged the requests made with the credential ({})", logged.len());
    // The last token revoked: the credential is deleted in InfraBox (which
    // deletes its log rows with it), after the rows were copied.
    let r = s.token_api(user, "DELETE", &format!("/api/v1/mcp/tokens/{token_id}"), None).await.unwrap();
    assert_eq!(r.status, 200);
    let left: i64 = sqlx::query("SELECT count(*) AS n FROM global_token WHERE user_id = $1").bind(user).fetch_one(&s.db).await.unwrap().get("n");
    assert_eq!(left, 0, "the credential was deleted in InfraBox");
    let copied: Vec<(Uuid, String, Option<i16>, String)> = sqlx::query(
        "SELECT id, path, status_code, outcome FROM mcp_access_log WHERE user_id = $1 AND action = 'infrabox.global_token_access'",
    )
    .bind(user)
    .fetch_all(&s.db)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get("id"), r.get("path"), r.get("status_code"), r.get("outcome")))
    .collect();
    for id in &logged {
        assert!(copied.iter().any(|c| c.0 == *id), "InfraBox's row {id} was lost with the credential");
    }
    assert!(copied.iter().all(|c| c.1.starts_with("/api/v1/projects/") && c.2 == Some(200) && c.3 == "success"), "{copied:?}");
}

/// The OpenSSH `ssh-rsa` form of a PEM public key.
fn openssh_public_key(pem: &str) -> String {
    use base64::Engine;
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPublicKey::from_public_key_pem(pem).unwrap();
    let mpint = |v: Vec<u8>| if v.first().is_some_and(|b| b & 0x80 != 0) { [vec![0], v].concat() } else { v };
    let mut blob = Vec::new();
    for field in [b"ssh-rsa".to_vec(), mpint(key.e().to_bytes_be()), mpint(key.n().to_bytes_be())] {
        blob.extend((field.len() as u32).to_be_bytes());
        blob.extend(field);
    }
    format!("ssh-rsa {} infrabox@k3s\n", base64::engine::general_purpose::STANDARD.encode(blob))
}

// ---------------------------------------------------------------------------
// Item 8: the operator's verification command, and `make run` in front of
// an existing InfraBox

fn verify(gateway: &str, project: Uuid, session: &str) -> (bool, String) {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/verify-gateway.sh"))
        .arg(gateway)
        .arg(project.to_string())
        .env("MCP_VERIFY_SESSION", session)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verification_command_checks_a_deployed_gateway() {
    let s = Stack::start(StackOptions::default()).await.unwrap();
    let (user, projects) = s.user_with_projects("verify", 1).await.unwrap();
    let gateway = format!("http://{}", s.gateway());
    let (ok, out) = verify(&gateway, projects[0], &s.session(user));
    assert!(ok, "{out}");
    for step in ["created MCP token", "answered 200", "answered 403 mcp_token_not_accepted", "the edge answers 401"] {
        assert!(out.contains(step), "{step}:\n{out}");
    }
    assert!(!out.contains("ib_mcp_"), "the token must never be printed:\n{out}");
    let live: i64 = sqlx::query("SELECT count(*) AS n FROM mcp_token WHERE user_id = $1 AND revoked_at IS NULL").bind(user).fetch_one(&s.db).await.unwrap().get("n");
    assert_eq!(live, 0, "the verification token was revoked");
    // A project the user may not use: the first step fails, clearly.
    let (_, others) = s.user_with_projects("verify-other", 1).await.unwrap();
    let (ok, out) = verify(&gateway, others[0], &s.session(user));
    assert!(!ok && out.contains("FAIL: creating a token") && out.contains("project_forbidden"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_run_stands_in_front_of_an_existing_infrabox_on_its_database() {
    // "An existing InfraBox": its database at 00047, its own users and
    // projects, its API (the fake, as lenient as the real one) and its key.
    let (url, db) = database("existing").await;
    infrabox_db::apply_infrabox_00047(&db).await.unwrap();
    infrabox_db::set_infrabox_schema_version(&db, 47).await.unwrap();
    let user = infrabox_db::create_user(&db, &format!("operator-{}", Uuid::new_v4().simple())).await.unwrap();
    let project = infrabox_db::create_project(&db, "existing-project", "upload", false).await.unwrap();
    infrabox_db::add_collaborator(&db, user, project, "Owner").await.unwrap();
    let key = SigningKey::shared();
    let infrabox = FakeInfraBox::start(FakeInfraBoxConfig {
        database_url: url.clone(),
        public_key_pem: key.public_pem().to_string(),
        bind: "127.0.0.1:0".parse().unwrap(),
        enforce_auth: true,
    })
    .await
    .unwrap();
    let demo_bin = repo_root().join("target/debug/mcp-gateway-demo");
    // Without the database and the key it says exactly what it needs.
    let out = Command::new(&demo_bin).env("INFRABOX_URL", infrabox.url()).env_remove("DATABASE_URL").env_remove("INFRABOX_PUBLIC_KEY_PATH").output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && text.contains("DATABASE_URL") && text.contains("INFRABOX_PUBLIC_KEY_PATH") && text.contains("00047"), "{text}");

    let run_dir = fresh_dir("make-run-existing");
    let port = free_port();
    let mut demo = Command::new(&demo_bin)
        .env("INFRABOX_URL", infrabox.url())
        .env("DATABASE_URL", &url)
        .env("INFRABOX_PUBLIC_KEY_PATH", key.public_path())
        .env("MCP_RUN_DIR", &run_dir)
        .env("MCP_GATEWAY_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let env_file: PathBuf = run_dir.join("demo.env");
    let start = Instant::now();
    while !env_file.exists() {
        if let Ok(Some(status)) = demo.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = demo.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("make run exited ({status}):\n{err}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "make run did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, out) = verify(&format!("http://127.0.0.1:{port}"), project, &key.sign_user_session(user));
    // Stop it like Ctrl-C does.
    let _ = Command::new("kill").arg("-INT").arg(demo.id().to_string()).status();
    let _ = demo.wait();
    assert!(ok, "{out}");
    // It used InfraBox's database and its users: nothing of a demo was made.
    let users: i64 = sqlx::query(r#"SELECT count(*) AS n FROM "user""#).fetch_one(&db).await.unwrap().get("n");
    assert_eq!(users, 1, "make run must not create users in InfraBox's database");
    let minted: i64 = sqlx::query("SELECT count(*) AS n FROM mcp_token WHERE user_id = $1").bind(user).fetch_one(&db).await.unwrap().get("n");
    assert_eq!(minted, 1, "the verification token lives in InfraBox's mcp_token");
}
