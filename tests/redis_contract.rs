//! The store contract suite and the Redis-specific rules (key layout, fields, time to
//! live of leases, corrupt data, script reloads), against a real Redis (`REDIS_URL`).

mod redis_support;

use std::{sync::Arc, time::Duration};

use redis::AsyncCommands;
use redis_support::{call, default_items_app, raw_connection, redis_url, shared_store, OwnRedis};
use tower_precondition::{
    store::{
        testing::{committed, run_contract_suite},
        AtomicVersionStore, CasOutcome, Entry, Lease, LeaseToken, RedisStore, StoreErrorKind,
    },
    EntityTag, Version,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn connection_manager_store_passes_the_contract() {
    let Some((store, _cleanup)) = shared_store().await else {
        return;
    };
    run_contract_suite(Arc::new(store), "redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn multiplexed_connection_store_with_a_braced_prefix_passes_the_contract() {
    let Some(url) = redis_url() else {
        return;
    };
    let client = redis::Client::open(url.as_str()).expect("url");
    let connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let store = RedisStore::from_connection(connection)
        .prefix(format!("{}{{odd}}\\", redis_support::unique_prefix("mux")));
    let _cleanup = redis_support::Cleanup::of(&store, &url);
    run_contract_suite(Arc::new(store), "redis-mux").await;
}

#[tokio::test]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn entries_are_hashes_under_a_hash_tagged_key() {
    let Some((store, _cleanup)) = shared_store().await else {
        return;
    };
    let url = redis_url().expect("set");
    let plain = RedisStore::open(&url).await.expect("open").prefix("p:");
    assert_eq!(plain.redis_key("/items/1"), "p:{/items/1}");
    assert_eq!(plain.redis_key("a}b{c\\"), "p:{a\\)b\\(c\\\\}");
    assert_eq!(
        RedisStore::open(&url)
            .await
            .expect("open")
            .prefix("x{y}:")
            .redis_key("k"),
        "x\\(y\\):{k}"
    );

    let key = "/items/fields";
    let version = Version::from_parts(
        EntityTag::parse_bytes(b"\"v\xe9\"").expect("obs-text tag"),
        1_700_000_000,
        true,
    )
    .expect("strong");
    let token = LeaseToken::from_u128(0xabc);
    let leased = Entry::from_parts(
        Some(version),
        Some(Lease::from_parts(token, 1_700_000_000_123)),
    )
    .expect("entry");
    assert_eq!(
        store
            .compare_and_set(key, None, Some(&leased))
            .await
            .expect("cas"),
        CasOutcome::Applied
    );
    let mut con = raw_connection(&url).await;
    let mut fields: Vec<(String, Vec<u8>)> =
        con.hgetall(store.redis_key(key)).await.expect("hgetall");
    fields.sort();
    let expected: Vec<(String, Vec<u8>)> = vec![
        ("ambiguous".into(), b"1".to_vec()),
        ("etag".into(), b"v\xe9".to_vec()),
        ("expires".into(), b"1700000000123".to_vec()),
        ("lease".into(), b"00000000000000000000000000000abc".to_vec()),
        ("modified".into(), b"1700000000".to_vec()),
    ];
    assert_eq!(fields, expected);
}

#[tokio::test]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn no_entry_ever_gets_a_time_to_live() {
    let Some((store, _cleanup)) = shared_store().await else {
        return;
    };
    let url = redis_url().expect("set");
    let mut con = raw_connection(&url).await;
    let key = "/items/ttl";
    let rkey = store.redis_key(key);
    let now = store.clock_millis().await.expect("clock");

    let v1 = committed("v1");
    let leased = Entry::from_parts(
        v1.version().cloned(),
        Some(Lease::from_parts(LeaseToken::random(), now + 30_000)),
    )
    .expect("entry");
    let released = Entry::from_parts(
        v1.version().cloned(),
        Some(Lease::released(LeaseToken::random())),
    )
    .expect("entry");
    let mut previous = None;
    for entry in [&v1, &leased, &released, &v1] {
        store
            .compare_and_set(key, previous, Some(entry))
            .await
            .expect("cas");
        let ttl: i64 = con.pttl(&rkey).await.expect("pttl");
        assert_eq!(ttl, -1, "{entry:?} must not expire inside Redis");
        previous = Some(entry);
    }

    // A key an earlier version of the store gave a time to live loses it at its next
    // compare-and-set.
    let _: bool = con.pexpire(&rkey, 60_000).await.expect("pexpire");
    store
        .compare_and_set(key, Some(&v1), Some(&leased))
        .await
        .expect("cas");
    let ttl: i64 = con.pttl(&rkey).await.expect("pttl");
    assert_eq!(ttl, -1, "a rewritten entry keeps no old time to live");

    // Nor does the clock key.
    let ttl: i64 = con.pttl(store.clock_key()).await.expect("pttl");
    assert_eq!(ttl, -1, "the clock key must not expire");
}

#[tokio::test]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn the_clock_is_one_server_clock_that_never_goes_back() {
    let Some((store, _cleanup)) = shared_store().await else {
        return;
    };
    let url = redis_url().expect("set");
    let mut con = raw_connection(&url).await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut con)
        .await
        .expect("TIME");
    let server = secs * 1000 + micros / 1000;
    let first = store.clock_millis().await.expect("clock");
    assert!(
        first >= server && first < server + 5_000,
        "the clock is the server's TIME in ms: TIME said {server}, the store {first}"
    );
    // Another store (another process) on the same prefix reads the same clock.
    let other = RedisStore::open(&url)
        .await
        .expect("open")
        .prefix(store.redis_key("").trim_end_matches("{}"));
    assert_eq!(other.clock_key(), store.clock_key());
    assert!(other.clock_millis().await.expect("clock") >= first);

    // A high mark ahead of TIME (as after the server's clock stepped back) holds the
    // clock still instead of letting it go back.
    let ahead = first + 3_600_000;
    let _: () = con.set(store.clock_key(), ahead).await.expect("set");
    assert_eq!(store.clock_millis().await.expect("clock"), ahead);
    assert_eq!(other.clock_millis().await.expect("clock"), ahead);

    // Garbage in the clock key is an error, not a guess.
    let _: () = con.set(store.clock_key(), "soon").await.expect("set");
    assert!(store.clock_millis().await.is_err());
}

/// What another process leaves behind when it reserves `key` and crashes before
/// settling: a lease on the current version that expires in `millis`.
async fn crash_while_writing(store: &RedisStore, key: &str, millis: u64) {
    let current = store.load(key).await.expect("load").expect("entry");
    let crashed = Entry::from_parts(
        current.version().cloned(),
        Some(Lease::from_parts(
            LeaseToken::random(),
            store.clock_millis().await.expect("clock") + millis,
        )),
    )
    .expect("entry");
    assert_eq!(
        store
            .compare_and_set(key, Some(&current), Some(&crashed))
            .await
            .expect("cas"),
        CasOutcome::Applied
    );
}

#[tokio::test]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn an_expired_lease_is_taken_over_with_a_fresh_version() {
    let Some((store, _cleanup)) = shared_store().await else {
        return;
    };
    let (app, calls) = default_items_app(store.clone());
    let uri = "/items/crash";
    let put = |etag: String| {
        let app = app.clone();
        async move { call(&app, "PUT", uri, &[("if-match", &etag)], Some("2")).await }
    };
    let (status, _, _) = call(&app, "PUT", uri, &[], Some("1")).await;
    assert_eq!(status, 201);
    let (_, etag, _) = call(&app, "GET", uri, &[], None).await;
    let etag = etag.expect("etag");

    // A write takes the expired lease over: the old ETag fails, the 412 names a fresh one.
    crash_while_writing(&store, uri, 300).await;
    let (status, _, _) = put(etag.clone()).await;
    assert_eq!(status, 409, "a live lease blocks writes");
    let mut fresh = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, current, _) = put(etag.clone()).await;
        if status == 412 {
            fresh = current;
            break;
        }
        assert_eq!(status, 409, "only 409 until the lease expires");
    }
    let fresh = fresh.expect("the lease expires and is taken over");
    assert_ne!(fresh, etag, "takeover gives a fresh version");
    let writes_before = calls.load(std::sync::atomic::Ordering::SeqCst);
    let (status, _, _) = put(etag).await;
    assert_eq!(status, 412, "the old ETag stays refused");
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        writes_before
    );
    let (status, _, _) = put(fresh.clone()).await;
    assert_eq!(status, 204, "the fresh ETag is accepted");

    // A read takes an expired lease over too: no 304 for the version the crashed
    // writer may have replaced.
    let (_, etag, _) = call(&app, "GET", uri, &[], None).await;
    let etag = etag.expect("etag");
    crash_while_writing(&store, uri, 300).await;
    let if_none_match = [("if-none-match", etag.as_str())];
    let (status, _, _) = call(&app, "GET", uri, &if_none_match, None).await;
    assert_eq!(status, 304, "a live lease does not block reads");
    let mut after = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, current, _) = call(&app, "GET", uri, &if_none_match, None).await;
        if status == 200 {
            after = current;
            break;
        }
        assert_eq!(status, 304, "only 304 until the lease expires");
    }
    let after = after.expect("the lease expires and a read takes it over");
    assert_ne!(after, etag, "the read gives a fresh version");
    let (status, current, _) = put(etag).await;
    assert_eq!(status, 412);
    assert_eq!(current, Some(after));
}

#[tokio::test]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn corrupt_entries_are_errors_and_writes_fail_closed() {
    let Some((store, _cleanup)) = shared_store().await else {
        return;
    };
    let url = redis_url().expect("set");
    let mut con = raw_connection(&url).await;
    let token = format!("{:032x}", 5u128);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("etag", "v"), ("modified", "007"), ("ambiguous", "0")],
        vec![("etag", "v"), ("modified", "7")],
        vec![
            ("etag", "v"),
            ("modified", "7"),
            ("ambiguous", "0"),
            ("x", "1"),
        ],
        vec![("lease", "not-hex"), ("expires", "1")],
        vec![("lease", &token)],
    ];
    for (i, fields) in cases.iter().enumerate() {
        let key = format!("/items/corrupt-{i}");
        let _: () = con
            .hset_multiple(store.redis_key(&key), fields)
            .await
            .expect("hset");
        let error = store.load(&key).await.expect_err("corrupt entry");
        assert_eq!(error.kind(), StoreErrorKind::Corrupt, "case {i}: {error}");
        // The script answers with the stored hash on a mismatch: also corrupt.
        let error = store
            .compare_and_set(&key, None, Some(&committed("x")))
            .await
            .expect_err("corrupt entry");
        assert_eq!(error.kind(), StoreErrorKind::Corrupt, "case {i}: {error}");
    }

    let key = "/items/wrong-type";
    let _: () = con
        .set(store.redis_key(key), "a string")
        .await
        .expect("set");
    let error = store.load(key).await.expect_err("wrong type");
    assert_eq!(error.kind(), StoreErrorKind::Corrupt, "{error}");

    let (app, calls) = default_items_app(store.clone());
    for uri in ["/items/corrupt-0", "/items/wrong-type"] {
        let (status, _, _) = call(&app, "PUT", uri, &[], Some("1")).await;
        assert_eq!(status, 503, "a corrupt entry fails writes closed");
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// On a private `redis-server`: the shared one must never be flushed by a test.
#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_transparently() {
    let Some(own) = OwnRedis::start() else {
        return;
    };
    let url = own.url();
    let store = RedisStore::open(&url).await.expect("private Redis");
    let mut con = raw_connection(&url).await;
    let key = "/items/flush";
    let mut previous = None;
    for i in 0..5 {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut con)
            .await
            .expect("flush");
        let next = committed(&format!("v{i}"));
        assert_eq!(
            store
                .compare_and_set(key, previous.as_ref(), Some(&next))
                .await
                .expect("no error reaches the caller"),
            CasOutcome::Applied
        );
        previous = Some(next);
    }
}

#[tokio::test]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn a_replayed_script_call_is_applied_not_a_conflict() {
    let Some((store, _cleanup)) = shared_store().await else {
        return;
    };
    let key = "/items/replay";
    let a = committed("a");
    let now = store.clock_millis().await.expect("clock");
    let lease = Lease::from_parts(LeaseToken::random(), now + 30_000);
    let reserved = Entry::from_parts(a.version().cloned(), Some(lease)).expect("entry");
    store
        .compare_and_set(key, None, Some(&a))
        .await
        .expect("cas");
    // Reserve, commit and remove, each sent twice as a retrying client would.
    for (expected, new) in [
        (Some(&a), Some(&reserved)),
        (Some(&reserved), Some(&a)),
        (Some(&a), None),
    ] {
        for attempt in 0..2 {
            assert_eq!(
                store
                    .compare_and_set(key, expected, new)
                    .await
                    .expect("cas"),
                CasOutcome::Applied,
                "attempt {attempt}"
            );
        }
    }
    assert_eq!(store.load(key).await.expect("load"), None);
}

#[tokio::test]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn unreachable_redis_is_an_unavailable_error() {
    if redis_url().is_none() {
        return;
    }
    // A port nothing listens on: `open` fails, a lazy store fails each call.
    let url = "redis://127.0.0.1:1";
    let error = RedisStore::open(url).await.expect_err("unreachable");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable, "{error}");
    assert!(std::error::Error::source(&error).is_some());
    let lazy = RedisStore::open_lazy(url).expect("valid url");
    let error = tokio::time::timeout(Duration::from_secs(30), lazy.load("k"))
        .await
        .expect("the manager gives up")
        .expect_err("unreachable");
    assert_ne!(error.kind(), StoreErrorKind::Corrupt, "{error}");
    assert_eq!(
        RedisStore::open("not a url")
            .await
            .expect_err("bad url")
            .kind(),
        StoreErrorKind::Unavailable
    );
}

/// Finding 7.6: Redis forgot unknown outcomes. A leased entry got a time to live
/// (lease + grace), so the entry of a write whose process crashed vanished, and the
/// next `If-None-Match: *` create passed where the memory store answers `412`. An
/// expired lease must stay until a request takes it over with a fresh version.
#[tokio::test]
#[cfg_attr(not(tp_redis), ignore = "set REDIS_URL to run")]
async fn finding_7_6_an_expired_lease_stays_in_redis_until_taken_over() {
    let Some((store, _cleanup)) = shared_store().await else {
        return;
    };
    let url = redis_url().expect("set");
    let mut con = raw_connection(&url).await;
    let (app, calls) = default_items_app(store.clone());
    let uri = "/items/crashed-update";
    let (status, _, _) = call(&app, "PUT", uri, &[], Some("1")).await;
    assert_eq!(status, 201);
    let (_, etag, _) = call(&app, "GET", uri, &[], None).await;
    let etag = etag.expect("etag");

    // Another process reserves the resource and crashes: its lease ends in 100 ms.
    crash_while_writing(&store, uri, 100).await;
    let leased = store.load(uri).await.expect("load").expect("entry");
    let ttl: i64 = con.pttl(store.redis_key(uri)).await.expect("pttl");
    assert_eq!(ttl, -1, "Redis must not expire a leased entry by itself");

    // Long after the lease (and any grace a short one would get) has run out, the entry
    // is still there, with its expired lease: nothing but a takeover may clear it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        store.load(uri).await.expect("load"),
        Some(leased),
        "an expired lease stays until a request takes it over"
    );

    // The next write takes it over: the resource exists, so a create fails, and the
    // crashed writer may have written, so the 412 names a fresh version.
    let writes_before = calls.load(std::sync::atomic::Ordering::SeqCst);
    let (status, current, _) = call(&app, "PUT", uri, &[("if-none-match", "*")], Some("2")).await;
    assert_eq!(status, 412, "a create over a crashed update must fail");
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        writes_before
    );
    let current = current.expect("the 412 carries the current ETag");
    assert_ne!(current, etag, "the takeover gave a fresh version");
    let (status, _, _) = call(&app, "PUT", uri, &[("if-match", &etag)], Some("3")).await;
    assert_eq!(status, 412, "the old ETag stays refused");
    let (status, _, _) = call(&app, "PUT", uri, &[("if-match", &current)], Some("4")).await;
    assert_eq!(status, 204, "the fresh ETag is accepted");
}
