//! Redis Cluster as a supported configuration, against a real cluster this test owns:
//! three masters (child `redis-server` processes with `--cluster-enabled yes` on free
//! ports, joined with `redis-cli --cluster create`), and the store over redis-rs's async
//! `ClusterConnection`. Checked: the contract suite, entries spread over the nodes by
//! their hash tag, `SCRIPT FLUSH` on every node mid-run, and the layer's no-lost-update
//! rule. Needs `redis-server` and `redis-cli` (5 or newer) on PATH: without them the tests
//! print a skip line and pass, except under `CI=true`, where they fail.

mod redis_support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, SystemTime},
};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, Response, StatusCode},
    routing::get,
    Router,
};
use redis::{
    aio::MultiplexedConnection, cluster::ClusterClient, cluster_async::ClusterConnection,
    AsyncCommands, ErrorKind, ServerErrorKind, Value,
};
use redis_support::{call, ci};
use tokio::sync::Barrier;
use tower_precondition::{
    store::{
        redis::COMPARE_AND_SET_SCRIPT,
        testing::{committed, run_contract_suite},
        AtomicVersionStore, CasOutcome, Entry, RedisStore,
    },
    PreconditionLayer,
};

/// How many masters the local cluster has.
const MASTERS: usize = 3;

/// A local Redis Cluster of [`MASTERS`] masters and no replicas, without persistence.
/// Dropping it kills every node and removes its directory.
struct LocalCluster {
    nodes: Vec<Child>,
    ports: [u16; MASTERS],
    dir: PathBuf,
}

impl LocalCluster {
    /// Starts the nodes, creates the cluster and waits (bounded) until every node says
    /// `cluster_state:ok`. `None` (skip; a failure under CI) when `redis-server` or
    /// `redis-cli` is missing or too old for `redis-cli --cluster`.
    fn start() -> Option<Self> {
        if !(supports_cluster("redis-server") && supports_cluster("redis-cli")) {
            assert!(
                !ci(),
                "CI=true but redis-server with cluster support not found"
            );
            eprintln!("skipped: redis-server with cluster support not found");
            return None;
        }
        let ports = free_cluster_ports();
        let dir = std::env::temp_dir().join(format!(
            "tp-redis-cluster-{}-{}",
            std::process::id(),
            ports[0]
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // The guard exists before the first spawn, so a failed start kills what it began.
        let mut cluster = Self {
            nodes: Vec::new(),
            ports,
            dir,
        };
        for port in ports {
            let log = std::fs::File::create(cluster.log_path(port)).expect("node log");
            let node = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
                .args(["--daemonize", "no", "--dir"])
                .arg(&cluster.dir)
                .stdout(log)
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            cluster.nodes.push(node);
        }
        for port in ports {
            let up = (0..200).any(|_| {
                let pong = cli(port, &["PING"]).is_some_and(|out| out.trim() == "PONG");
                if !pong {
                    std::thread::sleep(Duration::from_millis(25));
                }
                pong
            });
            assert!(up, "node {port} did not start:\n{}", cluster.log(port));
        }

        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let create = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            create.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&create.stdout),
            String::from_utf8_lossy(&create.stderr)
        );

        let ready = |port: u16| {
            cli(port, &["CLUSTER", "INFO"]).is_some_and(|info| {
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{MASTERS}"))
            })
        };
        let all_ready = (0..400).any(|_| {
            let ok = ports.iter().all(|&port| ready(port));
            if !ok {
                std::thread::sleep(Duration::from_millis(50));
            }
            ok
        });
        assert!(all_ready, "the cluster did not reach cluster_state:ok");
        Some(cluster)
    }

    fn log_path(&self, port: u16) -> PathBuf {
        self.dir.join(format!("node-{port}.log"))
    }

    fn log(&self, port: u16) -> String {
        std::fs::read_to_string(self.log_path(port)).unwrap_or_default()
    }

    /// A redis-rs cluster connection seeded with every node.
    async fn connection(&self) -> ClusterConnection {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        ClusterClient::builder(nodes)
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(2))
            .build()
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("connect to the cluster")
    }

    /// A plain connection to one node, to look behind the cluster connection's back.
    async fn node(&self, port: u16) -> MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to a node")
    }

    /// The port of the master that serves `redis_key`'s slot, by `CLUSTER KEYSLOT`
    /// and `CLUSTER SLOTS`.
    async fn owner(&self, redis_key: &str) -> u16 {
        let mut node = self.node(self.ports[0]).await;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(redis_key)
            .query_async(&mut node)
            .await
            .expect("CLUSTER KEYSLOT");
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut node)
            .await
            .expect("CLUSTER SLOTS");
        slot_ranges(slots)
            .into_iter()
            .find(|&(start, end, _)| (start..=end).contains(&slot))
            .map(|(_, _, port)| port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// Resource keys `/items/0`, `/items/1`, ... grouped by the node that serves their
    /// entry, `per_node` of them for every node.
    async fn keys_on_every_node<C>(
        &self,
        store: &RedisStore<C>,
        per_node: usize,
    ) -> BTreeMap<u16, Vec<String>> {
        let mut by_node: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for i in 0..1000 {
            let key = format!("/items/{i}");
            let owner = self.owner(&store.redis_key(&key)).await;
            let keys = by_node.entry(owner).or_default();
            if keys.len() < per_node {
                keys.push(key);
            }
            if by_node.len() == MASTERS && by_node.values().all(|k| k.len() == per_node) {
                return by_node;
            }
        }
        panic!("keys did not spread over every node: {by_node:?}");
    }

    /// `SCRIPT FLUSH` on every node directly, checking that each one forgot the script.
    async fn flush_scripts(&self) {
        for port in self.ports {
            let mut node = self.node(port).await;
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut node)
                .await
                .expect("SCRIPT FLUSH");
        }
    }

    /// Which nodes hold the compare-and-set script in their cache.
    async fn nodes_with_script(&self) -> BTreeSet<u16> {
        let sha = redis::Script::new(COMPARE_AND_SET_SCRIPT)
            .get_hash()
            .to_owned();
        let mut holding = BTreeSet::new();
        for port in self.ports {
            let mut node = self.node(port).await;
            let exists: Vec<bool> = redis::cmd("SCRIPT")
                .arg("EXISTS")
                .arg(&sha)
                .query_async(&mut node)
                .await
                .expect("SCRIPT EXISTS");
            if exists == [true] {
                holding.insert(port);
            }
        }
        holding
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `program` runs and is version 5 or newer (`redis-cli --cluster` and
/// `CLUSTER` commands as used here).
fn supports_cluster(program: &str) -> bool {
    let Ok(out) = Command::new(program).arg("--version").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    // "Redis server v=7.0.15 sha=..." or "redis-cli 7.0.15".
    let version = text
        .split_whitespace()
        .map(|word| word.trim_start_matches("v="))
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()));
    let major = version
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    out.status.success() && major.is_some_and(|m| m >= 5)
}

/// Runs `redis-cli -p port args...`; `None` if it could not connect.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.contains("Could not connect")).then_some(text)
}

/// Three consecutive ports from 7100 up (a random start per process, then onwards per
/// cluster) whose client port and cluster bus port (+10000) are both free now.
fn free_cluster_ports() -> [u16; MASTERS] {
    static NEXT: OnceLock<AtomicU16> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seed = (nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % 900;
        AtomicU16::new(u16::try_from(seed).expect("below 900") * 3)
    });
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..300 {
        let offset = next.fetch_add(MASTERS as u16, Ordering::Relaxed) % 2700;
        let base = 7100 + offset;
        let ports = [base, base + 1, base + 2];
        if ports.iter().all(|&p| free(p) && free(p + 10_000)) {
            return ports;
        }
    }
    panic!("no free ports for a local cluster between 7100 and 9800");
}

/// `(first slot, last slot, master port)` for every range of a `CLUSTER SLOTS` reply.
fn slot_ranges(reply: Value) -> Vec<(i64, i64, u16)> {
    let Value::Array(ranges) = reply else {
        panic!("CLUSTER SLOTS answered {reply:?}");
    };
    ranges
        .into_iter()
        .map(|range| match range {
            Value::Array(items) => match items.as_slice() {
                [Value::Int(start), Value::Int(end), Value::Array(master), ..] => {
                    match master.as_slice() {
                        [_, Value::Int(port), ..] => {
                            (*start, *end, u16::try_from(*port).expect("a port number"))
                        }
                        other => panic!("unexpected master in CLUSTER SLOTS: {other:?}"),
                    }
                }
                other => panic!("unexpected range in CLUSTER SLOTS: {other:?}"),
            },
            other => panic!("unexpected range in CLUSTER SLOTS: {other:?}"),
        })
        .collect()
}

/// The keys of one node under `pattern` (by `SCAN` on that node alone).
async fn keys_on_node(node: &mut MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut iter = node
        .scan_match::<_, String>(pattern)
        .await
        .expect("SCAN on a node");
    while let Some(key) = iter.next_item().await {
        keys.push(key.expect("a key"));
    }
    keys
}

fn store_on(connection: ClusterConnection, prefix: &str) -> RedisStore<ClusterConnection> {
    RedisStore::from_connection(connection).prefix(prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_connection_store_passes_the_contract() {
    let Some(cluster) = LocalCluster::start() else {
        return;
    };
    let store = store_on(cluster.connection().await, "contract:");
    run_contract_suite(Arc::new(store.clone()), "cluster").await;

    // Where the suite's entries landed: every key a node holds is one of its slots,
    // and the keys are spread over more than one node.
    let mut nodes_with_keys = 0;
    let mut total = 0;
    for port in cluster.ports {
        let mut node = cluster.node(port).await;
        let keys = keys_on_node(&mut node, "contract:*").await;
        for key in &keys {
            assert_eq!(
                cluster.owner(key).await,
                port,
                "{key:?} is stored on a node that does not serve its slot"
            );
        }
        total += keys.len();
        nodes_with_keys += usize::from(!keys.is_empty());
    }
    assert!(
        total >= 10,
        "the suite leaves entries behind, found {total}"
    );
    assert!(
        nodes_with_keys >= 2,
        "the suite's {total} keys all landed on one node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_on_every_node_work_and_live_on_the_node_of_their_slot() {
    let Some(cluster) = LocalCluster::start() else {
        return;
    };
    let store = store_on(cluster.connection().await, "spread:");
    let by_node = cluster.keys_on_every_node(&store, 4).await;
    assert_eq!(by_node.len(), MASTERS, "every master serves some keys");

    // All keys at once, so calls to the three nodes are in flight together.
    let checks = by_node
        .iter()
        .flat_map(|(&owner, keys)| keys.iter().map(move |key| (owner, key.clone())));
    let checks = checks.map(|(owner, key)| {
        let store = store.clone();
        let cluster = &cluster;
        async move {
            let v1 = committed(&format!("{key}-1"));
            let v2 = committed(&format!("{key}-2"));
            let cas = |expected: Option<Entry>, new: Option<Entry>| {
                let store = store.clone();
                let key = key.clone();
                async move {
                    store
                        .compare_and_set(&key, expected.as_ref(), new.as_ref())
                        .await
                        .expect("cas")
                }
            };
            assert_eq!(cas(None, Some(v1.clone())).await, CasOutcome::Applied);
            assert_eq!(
                store.load(&key).await.expect("load").as_ref(),
                Some(&v1),
                "{key}"
            );
            assert_eq!(
                cas(Some(v2.clone()), Some(committed("x"))).await,
                CasOutcome::Mismatch {
                    current: Some(v1.clone())
                },
                "{key}: a mismatch names the entry found"
            );
            assert_eq!(
                cas(Some(v1.clone()), Some(v2.clone())).await,
                CasOutcome::Applied
            );
            assert_eq!(
                cas(Some(v1.clone()), Some(v2.clone())).await,
                CasOutcome::Applied,
                "{key}: a replay is applied"
            );

            // The entry is on the node that serves its slot, and nowhere else.
            let redis_key = store.redis_key(&key);
            for port in cluster.ports {
                let mut node = cluster.node(port).await;
                let exists: redis::RedisResult<i64> = node.exists(&redis_key).await;
                if port == owner {
                    assert_eq!(exists.expect("EXISTS on the owner"), 1, "{key}");
                } else {
                    let error = exists.expect_err("another node redirects");
                    assert_eq!(
                        error.kind(),
                        ErrorKind::Server(ServerErrorKind::Moved),
                        "{key} on {port}: {error}"
                    );
                }
            }

            assert_eq!(cas(Some(v2.clone()), None).await, CasOutcome::Applied);
            assert_eq!(store.load(&key).await.expect("load"), None, "{key}");
        }
    });
    futures_util::future::join_all(checks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn script_flush_on_every_node_is_recovered_per_node() {
    let Some(cluster) = LocalCluster::start() else {
        return;
    };
    let store = store_on(cluster.connection().await, "flush:");
    // Per node: two keys for the rounds below and one counter for the load part.
    let by_node = cluster.keys_on_every_node(&store, 3).await;
    let keys: Vec<String> = by_node
        .values()
        .flat_map(|keys| keys[..2].iter().cloned())
        .collect();
    let all_nodes: BTreeSet<u16> = cluster.ports.into_iter().collect();

    // A fresh cluster has no scripts: the first call to each node is NOSCRIPT, resent
    // as EVAL, which caches the script on that node.
    assert!(cluster.nodes_with_script().await.is_empty());
    let mut current: Vec<Entry> = Vec::new();
    for key in &keys {
        let first = committed(&format!("{key}-0"));
        assert_eq!(
            store
                .compare_and_set(key, None, Some(&first))
                .await
                .expect("no NOSCRIPT reaches the caller"),
            CasOutcome::Applied
        );
        current.push(first);
    }
    assert_eq!(cluster.nodes_with_script().await, all_nodes);

    for round in 1..=3 {
        cluster.flush_scripts().await;
        assert!(
            cluster.nodes_with_script().await.is_empty(),
            "round {round}: every node forgot the script"
        );
        for (key, entry) in keys.iter().zip(&mut current) {
            let next = committed(&format!("{key}-{round}"));
            assert_eq!(
                store
                    .compare_and_set(key, Some(entry), Some(&next))
                    .await
                    .expect("no NOSCRIPT reaches the caller"),
                CasOutcome::Applied,
                "round {round}, {key}"
            );
            *entry = next;
        }
        assert_eq!(
            cluster.nodes_with_script().await,
            all_nodes,
            "round {round}: each node got the script back"
        );
    }

    // Under load: concurrent increments on one counter per node. Every worker stops
    // halfway while all nodes are flushed, and a flusher keeps flushing meanwhile; no
    // call may fail and no increment may be lost.
    const WORKERS: usize = 12;
    const ROUNDS: usize = 10;
    let counters: Vec<String> = by_node.values().map(|keys| keys[2].clone()).collect();
    for counter in &counters {
        store
            .compare_and_set(counter, None, Some(&committed("0")))
            .await
            .expect("cas");
    }
    let halfway = Arc::new(Barrier::new(WORKERS + 1));
    let resume = Arc::new(Barrier::new(WORKERS + 1));
    let done = Arc::new(AtomicBool::new(false));
    let flushes = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let store = store.clone();
            let counters = counters.clone();
            let (halfway, resume) = (halfway.clone(), resume.clone());
            tokio::spawn(async move {
                for round in 0..ROUNDS {
                    if round == ROUNDS / 2 {
                        halfway.wait().await;
                        resume.wait().await;
                    }
                    for counter in &counters {
                        increment(&store, counter, worker, round).await;
                    }
                }
            })
        })
        .collect();
    let flusher = {
        let (done, flushes) = (done.clone(), flushes.clone());
        let ports = cluster.ports;
        tokio::spawn(async move {
            let mut nodes = Vec::new();
            for port in ports {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}"));
                let node = client
                    .expect("url")
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect to a node");
                nodes.push(node);
            }
            while !done.load(Ordering::SeqCst) {
                for node in &mut nodes {
                    let _: () = redis::cmd("SCRIPT")
                        .arg("FLUSH")
                        .query_async(node)
                        .await
                        .expect("SCRIPT FLUSH");
                }
                flushes.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    halfway.wait().await;
    cluster.flush_scripts().await;
    resume.wait().await;
    for worker in workers {
        worker.await.expect("worker");
    }
    done.store(true, Ordering::SeqCst);
    flusher.await.expect("flusher");
    assert!(flushes.load(Ordering::SeqCst) >= 1);
    for counter in &counters {
        let last = store.load(counter).await.expect("load").expect("counter");
        assert_eq!(
            counter_of(&last),
            WORKERS * ROUNDS,
            "{counter}: every increment counted once"
        );
    }
}

/// Adds one to the counter kept in `key`'s tag (`<n>.<worker>.<round>`), retrying on
/// a mismatch.
async fn increment<C>(store: &RedisStore<C>, key: &str, worker: usize, round: usize)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let mut current = store.load(key).await.expect("load");
    loop {
        let entry = current.expect("counter exists");
        let next = committed(&format!("{}.{worker}.{round}", counter_of(&entry) + 1));
        match store
            .compare_and_set(key, Some(&entry), Some(&next))
            .await
            .expect("no NOSCRIPT reaches the caller")
        {
            CasOutcome::Applied => return,
            CasOutcome::Mismatch { current: found } => current = found,
        }
    }
}

fn counter_of(entry: &Entry) -> usize {
    let tag = entry.version().expect("committed").etag().opaque();
    tag.split('.')
        .next()
        .unwrap_or(tag)
        .parse()
        .expect("counter")
}

/// The app of the layer test: `/items/{id}` whose bodies live in the cluster at
/// `<entry key>:body`, the entry's slot, next to their versions.
#[derive(Clone)]
struct App {
    store: RedisStore<ClusterConnection>,
    writes: Arc<AtomicUsize>,
}

fn body_key(store: &RedisStore<ClusterConnection>, id: &str) -> String {
    format!("{}:body", store.redis_key(&format!("/items/{id}")))
}

async fn get_item(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response<Body>, StatusCode> {
    let mut con = app.store.connection().clone();
    let body: Option<String> = con
        .get(body_key(&app.store, &id))
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let body = body.ok_or(StatusCode::NOT_FOUND)?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(body))
        .expect("response"))
}

async fn put_item(
    State(app): State<App>,
    Path(id): Path<String>,
    body: String,
) -> Result<StatusCode, StatusCode> {
    app.writes.fetch_add(1, Ordering::SeqCst);
    let mut con = app.store.connection().clone();
    let old: Option<String> = redis::cmd("SET")
        .arg(body_key(&app.store, &id))
        .arg(body)
        .arg("GET")
        .query_async(&mut con)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    Ok(if old.is_some() {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_if_match_puts_through_the_layer_have_one_winner() {
    let Some(cluster) = LocalCluster::start() else {
        return;
    };
    let store = store_on(cluster.connection().await, "layer:");
    let app = App {
        store: store.clone(),
        writes: Arc::new(AtomicUsize::new(0)),
    };
    let router = Router::new()
        .route("/items/{id}", get(get_item).put(put_item))
        .with_state(app.clone())
        .layer(PreconditionLayer::new(store.clone()));

    // One resource on each node.
    let by_node = cluster.keys_on_every_node(&store, 1).await;
    for (node, keys) in by_node {
        let uri = &keys[0];
        let (status, _, _) = call(&router, "PUT", uri, &[], Some("first")).await;
        assert_eq!(status, StatusCode::CREATED, "{uri} on {node}");
        let (status, etag, _) = call(&router, "GET", uri, &[], None).await;
        assert_eq!(status, StatusCode::OK);
        let etag = etag.expect("a versioned resource has an ETag");

        let writes_before = app.writes.load(Ordering::SeqCst);
        let puts = (0..16).map(|i| {
            let (router, etag) = (router.clone(), etag.clone());
            let body = format!("writer-{i}");
            async move {
                let headers = [("if-match", etag.as_str())];
                let (status, _, _) = call(&router, "PUT", uri, &headers, Some(&body)).await;
                (status, body)
            }
        });
        let results = futures_util::future::join_all(puts).await;
        let winners: Vec<&String> = results
            .iter()
            .filter(|(status, _)| status.is_success())
            .map(|(_, body)| body)
            .collect();
        assert_eq!(winners.len(), 1, "{uri} on {node}: {results:?}");
        for (status, _) in &results {
            assert!(
                status.is_success()
                    || *status == StatusCode::PRECONDITION_FAILED
                    || *status == StatusCode::CONFLICT,
                "{uri}: a loser gets 412 or 409, got {status}"
            );
        }
        assert_eq!(
            app.writes.load(Ordering::SeqCst),
            writes_before + 1,
            "{uri}: only the winner's handler ran"
        );

        let (status, new_etag, body) = call(&router, "GET", uri, &[], None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body, winners[0], "{uri}: the winner's body is stored");
        assert_ne!(new_etag.as_ref(), Some(&etag), "{uri}: the version changed");
        let headers = [("if-match", etag.as_str())];
        let (status, _, _) = call(&router, "PUT", uri, &headers, Some("late")).await;
        assert_eq!(
            status,
            StatusCode::PRECONDITION_FAILED,
            "{uri}: the old ETag stays refused"
        );
    }
}
