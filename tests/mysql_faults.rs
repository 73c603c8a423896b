//! A MariaDB server stopped and restarted under a running `axum_mysql` example: while
//! it is down every write (and read) gets `503` with `Retry-After`, never a `2xx`;
//! once it is back, writes recover without restarting the example, and no version
//! repeats.
//!
//! The server is a private one (`mariadb-install-db` into a temp dir, its own port),
//! never the shared server of `MYSQL_URL`; the test runs when `MYSQL_URL` is set (the
//! run has MariaDB) and the MariaDB server binaries are installed.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use http::{header, StatusCode};
use serde_json::json;

#[path = "common/items_contract.rs"]
mod items_contract;
use items_contract::{ExampleServer, HttpClient, Reply};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A private MariaDB server in a temp dir; killed and removed on drop.
struct TempMariaDb {
    dir: PathBuf,
    port: u16,
    server: Option<Child>,
}

impl TempMariaDb {
    fn start() -> Option<Self> {
        let found = ["mariadb-install-db", "mariadbd", "mariadb"]
            .iter()
            .all(|bin| {
                Command::new("sh")
                    .args(["-c", &format!("command -v {bin}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
        if !found {
            assert!(!ci(), "CI=true but the MariaDB server binaries are missing");
            eprintln!("skipped: no MariaDB server binaries (mariadb-install-db, mariadbd)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "tower-precondition-mariadb-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if is_root() {
            install.arg("--user=root");
        }
        let output = install.output().expect("run mariadb-install-db");
        assert!(
            output.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut db = Self {
            dir,
            port: free_port(),
            server: None,
        };
        db.start_server();
        let created = Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-h127.0.0.1"])
            .arg(format!("-P{}", db.port))
            .args(["-e", "CREATE DATABASE IF NOT EXISTS tp"])
            .status()
            .expect("run mariadb");
        assert!(created.success(), "CREATE DATABASE failed");
        Some(db)
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/tp", self.port)
    }

    /// Starts the server (again) and waits until it accepts connections.
    fn start_server(&mut self) {
        let mut command = Command::new("mariadbd");
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!(
                "--log-error={}",
                self.dir.join("error.log").display()
            ))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--innodb-buffer-pool-size=32M",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if is_root() {
            command.arg("--user=root");
        }
        self.server = Some(command.spawn().expect("start mariadbd"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ping = Command::new("mariadb")
                .args(["--no-defaults", "-uroot", "-h127.0.0.1"])
                .arg(format!("-P{}", self.port))
                .args(["-e", "SELECT 1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run mariadb");
            if ping.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the private MariaDB did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the server (SIGKILL: the connections drop as in a crash) and waits.
    fn stop_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Drop for TempMariaDb {
    fn drop(&mut self) {
        self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn assert_unavailable(reply: &Reply, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what} while the database is down: {reply:?}"
    );
    assert_eq!(
        reply.header(header::RETRY_AFTER).as_deref(),
        Some("1"),
        "{what}"
    );
    assert!(reply.is_problem_json(), "{what}: a problem+json body");
    assert!(reply.etag().is_none(), "{what}: no validators");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(tp_mysql), ignore = "set MYSQL_URL to run")]
async fn writes_get_503_while_mariadb_is_down_and_recover_after() {
    if std::env::var("MYSQL_URL").map_or(true, |v| v.is_empty()) {
        assert!(!ci(), "CI=true but MYSQL_URL is not set");
        eprintln!("skipped: set MYSQL_URL to run");
        return;
    }
    let Some(mut db) = TempMariaDb::start() else {
        return;
    };
    let url = db.url();
    let server = ExampleServer::start("axum_mysql", &[("DATABASE_URL", &url)]).await;
    let client = HttpClient::for_server(&server);

    let path = "/items/faulty";
    let created = client.put(path, &[], &json!({"n": 1})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let before = created.etag().expect("an ETag");

    db.stop_server();
    for n in 0..3 {
        let body = json!({ "n": 100 + n });
        let put = client.put(path, &[], &body).await;
        assert_unavailable(&put, "an unconditional PUT");
        let conditional = client
            .put(path, &[(header::IF_MATCH, &before)], &body)
            .await;
        assert_unavailable(&conditional, "a conditional PUT");
        let patch = client
            .patch(path, &[(header::IF_MATCH, &before)], "{\"m\":1}")
            .await;
        assert_unavailable(&patch, "a PATCH");
        let delete = client.delete(path, &[(header::IF_MATCH, &before)]).await;
        assert_unavailable(&delete, "a DELETE");
        let get = client.get(path, &[]).await;
        assert_unavailable(&get, "a GET");
    }

    db.start_server();
    // The pool reconnects by itself: writes recover within seconds, and until then
    // answer 503, never a 2xx that did not happen.
    let deadline = Instant::now() + Duration::from_secs(30);
    let recovered = loop {
        let reply = client
            .put(path, &[(header::IF_MATCH, &before)], &json!({"n": 2}))
            .await;
        match reply.status {
            StatusCode::OK => break reply,
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("unexpected {other} while recovering: {reply:?}"),
        }
        assert!(Instant::now() < deadline, "writes did not recover in 30 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let after = recovered.etag().expect("an ETag");
    assert_ne!(after, before, "a version repeated after the restart");
    // Nothing written while the database was down: the old tag was still current, and
    // the new one now is.
    let read = client.get(path, &[]).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.json(), json!({"n": 2}));
    assert_eq!(read.etag().as_deref(), Some(after.as_str()));
    let stale = client
        .put(path, &[(header::IF_MATCH, &before)], &json!({"n": 3}))
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    let deleted = client.delete(path, &[(header::IF_MATCH, &after)]).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let again = client.put(path, &[], &json!({"n": 4})).await;
    assert_eq!(again.status, StatusCode::CREATED);
    let again = again.etag().unwrap();
    assert!(
        again != before && again != after,
        "a version repeated after a re-create"
    );
}
