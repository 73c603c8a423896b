//! The Redis backend: versions shared by every process of an app, through Redis.
//!
//! [`RedisStore`] keeps each resource's [`Entry`] in one Redis hash, and makes every
//! compare-and-set (reserve, commit, release, lease takeover: the layer builds them all
//! on [`compare_and_set`](AtomicVersionStore::compare_and_set)) **one `EVALSHA`** of a
//! small Lua script. Redis runs a script atomically, so the comparison of the whole
//! entry and the write are one step for every client of that Redis, on any machine.
//! There is no `WATCH` / `MULTI`: one round trip, no optimistic retry loop.
//!
//! ```no_run
//! use tower_precondition::{store::RedisStore, PreconditionLayer};
//!
//! # async fn run() -> Result<(), tower_precondition::StoreError> {
//! let store = RedisStore::open("redis://127.0.0.1:6379").await?.prefix("myapp:v:");
//! let layer = PreconditionLayer::new(store);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! # Connections
//!
//! [`RedisStore::open`] builds a [`ConnectionManager`], which multiplexes every call
//! over one connection and reconnects in the background when Redis goes away. Bring your
//! own with [`RedisStore::from_manager`], or any clonable async connection (a
//! `MultiplexedConnection`, a [cluster connection](#redis-cluster)) with
//! [`RedisStore::from_connection`].
//! [`RedisStore::connection`] hands the connection back, so the app can keep its own
//! data in the same Redis.
//!
//! # Round trips
//!
//! | request | Redis commands |
//! | --- | --- |
//! | read of a versioned resource | 1 (`HGETALL`) |
//! | read that gives a resource its first version | 2 (`HGETALL`, `EVALSHA`) |
//! | write (reserve, then settle) of an entry this process saw last, or of a new key | 2 (`EVALSHA`, `EVALSHA`) |
//! | write of an entry another process changed since | 3 (`EVALSHA` that mismatches, `EVALSHA`, `EVALSHA`), or `HGETALL` first when what this process saw would refuse it |
//! | write refused with `412` / `409` | 1 (`HGETALL`; or the reserve's mismatch, which answers with the entry) |
//! | a request that finds an expired lease | 1 more (`EVALSHA`: the takeover) |
//! | the layer's clock sample, at most once a second per process | 1 (`EVALSHA`) |
//!
//! A compare-and-set that loses answers with the entry it found in the same reply, so a
//! conflicting write costs no extra round trip to learn why.
//!
//! # Keys and fields
//!
//! The entry of resource key `K` lives at `<prefix>{<K>}` (default prefix
//! `"precondition:"`; see [`RedisStore::redis_key`]). The braces are a Redis Cluster
//! *hash tag*: the slot is computed from `K` alone, so an app that keeps a resource's
//! data at `<the entry's key>:<suffix>` has it in the same slot as its version, and can
//! touch both in one script or transaction. Inside the tag, `\`, `{` and `}` of `K` are
//! escaped (`\\`, `\(`, `\)`), so the tag always spans all of `K` and two different
//! keys never share an entry; the prefix is escaped the same way, so it cannot steal
//! the tag.
//!
//! | field | value |
//! | --- | --- |
//! | `etag` | the opaque tag, the exact bytes sent on the wire (obs-text included) |
//! | `modified` | last-modified, seconds since the Unix epoch, decimal |
//! | `ambiguous` | `1` if another version was committed in the same second, else `0` |
//! | `lease` | while a write is in flight: its token, 32 lowercase hex digits |
//! | `seeded` | `1` if a read, not a write, gave the version; absent otherwise |
//! | `lease` | while a write is in flight: its token, 32 lowercase hex digits |
//! | `expires` | the lease's expiry on the store's clock (below), ms, decimal; `0` for a release marker |
//!
//! A hash that is not exactly this (an unknown field, half a version, a number with a
//! leading zero, a `seeded` other than `1`, a key of another type) is a
//! [corrupt](StoreErrorKind::Corrupt) entry: the layer answers `503` rather than guess.
//!
//! # The clock
//!
//! Leases are stamped and judged by the store's clock
//! ([`clock_millis`](AtomicVersionStore::clock_millis)), never by an app host's: it is
//! [`CLOCK_SCRIPT`], run on the store's clock key `<prefix>{\clock}`
//! ([`RedisStore::clock_key`]). The script reads the server's `TIME` and answers the
//! larger of that and the highest time it answered before, which it keeps in the
//! clock key: the clock never goes backwards, even when the server's wall clock steps
//! back (it then stands still until `TIME` catches up). Because the call names one
//! fixed key, a cluster routes it to the one node that serves that key's slot, so every
//! process, and every key whatever its node, is judged by the same clock. The layer
//! samples it about once a second and extrapolates in between.
//!
//! # The script
//!
//! [`COMPARE_AND_SET_SCRIPT`] compares the stored hash, field by field and absent vs
//! present, with the expected entry; on a match it replaces the hash by the new entry
//! (or deletes it). On a mismatch it checks whether the
//! stored hash already *is* the new entry: then the call is a replay (a command re-sent
//! after it had already run) and answers "applied", never a conflict. Otherwise it
//! answers with the stored hash.
//!
//! Calls go out as `EVALSHA`. When Redis answers `NOSCRIPT` (a restart, a failover to a
//! replica that never saw the script, `SCRIPT FLUSH`), the store sends the same call
//! once more as `EVAL` with the script's source, which runs it and puts it back in the
//! cache; the caller never sees the `NOSCRIPT`. (`SCRIPT LOAD` followed by `EVALSHA`
//! would be a race: a flush in between fails the retry too.) A call that answered
//! `NOSCRIPT` did not run, so the retry cannot apply anything twice.
//!
//! # Redis Cluster
//!
//! A cluster is supported (`tests/redis_cluster.rs` runs against a local cluster of
//! three masters): give the store a redis-rs `cluster_async::ClusterConnection`, which
//! the `redis` feature enables.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use redis::cluster::ClusterClient;
//! use tower_precondition::{store::RedisStore, PreconditionLayer};
//!
//! # async fn run() -> redis::RedisResult<()> {
//! let client = ClusterClient::builder(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])
//!     .connection_timeout(Duration::from_secs(1))
//!     .response_timeout(Duration::from_secs(2))
//!     .build()?;
//! let store = RedisStore::from_connection(client.get_async_connection().await?)
//!     .prefix("myapp:v:");
//! let layer = PreconditionLayer::new(store);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! Every command names exactly one key, the entry's: `HGETALL` and the script call
//! (with the entry as its only `KEYS[1]`) go to the master of the entry's slot;
//! redis-rs follows `MOVED` / `ASK` when slots move. The clock call names the clock
//! key, so every process reads the clock of the one master that serves its slot,
//! whichever node holds the entry the lease is on. After a failover of that master,
//! its replica's clock takes over, starting from the replicated high mark (the clock
//! goes back only by what asynchronous replication lost, plus the wall-clock
//! difference between the two hosts: keep them NTP-synchronised). Each node has its own script
//! cache: the first call that reaches a node without the script gets `NOSCRIPT` from
//! that node and is resent there as `EVAL`, so a new node, a failover or a
//! `SCRIPT FLUSH` on any node costs one extra round trip to that node. The cluster
//! connection re-sends a command after an I/O error; a compare-and-set that had already
//! run is then recognised as a replay. Do not enable `read_from_replicas` for this
//! store's connection: a lagging replica would answer a read with a version that was
//! already replaced (a wrong `304`).
//!
//! # Nothing expires inside Redis
//!
//! The store never gives a key a time to live. An entry is the layer's memory of a
//! write: removing it behind the layer's back loses what the layer must know. A lease
//! whose writer crashed stands for a write of *unknown outcome*; it stays in Redis,
//! expired, until the next request for the resource (a write or a read) takes it over
//! with a fresh version, so every old `ETag` fails (invariant 3) and the resource is
//! still known to exist (`If-None-Match: *` gets `412`, as with every other store). Had
//! Redis dropped the entry instead, that create would pass. A committed version stays
//! for the same reason: forgetting it forgets that the resource exists. A crashed
//! process therefore leaves at most its in-flight leases, one small hash each, until
//! the next request for those resources. A `DELETE` that succeeds removes its entry.
//!
//! Keys written by versions of this crate that set a time to live (`lease_grace`,
//! `version_ttl`) lose it at their next compare-and-set, which rewrites the hash.
//!
//! # Durability, replication and failover: what Redis can and cannot promise
//!
//! * **No persistence** (`--save "" --appendonly no`): a Redis restart forgets every
//!   entry. No stale `ETag` can match (none matches a missing entry: `412`), and reads
//!   seed new random versions. But what the entries knew is gone: the layer no longer
//!   knows which resources exist (an `If-None-Match: *` create is then decided by the
//!   handler's own conditional insert alone), and a write that was in flight during
//!   the restart is no longer fenced by its lease (a second write can start; the first
//!   one's settle then finds its lease gone and answers `503`, not `2xx`). Handlers
//!   should make their own writes conditional (the [`Reservation`](crate::Reservation)
//!   tells them what they expect), or use persistence as below.
//! * **AOF with `appendfsync always`**: a restart loses nothing.
//! * **RDB snapshots, or AOF with `appendfsync everysec`**: a restart may load an
//!   *older* state, in which an older version is current again. An `ETag` that had
//!   already been replaced then matches once more, and a write based on it can
//!   overwrite newer data kept *outside* Redis: a lost update. Use either no
//!   persistence at all or `appendfsync always` for this store, or keep the data in the
//!   same Redis (then data and version go back in time together, consistently).
//! * **Replication is asynchronous.** A commit acknowledged by the primary may not have
//!   reached a replica when it is promoted; after the failover the older version is
//!   current again, with the same consequence as an old snapshot: safe for data kept in
//!   the same Redis (it rolls back together with its version), a possible lost update
//!   for data kept elsewhere. `WAIT` and `min-replicas-to-write` narrow that window but
//!   do not close it. If the data lives in Postgres and no update may ever be lost, use
//!   the Postgres store. Scripts are reloaded on the new primary transparently.
//! * **Eviction is not safe.** A `maxmemory` policy that evicts these keys
//!   (`allkeys-lru`, `allkeys-lfu`, `allkeys-random`) can evict a *live lease*: a second
//!   write of the same resource then starts while the first still runs, a lost update.
//!   It can evict a version too (the resource's existence is forgotten, as after a
//!   restart) or the clock key (the clock may then step back by as much as the server's
//!   wall clock did). Use `noeviction` (the default; writes then fail closed with `503`
//!   when memory is full), or a Redis of its own for this store. The `volatile-*`
//!   policies evict only keys with a time to live, which this store never sets, so they
//!   leave its keys alone.
//!
//! # Errors
//!
//! Every failure is a [`StoreError`] with the Redis error as its source: I/O, a closed
//! connection or an error reply is [unavailable](StoreErrorKind::Unavailable), an I/O
//! timeout is a [timeout](StoreErrorKind::Timeout), data that is not an entry is
//! [corrupt](StoreErrorKind::Corrupt). The layer answers `503` with `Retry-After` to a
//! write for all of them, before its handler runs; when Redis comes back, the
//! connection manager reconnects and the next request succeeds, with no restart.

use std::{
    fmt,
    sync::{Arc, LazyLock},
    time::Duration,
};

use redis::{
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    Cmd, ErrorKind, RedisError, ServerErrorKind, Value,
};

use super::{
    AtomicVersionStore, CasOutcome, Entry, Lease, LeaseToken, StoreError, StoreErrorKind, Version,
};
use crate::etag::EntityTag;

/// The Lua script behind every [`RedisStore::compare_and_set`], run with `EVALSHA`.
///
/// `KEYS[1]` is the entry's hash. `ARGV` is `n_expected, field, value, ...,
/// n_new, field, value, ...`: the expected entry's field/value pairs (none for
/// "no entry") and the new entry's pairs (none to remove the entry). The answer is
/// `{1}` when the new entry is stored (or already was: a replay), or
/// `{0, field, value, ...}` with the stored pairs when the expected entry was not found.
/// The entry never gets a time to live (see the [module docs](self#nothing-expires-inside-redis)).
pub const COMPARE_AND_SET_SCRIPT: &str = r"
local key = KEYS[1]
local current = redis.call('HGETALL', key)

-- Whether the stored hash is exactly the n field/value pairs of ARGV from index `at`.
local function holds(at, n)
  if #current ~= 2 * n then return false end
  local stored = {}
  for i = 1, #current, 2 do stored[current[i]] = current[i + 1] end
  for i = at, at + 2 * n - 1, 2 do
    if stored[ARGV[i]] ~= ARGV[i + 1] then return false end
  end
  return true
end

local expected_n = tonumber(ARGV[1])
local new_at = 2 + 2 * expected_n
local new_n = tonumber(ARGV[new_at])

if holds(2, expected_n) then
  if #current > 0 then redis.call('DEL', key) end
  if new_n > 0 then
    redis.call('HSET', key, unpack(ARGV, new_at + 1, new_at + 2 * new_n))
  end
  return {1}
end

-- Already the new entry: this call is a replay of one that ran.
if holds(new_at + 1, new_n) then return {1} end

table.insert(current, 1, 0)
return current
";

static SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(COMPARE_AND_SET_SCRIPT));

/// The Lua script behind [`RedisStore::clock_millis`], run with `EVALSHA`.
///
/// `KEYS[1]` is the store's clock key ([`RedisStore::clock_key`]). It reads the server's
/// `TIME` in milliseconds and answers the larger of that and the highest time it
/// answered before (kept in the clock key), so the clock never goes backwards, even
/// when the server's wall clock steps back.
pub const CLOCK_SCRIPT: &str = r"
-- Redis before 5 replicates scripts verbatim, which forbids a write after TIME.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stored = redis.call('GET', KEYS[1])
local last = 0
if stored then
  last = tonumber(stored)
  if not last or last < 0 or last ~= math.floor(last) then
    return redis.error_reply('the clock key holds no time')
  end
end
if last >= now then return last end
redis.call('SET', KEYS[1], string.format('%d', now))
return now
";

static CLOCK: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CLOCK_SCRIPT));

const FIELD_ETAG: &str = "etag";
const FIELD_MODIFIED: &str = "modified";
const FIELD_AMBIGUOUS: &str = "ambiguous";
const FIELD_LEASE: &str = "lease";
const FIELD_EXPIRES: &str = "expires";
const FIELD_SEEDED: &str = "seeded";

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "precondition:";

/// An [`AtomicVersionStore`] in Redis, shared by every process that uses the same Redis
/// and prefix. See the [module docs](self) for the data layout, the script, and what
/// persistence and replication can promise.
///
/// `C` is the connection: a [`ConnectionManager`] by default, or any clonable async
/// connection. Cloning the store clones the connection handle (cheap; calls are
/// multiplexed over one connection).
///
/// ```
/// use tower_precondition::store::RedisStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // Connects on first use; until Redis answers, writes get 503.
/// let store = RedisStore::open_lazy("redis://127.0.0.1:6379").unwrap().prefix("shop:");
/// assert_eq!(store.redis_key("/items/1"), "shop:{/items/1}");
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore<C = ConnectionManager> {
    connection: C,
    prefix: Arc<str>,
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore<ConnectionManager> {
    /// Connects to the Redis at `url` (`redis://host:port/db`, `rediss://` with a TLS
    /// feature of the `redis` crate, `redis+unix:///path`) with a [`ConnectionManager`].
    ///
    /// The manager answers within 2 s per command, and reconnects in the background with
    /// a back-off capped at 1 s, so service resumes about a second after Redis does.
    /// Fails if the URL is invalid or Redis cannot be reached now; use
    /// [`open_lazy`](Self::open_lazy) to start while Redis is still down.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let client = client(url)?;
        let manager = ConnectionManager::new_with_config(client, manager_config())
            .await
            .map_err(|e| store_error("could not connect to Redis", e))?;
        Ok(Self::from_manager(manager))
    }

    /// Like [`open`](Self::open), but connects on first use: a store made while Redis is
    /// down makes writes fail closed (`503`) until Redis is up. Must be called within a
    /// Tokio runtime. Fails only if the URL is invalid.
    pub fn open_lazy(url: &str) -> Result<Self, StoreError> {
        let client = client(url)?;
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config())
            .map_err(|e| store_error("could not create the Redis connection manager", e))?;
        Ok(Self::from_manager(manager))
    }

    /// A store over an existing [`ConnectionManager`] (with your own timeouts and
    /// reconnection settings).
    pub fn from_manager(manager: ConnectionManager) -> Self {
        Self::from_connection(manager)
    }

    /// The SHA1 of [`COMPARE_AND_SET_SCRIPT`], as `EVALSHA` names it.
    pub fn script_sha() -> &'static str {
        SCRIPT.get_hash()
    }
}

fn client(url: &str) -> Result<redis::Client, StoreError> {
    redis::Client::open(url).map_err(|e| store_error("invalid Redis URL", e))
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_max_delay(Duration::from_secs(1))
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over any clonable async Redis connection, e.g. a
    /// `MultiplexedConnection`. Each call clones the handle, so the connection must be
    /// one that multiplexes (a plain single-owner connection would need a pool).
    pub fn from_connection(connection: C) -> Self {
        Self {
            connection,
            prefix: escape_into(String::new(), DEFAULT_PREFIX).into(),
        }
    }
}

impl<C> RedisStore<C> {
    /// Sets the key prefix (default [`DEFAULT_PREFIX`]); use one per app and
    /// environment that shares a Redis. `{`, `}` and `\` are escaped (see the
    /// [module docs](self)).
    #[must_use]
    pub fn prefix(mut self, prefix: impl AsRef<str>) -> Self {
        self.prefix = escape_into(String::new(), prefix.as_ref()).into();
        self
    }

    /// The connection the store uses; clone it to keep the app's own data in the same
    /// Redis.
    pub fn connection(&self) -> &C {
        &self.connection
    }

    /// The Redis key of the hash that holds `key`'s entry: `<prefix>{<key>}`, with
    /// `\`, `{` and `}` escaped. Data kept at this key plus a suffix is in the same
    /// cluster slot.
    pub fn redis_key(&self, key: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + key.len() + 2);
        out.push_str(&self.prefix);
        out.push('{');
        let mut out = escape_into(out, key);
        out.push('}');
        out
    }

    /// The Redis key of the store's clock: `<prefix>{\clock}`. Every
    /// [`clock_millis`](AtomicVersionStore::clock_millis) call names it, so in a cluster
    /// they all go to the one node that serves its slot, and every process judges every
    /// lease by that node's clock. No resource key escapes to `\clock` (an escaped
    /// key's backslash is always followed by `\`, `(` or `)`), so the clock never
    /// collides with an entry, nor with data kept at an entry's key plus a suffix.
    pub fn clock_key(&self) -> String {
        format!("{}{{\\clock}}", self.prefix)
    }
}

/// Appends `text` with `\`, `{` and `}` escaped, so it can neither open nor close a
/// hash tag, and distinct texts stay distinct.
fn escape_into(mut out: String, text: &str) -> String {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '{' => out.push_str("\\("),
            '}' => out.push_str("\\)"),
            c => out.push(c),
        }
    }
    out
}

#[async_trait::async_trait]
impl<C> AtomicVersionStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut connection = self.connection.clone();
        let reply: Value = redis::cmd("HGETALL")
            .arg(self.redis_key(key))
            .query_async(&mut connection)
            .await
            .map_err(|e| store_error("HGETALL failed", e))?;
        decode_entry(hash_pairs(reply)?)
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        let reply = eval(
            &self.connection,
            &SCRIPT,
            COMPARE_AND_SET_SCRIPT,
            "compare-and-set",
            |cmd| {
                cmd.arg(1).arg(self.redis_key(key));
                push_entry(cmd, expected);
                push_entry(cmd, new);
            },
        )
        .await?;
        decode_outcome(reply)
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        let reply = eval(&self.connection, &CLOCK, CLOCK_SCRIPT, "clock", |cmd| {
            cmd.arg(1).arg(self.clock_key());
        })
        .await?;
        match reply {
            Value::Int(millis) => u64::try_from(millis)
                .ok()
                .filter(|&m| m > 0)
                .ok_or_else(|| StoreError::corrupt("the clock script answered a time before 1970")),
            _ => Err(StoreError::corrupt(
                "the clock script answered a non-integer",
            )),
        }
    }
}

/// Runs `script` with `EVALSHA` (its keys and arguments added by `args`), falling back
/// to `EVAL` with its `source` when the server has no such script.
async fn eval<C>(
    connection: &C,
    script: &redis::Script,
    source: &str,
    what: &str,
    args: impl Fn(&mut Cmd),
) -> Result<Value, StoreError>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let call = |verb: &str, script: &[u8]| {
        let mut cmd = redis::cmd(verb);
        cmd.arg(script);
        args(&mut cmd);
        cmd
    };
    let mut connection = connection.clone();
    let evalsha = call("EVALSHA", script.get_hash().as_bytes());
    match evalsha.query_async::<Value>(&mut connection).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            // Redis lost its script cache (restart, failover, SCRIPT FLUSH); the call
            // did not run. EVAL sends the script with the call, so it cannot miss the
            // cache again (as SCRIPT LOAD + EVALSHA could, if flushed in between),
            // and it puts the script back in the cache for the next EVALSHA.
            tracing::info!(
                script = what,
                "Redis had no such script; sending it with EVAL"
            );
            call("EVAL", source.as_bytes())
                .query_async::<Value>(&mut connection)
                .await
        }
        other => other,
    }
    .map_err(|e| store_error(&format!("{what} script failed"), e))
}

/// Appends an entry to a script call: its pair count, then its field/value pairs.
fn push_entry(cmd: &mut Cmd, entry: Option<&Entry>) {
    let Some(entry) = entry else {
        cmd.arg(0);
        return;
    };
    let version = entry.version();
    let lease = entry.lease();
    let seeded = version.is_some_and(Version::is_seeded);
    let pairs =
        3 * usize::from(version.is_some()) + usize::from(seeded) + 2 * usize::from(lease.is_some());
    cmd.arg(pairs);
    if let Some(version) = version {
        cmd.arg(FIELD_ETAG)
            .arg(&*version.etag().opaque_wire_bytes())
            .arg(FIELD_MODIFIED)
            .arg(version.last_modified_secs())
            .arg(FIELD_AMBIGUOUS)
            .arg(if version.last_modified_ambiguous() {
                "1"
            } else {
                "0"
            });
        // Present only when true, so entries of unseeded versions keep their layout.
        if seeded {
            cmd.arg(FIELD_SEEDED).arg("1");
        }
    }
    if let Some(lease) = lease {
        cmd.arg(FIELD_LEASE)
            .arg(&lease.token().to_hex()[..])
            .arg(FIELD_EXPIRES)
            .arg(lease.expires_at_millis());
    }
}

fn decode_outcome(reply: Value) -> Result<CasOutcome, StoreError> {
    let Value::Array(items) = reply else {
        return Err(StoreError::corrupt(
            "compare-and-set script answered a non-array",
        ));
    };
    let mut items = items.into_iter();
    match items.next() {
        Some(Value::Int(1)) if items.as_slice().is_empty() => Ok(CasOutcome::Applied),
        Some(Value::Int(0)) => {
            let current = decode_entry(flat_pairs(items.collect())?)?;
            Ok(CasOutcome::Mismatch { current })
        }
        _ => Err(StoreError::corrupt(
            "compare-and-set script answered an unknown status",
        )),
    }
}

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// The field/value pairs of an `HGETALL` reply (a flat array in RESP2, a map in RESP3).
fn hash_pairs(reply: Value) -> Result<Pairs, StoreError> {
    match reply {
        Value::Array(items) => flat_pairs(items),
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(f, v)| Ok((bytes(f)?, bytes(v)?)))
            .collect(),
        Value::Nil => Ok(Vec::new()),
        _ => Err(StoreError::corrupt(
            "HGETALL answered neither array nor map",
        )),
    }
}

fn flat_pairs(items: Vec<Value>) -> Result<Pairs, StoreError> {
    if !items.len().is_multiple_of(2) {
        return Err(StoreError::corrupt("odd number of hash fields and values"));
    }
    let mut pairs = Vec::with_capacity(items.len() / 2);
    let mut items = items.into_iter();
    while let (Some(field), Some(value)) = (items.next(), items.next()) {
        pairs.push((bytes(field)?, bytes(value)?));
    }
    Ok(pairs)
}

fn bytes(value: Value) -> Result<Vec<u8>, StoreError> {
    match value {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        _ => Err(StoreError::corrupt("hash field or value is not a string")),
    }
}

/// Rebuilds an entry from its hash. Strict: anything but the exact encoding this store
/// writes is corrupt, because a non-canonical field (say `modified` = `007`) would never
/// compare equal inside the script and would stall every write on the key.
fn decode_entry(pairs: Pairs) -> Result<Option<Entry>, StoreError> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut fields: [Option<Vec<u8>>; 6] = Default::default();
    for (field, value) in pairs {
        let slot = match field.as_slice() {
            f if f == FIELD_ETAG.as_bytes() => 0,
            f if f == FIELD_MODIFIED.as_bytes() => 1,
            f if f == FIELD_AMBIGUOUS.as_bytes() => 2,
            f if f == FIELD_LEASE.as_bytes() => 3,
            f if f == FIELD_EXPIRES.as_bytes() => 4,
            f if f == FIELD_SEEDED.as_bytes() => 5,
            _ => return Err(StoreError::corrupt("unknown field in a version entry")),
        };
        if fields[slot].replace(value).is_some() {
            return Err(StoreError::corrupt("repeated field in a version entry"));
        }
    }
    let [etag, modified, ambiguous, lease, expires, seeded] = fields;
    // Written only as `1`, and only next to a version.
    let seeded = match seeded.as_deref() {
        None => false,
        Some(b"1") => true,
        Some(_) => return Err(StoreError::corrupt("invalid seeded flag")),
    };
    let version = match (etag, modified, ambiguous) {
        (None, None, None) if seeded => {
            return Err(StoreError::corrupt("seeded flag without a version"))
        }
        (None, None, None) => None,
        (Some(etag), Some(modified), Some(ambiguous)) => {
            let etag = EntityTag::strong_from_wire_bytes(&etag)
                .map_err(|e| StoreError::corrupt("invalid entity tag").with_source(e))?;
            let ambiguous = match ambiguous.as_slice() {
                b"0" => false,
                b"1" => true,
                _ => return Err(StoreError::corrupt("invalid ambiguity flag")),
            };
            Version::from_parts(etag, decimal(&modified)?, ambiguous).map(|v| v.with_seeded(seeded))
        }
        _ => return Err(StoreError::corrupt("incomplete version")),
    };
    let lease = match (lease, expires) {
        (None, None) => None,
        (Some(token), Some(expires)) => {
            let token = std::str::from_utf8(&token)
                .ok()
                .and_then(|text| LeaseToken::parse_hex(text).filter(|t| t.to_string() == text))
                .ok_or_else(|| StoreError::corrupt("invalid lease token"))?;
            Some(Lease::from_parts(token, decimal(&expires)?))
        }
        _ => return Err(StoreError::corrupt("incomplete lease")),
    };
    Entry::from_parts(version, lease)
        .map(Some)
        .ok_or_else(|| StoreError::corrupt("empty version entry"))
}

/// A canonical decimal `u64`: digits only, no leading zero.
fn decimal(text: &[u8]) -> Result<u64, StoreError> {
    let canonical = !text.is_empty()
        && text.iter().all(u8::is_ascii_digit)
        && (text.len() == 1 || text[0] != b'0');
    std::str::from_utf8(text)
        .ok()
        .filter(|_| canonical)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| StoreError::corrupt("invalid number in a version entry"))
}

/// Maps a Redis error to the store's error kinds, keeping it as the source.
fn store_error(context: &str, error: RedisError) -> StoreError {
    let kind = if error.is_timeout() {
        StoreErrorKind::Timeout
    } else if error.code() == Some("WRONGTYPE")
        || error.detail().is_some_and(|d| d.contains("WRONGTYPE"))
        || matches!(
            error.kind(),
            ErrorKind::Parse | ErrorKind::UnexpectedReturnType
        )
    {
        StoreErrorKind::Corrupt
    } else {
        StoreErrorKind::Unavailable
    };
    StoreError::new(kind, context).with_source(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &[u8])]) -> Pairs {
        items
            .iter()
            .map(|(f, v)| (f.as_bytes().to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn escaping_keeps_keys_distinct_and_the_tag_whole() {
        let escaped = |s: &str| escape_into(String::new(), s);
        assert_eq!(escaped("/items/1"), "/items/1");
        assert_eq!(escaped("a}b{c\\"), "a\\)b\\(c\\\\");
        assert_ne!(escaped("\\)"), escaped("}"));
        assert!(!escaped("}{}").contains(['{', '}']));
    }

    #[test]
    fn decodes_the_exact_encoding_only() {
        let good = pairs(&[("etag", b"v\xff"), ("modified", b"17"), ("ambiguous", b"1")]);
        let entry = decode_entry(good).unwrap().unwrap();
        let version = entry.version().unwrap();
        assert_eq!(version.etag().opaque(), "v\u{ff}");
        assert_eq!(version.last_modified_secs(), 17);
        assert!(version.last_modified_ambiguous());
        assert_eq!(decode_entry(Vec::new()).unwrap(), None);

        let token = format!("{:032x}", 7u128);
        let lease_only = pairs(&[("lease", token.as_bytes()), ("expires", b"0")]);
        assert!(decode_entry(lease_only)
            .unwrap()
            .unwrap()
            .version()
            .is_none());

        let seeded = pairs(&[
            ("etag", b"s"),
            ("modified", b"1"),
            ("ambiguous", b"0"),
            ("seeded", b"1"),
        ]);
        let entry = decode_entry(seeded).unwrap().unwrap();
        assert!(entry.version().unwrap().is_seeded());

        let bad: [&[(&str, &[u8])]; 11] = [
            &[("etag", b"v"), ("modified", b"017"), ("ambiguous", b"0")],
            &[("etag", b"v"), ("modified", b"1"), ("ambiguous", b"2")],
            &[("etag", b"v"), ("modified", b"1")],
            &[("etag", b"a\"b"), ("modified", b"1"), ("ambiguous", b"0")],
            &[("etag", b"v"), ("modified", b"-1"), ("ambiguous", b"0")],
            &[
                ("lease", b"ABCDEF0123456789ABCDEF0123456789"),
                ("expires", b"1"),
            ],
            &[
                ("lease", b"+bcdef0123456789abcdef0123456789"),
                ("expires", b"1"),
            ],
            &[("other", b"x")],
            // The seeded flag is written as `1` only, and only next to a version.
            &[
                ("etag", b"v"),
                ("modified", b"1"),
                ("ambiguous", b"0"),
                ("seeded", b"0"),
            ],
            &[
                ("etag", b"v"),
                ("modified", b"1"),
                ("ambiguous", b"0"),
                ("seeded", b"yes"),
            ],
            &[
                ("lease", b"0123456789abcdef0123456789abcdef"),
                ("expires", b"1"),
                ("seeded", b"1"),
            ],
        ];
        for case in bad {
            let err = decode_entry(pairs(case)).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{case:?}");
        }
    }

    #[test]
    fn outcome_replies() {
        assert_eq!(
            decode_outcome(Value::Array(vec![Value::Int(1)])).unwrap(),
            CasOutcome::Applied
        );
        assert_eq!(
            decode_outcome(Value::Array(vec![Value::Int(0)])).unwrap(),
            CasOutcome::Mismatch { current: None }
        );
        assert!(decode_outcome(Value::Int(1)).is_err());
        assert!(decode_outcome(Value::Array(vec![Value::Int(0), Value::Nil])).is_err());
    }
}
