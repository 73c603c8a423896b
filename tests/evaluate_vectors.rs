//! The evaluator against vectors from RFC 9110 and from the public test suites of
//! mature implementations: Go's `net/http` (`fs.go` `checkPreconditions`,
//! `fs_test.go` `TestServeContent` / `TestScanETag`), Django
//! (`tests/conditional_processing/tests.py`) and jshttp `fresh` (`test/fresh.js`).
//!
//! Every row goes through the whole pure pipeline: raw header lines ->
//! `Preconditions::from_headers` -> `evaluate`. Where an implementation disagrees with
//! the RFC, the row follows the RFC and says so; where we are deliberately stricter than
//! the RFC (documented in `src/evaluate.rs` and `src/etag.rs`), the row says that too.
//!
//! Adaptation: our stored versions are always strong (a `Version` cannot hold a weak
//! tag), so a vector whose *response* ETag is weak is mapped to the strong tag with the
//! same opaque value; weak comparison (If-None-Match) gives the same answer, strong
//! comparison (If-Match) fails either way because the request tag is weak.

use http::{
    header::{self, HeaderName},
    HeaderMap, HeaderValue, Method,
};
use std::time::{Duration, UNIX_EPOCH};
use tower_precondition::{
    etag::{parse_tag_list, EntityTag, TagList, MAX_LIST_TAGS},
    evaluate::{evaluate, Decision, Preconditions},
    store::Version,
};

use Decision::{NotModified as NM, PreconditionFailed as PF, Proceed as OK};

// Django tests/conditional_processing/tests.py constants.
const DJ_ETAG: &str = r#""b4246ffc4f62314ca13147c9d4f76974""#;
const DJ_WEAK_ETAG: &str = r#"W/"b4246ffc4f62314ca13147c9d4f76974""#;
const DJ_EXPIRED_ETAG: &str = r#""7fae4cd4b0f81e7d2914700043aa8ed6""#;
const DJ_LM: &str = "Sun, 21 Oct 2007 23:21:47 GMT";
const DJ_LM_SECS: u64 = 1_193_008_907;
const DJ_NEWER: &str = "Mon, 18 Oct 2010 16:56:23 GMT";
const DJ_INVALID: &str = "Mon, 32 Oct 2010 16:56:23 GMT";
const DJ_EXPIRED: &str = "Sat, 20 Oct 2007 23:21:47 GMT";

// RFC 9110 examples.
const RFC_DATE: &str = "Sat, 29 Oct 1994 19:43:31 GMT";
const RFC_SECS: u64 = 783_459_811;

// Go fs_test.go range_with_modtime date.
const GO_DATE: &str = "Wed, 25 Jun 2014 17:12:18 GMT";
const GO_SECS: u64 = 1_403_716_338;

// jshttp fresh dates.
const JS_0000: &str = "Sat, 01 Jan 2000 00:00:00 GMT";
const JS_0000_SECS: u64 = 946_684_800;
const JS_0100: &str = "Sat, 01 Jan 2000 01:00:00 GMT";
const JS_0100_SECS: u64 = 946_688_400;

const IM: &str = "if-match";
const INM: &str = "if-none-match";
const IMS: &str = "if-modified-since";
const IUS: &str = "if-unmodified-since";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Is(Decision),
    /// `Preconditions::from_headers` refuses the request (the layer answers 400).
    BadRequest,
}
use Expect::{BadRequest, Is};

/// The current version: (opaque strong tag, last-modified seconds, ambiguous).
type Current = Option<(&'static str, u64, bool)>;

struct Row {
    source: &'static str,
    method: Method,
    /// Header lines, in order; one name may appear on several lines.
    headers: &'static [(&'static str, &'static str)],
    current: Current,
    expect: Expect,
}

fn row(
    source: &'static str,
    method: Method,
    headers: &'static [(&'static str, &'static str)],
    current: Current,
    expect: Expect,
) -> Row {
    Row {
        source,
        method,
        headers,
        current,
        expect,
    }
}

fn dj() -> Current {
    Some(("b4246ffc4f62314ca13147c9d4f76974", DJ_LM_SECS, false))
}

fn rfc(tag: &'static str) -> Current {
    Some((tag, RFC_SECS, false))
}

fn go(tag: &'static str) -> Current {
    Some((tag, GO_SECS, false))
}

fn header_map(lines: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in lines {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn version(current: Current) -> Option<Version> {
    current.map(|(tag, secs, ambiguous)| {
        Version::from_parts(EntityTag::strong(tag).unwrap(), secs, ambiguous).unwrap()
    })
}

fn run(rows: &[Row]) {
    let mut failures = Vec::new();
    for r in rows {
        let got = match Preconditions::from_request(&r.method, &header_map(r.headers)) {
            Ok(pre) => Is(evaluate(&r.method, &pre, version(r.current).as_ref())),
            Err(_) => BadRequest,
        };
        if got != r.expect {
            failures.push(format!(
                "{}: {} {:?} current={:?}: expected {:?}, got {:?}",
                r.source, r.method, r.headers, r.current, r.expect, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rfc_9110_vectors() {
    let g = Method::GET;
    let h = Method::HEAD;
    let p = Method::PUT;
    let d = Method::DELETE;
    #[rustfmt::skip]
    let rows = [
        // 8.8.3.2: the comparison table, seen through If-Match (strong) and
        // If-None-Match (weak). Our current tag is always strong ("1").
        row("8.8.3.2 W/1 vs 1 strong: no match", p.clone(), &[(IM, r#"W/"1""#)], rfc("1"), Is(PF)),
        row("8.8.3.2 W/1 vs 1 weak: match", g.clone(), &[(INM, r#"W/"1""#)], rfc("1"), Is(NM)),
        row("8.8.3.2 1 vs 1 strong: match", p.clone(), &[(IM, r#""1""#)], rfc("1"), Is(OK)),
        row("8.8.3.2 1 vs 1 weak: match", g.clone(), &[(INM, r#""1""#)], rfc("1"), Is(NM)),
        row("8.8.3.2 W/2 vs 1 weak: no match", g.clone(), &[(INM, r#"W/"2""#)], rfc("1"), Is(OK)),
        // 13.1.1 If-Match examples.
        row("13.1.1 If-Match: \"xyzzy\" current", p.clone(), &[(IM, r#""xyzzy""#)], rfc("xyzzy"), Is(OK)),
        row("13.1.1 If-Match: \"xyzzy\" stale", p.clone(), &[(IM, r#""xyzzy""#)], rfc("other"), Is(PF)),
        row("13.1.1 If-Match list, last matches", p.clone(), &[(IM, r#""xyzzy", "r2d2xxxx", "c3piozzzz""#)], rfc("c3piozzzz"), Is(OK)),
        row("13.1.1 If-Match list, none matches", p.clone(), &[(IM, r#""xyzzy", "r2d2xxxx", "c3piozzzz""#)], rfc("other"), Is(PF)),
        row("13.1.1 If-Match: * with a current representation", p.clone(), &[(IM, "*")], rfc("a"), Is(OK)),
        row("13.1.1 If-Match: * without one", p.clone(), &[(IM, "*")], None, Is(PF)),
        row("13.1.1 If-Match with tags, no current representation", d.clone(), &[(IM, r#""a""#)], None, Is(PF)),
        row("13.1.1 If-Match false on GET", g.clone(), &[(IM, r#""b""#)], rfc("a"), Is(PF)),
        row("13.1.1 case-sensitive opaque", p.clone(), &[(IM, r#""XYZZY""#)], rfc("xyzzy"), Is(PF)),
        // 13.1.2 If-None-Match examples.
        row("13.1.2 INM \"xyzzy\" GET", g.clone(), &[(INM, r#""xyzzy""#)], rfc("xyzzy"), Is(NM)),
        row("13.1.2 INM W/\"xyzzy\" GET", g.clone(), &[(INM, r#"W/"xyzzy""#)], rfc("xyzzy"), Is(NM)),
        row("13.1.2 INM strong list GET", g.clone(), &[(INM, r#""xyzzy", "r2d2xxxx", "c3piozzzz""#)], rfc("r2d2xxxx"), Is(NM)),
        row("13.1.2 INM weak list GET", g.clone(), &[(INM, r#"W/"xyzzy", W/"r2d2xxxx", W/"c3piozzzz""#)], rfc("c3piozzzz"), Is(NM)),
        row("13.1.2 INM weak list, none matches", g.clone(), &[(INM, r#"W/"xyzzy", W/"r2d2xxxx", W/"c3piozzzz""#)], rfc("other"), Is(OK)),
        row("13.1.2 INM * GET existing: 304", g.clone(), &[(INM, "*")], rfc("a"), Is(NM)),
        row("13.1.2 INM * PUT existing: 412", p.clone(), &[(INM, "*")], rfc("a"), Is(PF)),
        row("13.1.2 INM * PUT create", p.clone(), &[(INM, "*")], None, Is(OK)),
        row("13.1.2 INM * GET nothing", g.clone(), &[(INM, "*")], None, Is(OK)),
        row("13.1.2 INM match on DELETE: 412", d.clone(), &[(INM, r#""a""#)], rfc("a"), Is(PF)),
        row("13.1.2 INM match on HEAD: 304", h.clone(), &[(INM, r#""a""#)], rfc("a"), Is(NM)),
        row("13.1.2 INM match on POST: 412", Method::POST, &[(INM, r#""a""#)], rfc("a"), Is(PF)),
        // 13.1.3 If-Modified-Since.
        row("13.1.3 IMS equal date: 304", g.clone(), &[(IMS, RFC_DATE)], rfc("a"), Is(NM)),
        row("13.1.3 IMS later date: 304", g.clone(), &[(IMS, DJ_LM)], rfc("a"), Is(NM)),
        row("13.1.3 IMS earlier date: 200", g.clone(), &[(IMS, "Sat, 29 Oct 1994 19:43:30 GMT")], rfc("a"), Is(OK)),
        row("13.1.3 IMS on HEAD", h.clone(), &[(IMS, RFC_DATE)], rfc("a"), Is(NM)),
        row("13.1.3 IMS ignored on PUT", p.clone(), &[(IMS, RFC_DATE)], rfc("a"), Is(OK)),
        row("13.1.3 IMS ignored on DELETE", d.clone(), &[(IMS, RFC_DATE)], rfc("a"), Is(OK)),
        row("13.1.3 IMS ignored when INM present (INM misses)", g.clone(), &[(INM, r#""b""#), (IMS, RFC_DATE)], rfc("a"), Is(OK)),
        row("13.1.3 IMS invalid date ignored", g.clone(), &[(IMS, "yesterday")], rfc("a"), Is(OK)),
        row("13.1.3 IMS with more than one member ignored", g.clone(), &[(IMS, RFC_DATE), (IMS, RFC_DATE)], rfc("a"), Is(OK)),
        row("13.1.3 IMS with no current version", g.clone(), &[(IMS, RFC_DATE)], None, Is(OK)),
        // 13.1.4 If-Unmodified-Since.
        row("13.1.4 IUS equal date: proceed", p.clone(), &[(IUS, RFC_DATE)], rfc("a"), Is(OK)),
        row("13.1.4 IUS later date: proceed", p.clone(), &[(IUS, DJ_LM)], rfc("a"), Is(OK)),
        row("13.1.4 IUS earlier date: 412", p.clone(), &[(IUS, "Sat, 29 Oct 1994 19:43:30 GMT")], rfc("a"), Is(PF)),
        row("13.1.4 IUS earlier date on GET: 412", g.clone(), &[(IUS, "Fri, 28 Oct 1994 19:43:31 GMT")], rfc("a"), Is(PF)),
        row("13.1.4 IUS ignored when If-Match present", p.clone(), &[(IM, r#""a""#), (IUS, "Fri, 28 Oct 1994 19:43:31 GMT")], rfc("a"), Is(OK)),
        row("13.1.4 IUS invalid date ignored", p.clone(), &[(IUS, "not a date")], rfc("a"), Is(OK)),
        row("13.1.4 IUS with two lines ignored", p.clone(), &[(IUS, "Fri, 28 Oct 1994 19:43:31 GMT"), (IUS, "Fri, 28 Oct 1994 19:43:31 GMT")], rfc("a"), Is(OK)),
        // The RFC ignores IUS without a modification date; ours ignores it on reads
        // but fails a write (stricter, src/evaluate.rs: the store may have forgotten).
        row("13.1.4 IUS, no version, GET: ignored", g.clone(), &[(IUS, RFC_DATE)], None, Is(OK)),
        row("13.1.4 IUS, no version, PUT: 412 (ours stricter)", p.clone(), &[(IUS, RFC_DATE)], None, Is(PF)),
        // 13.2.2 precedence.
        row("13.2.2 step 1 beats step 3 (If-Match false, INM would 304)", g.clone(), &[(IM, r#""b""#), (INM, r#""a""#)], rfc("a"), Is(PF)),
        row("13.2.2 If-Match true then INM match: 304 on GET", g.clone(), &[(IM, r#""a""#), (INM, r#""a""#)], rfc("a"), Is(NM)),
        row("13.2.2 If-Match true then INM match: 412 on PUT", p.clone(), &[(IM, r#""a""#), (INM, r#""a""#)], rfc("a"), Is(PF)),
        row("13.2.2 IUS false beats INM", g.clone(), &[(IUS, "Fri, 28 Oct 1994 19:43:31 GMT"), (INM, r#""a""#)], rfc("a"), Is(PF)),
        row("13.2.2 IUS true then IMS: 304", g.clone(), &[(IUS, RFC_DATE), (IMS, RFC_DATE)], rfc("a"), Is(NM)),
        row("13.2.2 all four hold on PUT", p.clone(), &[(IM, r#""a""#), (IUS, RFC_DATE), (INM, r#""b""#), (IMS, RFC_DATE)], rfc("a"), Is(OK)),
        row("13.2.2 no preconditions", p.clone(), &[], rfc("a"), Is(OK)),
        row("13.2.2 no preconditions, nothing current", g.clone(), &[], None, Is(OK)),
    ];
    run(&rows);
}

#[test]
fn django_conditional_processing_vectors() {
    let g = Method::GET;
    let p = Method::PUT;
    #[rustfmt::skip]
    let rows = [
        row("django test_without_conditions", g.clone(), &[], dj(), Is(OK)),
        // test_if_modified_since
        row("django test_if_modified_since GET =LM", g.clone(), &[(IMS, DJ_LM)], dj(), Is(NM)),
        row("django test_if_modified_since PUT =LM", p.clone(), &[(IMS, DJ_LM)], dj(), Is(OK)),
        row("django test_if_modified_since GET newer", g.clone(), &[(IMS, DJ_NEWER)], dj(), Is(NM)),
        row("django test_if_modified_since PUT newer", p.clone(), &[(IMS, DJ_NEWER)], dj(), Is(OK)),
        row("django test_if_modified_since invalid", g.clone(), &[(IMS, DJ_INVALID)], dj(), Is(OK)),
        row("django test_if_modified_since expired", g.clone(), &[(IMS, DJ_EXPIRED)], dj(), Is(OK)),
        // test_if_unmodified_since
        row("django test_if_unmodified_since =LM", g.clone(), &[(IUS, DJ_LM)], dj(), Is(OK)),
        row("django test_if_unmodified_since newer", g.clone(), &[(IUS, DJ_NEWER)], dj(), Is(OK)),
        row("django test_if_unmodified_since invalid", g.clone(), &[(IUS, DJ_INVALID)], dj(), Is(OK)),
        row("django test_if_unmodified_since expired", g.clone(), &[(IUS, DJ_EXPIRED)], dj(), Is(PF)),
        // test_if_none_match
        row("django test_if_none_match GET", g.clone(), &[(INM, DJ_ETAG)], dj(), Is(NM)),
        row("django test_if_none_match PUT", p.clone(), &[(INM, DJ_ETAG)], dj(), Is(PF)),
        row("django test_if_none_match expired", g.clone(), &[(INM, DJ_EXPIRED_ETAG)], dj(), Is(OK)),
        row("django test_if_none_match two tags", g.clone(), &[( INM, r#""b4246ffc4f62314ca13147c9d4f76974", "7fae4cd4b0f81e7d2914700043aa8ed6""#, )], dj(), Is(NM)),
        // test_weak_if_none_match (on /condition/, whose ETag is strong)
        row("django test_weak_if_none_match GET", g.clone(), &[(INM, DJ_WEAK_ETAG)], dj(), Is(NM)),
        row("django test_weak_if_none_match PUT", p.clone(), &[(INM, DJ_WEAK_ETAG)], dj(), Is(PF)),
        // test_all_if_none_match (/condition/no_etag/ -> no version)
        row("django test_all_if_none_match GET", g.clone(), &[(INM, "*")], dj(), Is(NM)),
        row("django test_all_if_none_match PUT", p.clone(), &[(INM, "*")], dj(), Is(PF)),
        row("django test_all_if_none_match no_etag", g.clone(), &[(INM, "*")], None, Is(OK)),
        // test_if_match
        row("django test_if_match current", p.clone(), &[(IM, DJ_ETAG)], dj(), Is(OK)),
        row("django test_if_match expired", p.clone(), &[(IM, DJ_EXPIRED_ETAG)], dj(), Is(PF)),
        // test_weak_if_match
        row("django test_weak_if_match", g.clone(), &[(IM, DJ_WEAK_ETAG)], dj(), Is(PF)),
        // test_all_if_match
        row("django test_all_if_match", g.clone(), &[(IM, "*")], dj(), Is(OK)),
        row("django test_all_if_match no_etag", g.clone(), &[(IM, "*")], None, Is(PF)),
        // test_both_headers (RFC 7232 section 6 = RFC 9110 13.2.2: INM beats IMS)
        row("django test_both_headers 1", g.clone(), &[(IMS, DJ_LM), (INM, DJ_ETAG)], dj(), Is(NM)),
        row("django test_both_headers 2", g.clone(), &[(IMS, DJ_EXPIRED), (INM, DJ_ETAG)], dj(), Is(NM)),
        row("django test_both_headers 3", g.clone(), &[(IMS, DJ_LM), (INM, DJ_EXPIRED_ETAG)], dj(), Is(OK)),
        row("django test_both_headers 4", g.clone(), &[(IMS, DJ_EXPIRED), (INM, DJ_EXPIRED_ETAG)], dj(), Is(OK)),
        // test_both_headers_2 (If-Match beats IUS)
        row("django test_both_headers_2 1", g.clone(), &[(IUS, DJ_LM), (IM, DJ_ETAG)], dj(), Is(OK)),
        row("django test_both_headers_2 2", g.clone(), &[(IUS, DJ_EXPIRED), (IM, DJ_ETAG)], dj(), Is(OK)),
        row("django test_both_headers_2 3", g.clone(), &[(IUS, DJ_EXPIRED), (IM, DJ_EXPIRED_ETAG)], dj(), Is(PF)),
        row("django test_both_headers_2 4", g.clone(), &[(IUS, DJ_LM), (IM, DJ_EXPIRED_ETAG)], dj(), Is(PF)),
        // test_single_condition_* (single-validator views; ours always has both)
        row("django test_single_condition_3", g.clone(), &[(IMS, DJ_EXPIRED)], dj(), Is(OK)),
        row("django test_single_condition_4", g.clone(), &[(INM, DJ_EXPIRED_ETAG)], dj(), Is(OK)),
        row("django test_single_condition_7 (last_modified view)", g.clone(), &[(IUS, DJ_EXPIRED)], dj(), Is(PF)),
        row("django test_single_condition_8", g.clone(), &[(IUS, DJ_LM)], dj(), Is(OK)),
        row("django test_single_condition_head", Method::HEAD, &[(IMS, DJ_LM)], dj(), Is(NM)),
        // test_invalid_etag: Django ignores a malformed If-None-Match (full response),
        // and so do we on a read (a write gets 400: see the "PUT" rows below).
        row("django test_invalid_etag", g.clone(), &[(INM, r#"""""#)], dj(), Is(OK)),
        row("django test_invalid_etag on PUT (ours: 400)", p.clone(), &[(INM, r#"""""#)], dj(), BadRequest),
    ];
    run(&rows);
}

#[test]
fn go_net_http_vectors() {
    let g = Method::GET;
    let h = Method::HEAD;
    let p = Method::PUT;
    #[rustfmt::skip]
    let rows = [
        // TestServeContent table (GET and HEAD are both run there).
        row("go not_modified_modtime", g.clone(), &[(IMS, GO_DATE)], go("foo"), Is(NM)),
        row("go not_modified_modtime HEAD", h.clone(), &[(IMS, GO_DATE)], go("foo"), Is(NM)),
        row("go not_modified_etag", g.clone(), &[(INM, r#""foo""#)], go("foo"), Is(NM)),
        // not_modified_etag_no_seek serves W/"foo"; ours is strong "foo": weak match.
        row("go not_modified_etag_no_seek", g.clone(), &[(INM, r#""baz", W/"foo""#)], go("foo"), Is(NM)),
        row("go if_none_match_mismatch (case)", g.clone(), &[(INM, r#""Foo""#)], go("foo"), Is(OK)),
        // if_none_match_malformed: Go treats "," as a list of no tags (200). RFC 9110
        // 5.6.1.2 agrees (`#entity-tag` may be empty). Our parser refuses a list made
        // only of empty members (src/etag.rs); a read then ignores the field (200), a
        // write gets 400.
        row("go if_none_match_malformed", g.clone(), &[(INM, ",")], go("foo"), Is(OK)),
        row("go if_none_match_malformed on PUT (ours: 400)", p.clone(), &[(INM, ",")], go("foo"), BadRequest),
        row("go ifmatch_matches", g.clone(), &[(IM, r#""Z", "A""#)], go("A"), Is(OK)),
        row("go ifmatch_star", g.clone(), &[(IM, "*")], go("A"), Is(OK)),
        row("go ifmatch_failed", g.clone(), &[(IM, r#""B""#)], go("A"), Is(PF)),
        row("go ifmatch_fails_on_weak_etag", g.clone(), &[(IM, r#"W/"A""#)], go("A"), Is(PF)),
        row("go if_unmodified_since_true", g.clone(), &[(IUS, GO_DATE)], go("A"), Is(OK)),
        row("go if_unmodified_since_false (-2s)", g.clone(), &[(IUS, "Wed, 25 Jun 2014 17:12:16 GMT")], go("A"), Is(PF)),
        row("go if_unmodified_since_false on PUT", p.clone(), &[(IUS, "Wed, 25 Jun 2014 17:12:16 GMT")], go("A"), Is(PF)),
        // checkIfNoneMatch: "*" is condFalse -> 304 for GET, 412 otherwise.
        row("go checkIfNoneMatch * GET", g.clone(), &[(INM, "*")], go("A"), Is(NM)),
        row("go checkIfNoneMatch * PUT", p.clone(), &[(INM, "*")], go("A"), Is(PF)),
        // checkIfModifiedSince: only GET/HEAD.
        row("go checkIfModifiedSince ignored on PUT", p.clone(), &[(IMS, GO_DATE)], go("A"), Is(OK)),
        // The If-Modified-Since directory test: a later modtime gives 200.
        row("go TestServeIndexHtmlFS modtime +1h", g.clone(), &[(IMS, GO_DATE)], Some(("A", GO_SECS + 3600, false)), Is(OK)),
        // checkPreconditions: If-Match true, then INM match -> 304 on GET.
        row("go checkPreconditions IM true + INM match", g.clone(), &[(IM, r#""A""#), (INM, r#""A""#)], go("A"), Is(NM)),
        // Go checks IUS only when If-Match is absent (condNone), as we do.
        row("go checkPreconditions IM true masks IUS", g.clone(), &[(IM, r#""A""#), (IUS, "Wed, 25 Jun 2014 17:12:16 GMT")], go("A"), Is(OK)),
        // Go ignores IUS when modtime is zero/unknown (condNone); we do on reads, and
        // fail writes without a version (stricter, src/evaluate.rs).
        row("go checkIfUnmodifiedSince zero modtime GET", g.clone(), &[(IUS, GO_DATE)], None, Is(OK)),
        row("go checkIfUnmodifiedSince zero modtime PUT (ours: 412)", p.clone(), &[(IUS, GO_DATE)], None, Is(PF)),
    ];
    run(&rows);
}

#[test]
fn jshttp_fresh_vectors() {
    let g = Method::GET;
    let js = |tag: &'static str, secs: u64| Some((tag, secs, false));
    #[rustfmt::skip]
    let rows = [
        row("fresh non-conditional GET", g.clone(), &[], js("foo", JS_0000_SECS), Is(OK)),
        row("fresh ETags match", g.clone(), &[(INM, r#""foo""#)], js("foo", JS_0000_SECS), Is(NM)),
        row("fresh ETags mismatch", g.clone(), &[(INM, r#""foo""#)], js("bar", JS_0000_SECS), Is(OK)),
        row("fresh at least one matches", g.clone(), &[(INM, r#" "bar" , "foo""#)], js("foo", JS_0000_SECS), Is(NM)),
        row("fresh ETag missing", g.clone(), &[(INM, r#""foo""#)], None, Is(OK)),
        row("fresh weak request, strong response", g.clone(), &[(INM, r#"W/"foo""#)], js("foo", JS_0000_SECS), Is(NM)),
        row("fresh strong request, strong response", g.clone(), &[(INM, r#""foo""#)], js("foo", JS_0000_SECS), Is(NM)),
        row("fresh * given", g.clone(), &[(INM, "*")], js("foo", JS_0000_SECS), Is(NM)),
        // fresh: `*, "bar"` is "ignored" (stale), and so is it on our reads.
        row("fresh * not only value", g.clone(), &[(INM, r#"*, "bar""#)], js("foo", JS_0000_SECS), Is(OK)),
        row("fresh modified since the date", g.clone(), &[(IMS, JS_0000)], js("foo", JS_0100_SECS), Is(OK)),
        row("fresh unmodified since the date", g.clone(), &[(IMS, JS_0100)], js("foo", JS_0000_SECS), Is(NM)),
        row("fresh Last-Modified missing", g.clone(), &[(IMS, JS_0000)], None, Is(OK)),
        row("fresh invalid If-Modified-Since", g.clone(), &[(IMS, "foo")], js("foo", JS_0000_SECS), Is(OK)),
        row("fresh both match", g.clone(), &[(INM, r#""foo""#), (IMS, JS_0100)], js("foo", JS_0000_SECS), Is(NM)),
        // fresh says stale when only the ETag matches; RFC 9110 13.1.3 says IMS is
        // ignored when If-None-Match is present, so the ETag match decides: 304.
        row("fresh only ETag matches (RFC: 304)", g.clone(), &[(INM, r#""foo""#), (IMS, JS_0000)], js("foo", JS_0100_SECS), Is(NM)),
        row("fresh only Last-Modified matches", g.clone(), &[(INM, r#""foo""#), (IMS, JS_0100)], js("bar", JS_0000_SECS), Is(OK)),
        row("fresh none match", g.clone(), &[(INM, r#""foo""#), (IMS, JS_0000)], js("bar", JS_0100_SECS), Is(OK)),
        // `Cache-Control: no-cache` in the request makes fresh answer stale: that is a
        // cache's concern (RFC 9111), out of scope for an origin's precondition check.
    ];
    run(&rows);
}

#[test]
fn our_stricter_rules() {
    let g = Method::GET;
    let p = Method::PUT;
    let amb = Some(("b", RFC_SECS, true));
    #[rustfmt::skip]
    let rows = [
        // A version committed in the same second as its predecessor: its date names two
        // versions, so IUS naming that second fails and IMS naming it is "modified".
        row("ambiguous: IUS same second -> 412", p.clone(), &[(IUS, RFC_DATE)], amb, Is(PF)),
        row("ambiguous: IUS next second -> proceed", p.clone(), &[(IUS, "Sat, 29 Oct 1994 19:43:32 GMT")], amb, Is(OK)),
        row("ambiguous: IUS earlier -> 412", p.clone(), &[(IUS, "Sat, 29 Oct 1994 19:43:30 GMT")], amb, Is(PF)),
        row("ambiguous: IMS same second -> 200", g.clone(), &[(IMS, RFC_DATE)], amb, Is(OK)),
        row("ambiguous: IMS next second -> 304", g.clone(), &[(IMS, "Sat, 29 Oct 1994 19:43:32 GMT")], amb, Is(NM)),
        row("ambiguous: tags are unaffected", g.clone(), &[(INM, r#""b""#)], amb, Is(NM)),
        row("ambiguous: If-Match unaffected", p.clone(), &[(IM, r#""b""#), (IUS, RFC_DATE)], amb, Is(OK)),
        row("no version: IUS on PUT -> 412", p.clone(), &[(IUS, RFC_DATE)], None, Is(PF)),
        row("no version: IUS on DELETE -> 412", Method::DELETE, &[(IUS, RFC_DATE)], None, Is(PF)),
        row("no version: IUS on HEAD ignored", Method::HEAD, &[(IUS, RFC_DATE)], None, Is(OK)),
    ];
    run(&rows);
}

#[test]
fn list_parsing_vectors() {
    let g = Method::GET;
    let p = Method::PUT;
    #[rustfmt::skip]
    let rows = [
        // RFC 9110 5.3: several field lines are one comma-separated list.
        row("lines: match on 2nd line", p.clone(), &[(IM, r#""x""#), (IM, r#""a""#)], rfc("a"), Is(OK)),
        row("lines: INM match on 3rd line", g.clone(), &[(INM, r#""x""#), (INM, r#""y", "z""#), (INM, r#"W/"a""#)], rfc("a"), Is(NM)),
        // A quoted comma is part of the opaque tag, not a separator.
        row("quoted comma matches whole", p.clone(), &[(IM, r#""a,b""#)], rfc("a,b"), Is(OK)),
        row("quoted comma is not a separator", p.clone(), &[(IM, r#""a,b""#)], rfc("a"), Is(PF)),
        row("quoted comma among others", g.clone(), &[(INM, r#""x", W/"a,b", "y""#)], rfc("a,b"), Is(NM)),
        // RFC 9110 5.6.1.2: empty members and OWS are accepted.
        row("empty members and OWS", p.clone(), &[(IM, " ,\t\"x\" ,, \"a\" , ")], rfc("a"), Is(OK)),
        row("empty line among lines", p.clone(), &[(IM, ","), (IM, r#""a""#)], rfc("a"), Is(OK)),
        // W/ is case-sensitive and must be followed by the quote directly.
        row("lowercase w/ is malformed", p.clone(), &[(IM, r#"w/"a""#)], rfc("a"), BadRequest),
        row("space after W/ is malformed", p.clone(), &[(IM, r#"W/ "a""#)], rfc("a"), BadRequest),
        row("weak in If-Match never matches", p.clone(), &[(IM, r#"W/"a", W/"b""#)], rfc("a"), Is(PF)),
        row("weak and strong, strong matches", p.clone(), &[(IM, r#"W/"a", "a""#)], rfc("a"), Is(OK)),
        // `*`.
        row("* with OWS", p.clone(), &[(IM, " * ")], rfc("a"), Is(OK)),
        row("* mixed with a tag", p.clone(), &[(IM, r#"*, "a""#)], rfc("a"), BadRequest),
        row("* and a tag on separate lines", p.clone(), &[(INM, "*"), (INM, r#""a""#)], rfc("a"), BadRequest),
        row("** is malformed", p.clone(), &[(IM, "**")], rfc("a"), BadRequest),
        // Malformed lists.
        row("unquoted tag", p.clone(), &[(IM, "a")], rfc("a"), BadRequest),
        row("missing comma", p.clone(), &[(IM, r#""a" "b""#)], rfc("a"), BadRequest),
        row("unterminated", p.clone(), &[(INM, r#""a"#)], rfc("a"), BadRequest),
        row("space inside a tag", p.clone(), &[(INM, r#""a b""#)], rfc("a"), BadRequest),
        row("empty field value (ours: 400)", p.clone(), &[(IM, "")], rfc("a"), BadRequest),
        // An empty opaque value is a valid tag.
        row("empty opaque tag", p.clone(), &[(IM, r#""""#)], rfc("a"), Is(PF)),
        // A malformed If-None-Match is refused even when If-Match would fail first.
        row("malformed INM with failing IM", p.clone(), &[(IM, r#""z""#), (INM, "bad")], rfc("a"), BadRequest),
    ];
    run(&rows);
}

/// Go's `TestScanETag` single-tag cases, against `EntityTag::from_str` and the list parser.
#[test]
fn go_scan_etag_vectors() {
    for (input, ok) in [
        (r#"W/"etag-1""#, true),
        (r#""etag-2""#, true),
        ("", false),
        ("W/", false),
        (r#"W/"truc"#, false),
        (r#"w/"case-sensitive""#, false),
        (r#""spaced etag""#, false),
    ] {
        assert_eq!(input.parse::<EntityTag>().is_ok(), ok, "{input:?}");
    }
    let w: EntityTag = r#"W/"etag-1""#.parse().unwrap();
    assert!(w.is_weak());
    assert_eq!(w.opaque(), "etag-1");
    // `"etag-1", "etag-2"`: one tag and a remainder for Go; a two-tag list for us.
    let headers = header_map(&[(IM, r#""etag-1", "etag-2""#)]);
    let Some(TagList::Tags(tags)) = parse_tag_list(&headers, &header::IF_MATCH).unwrap() else {
        panic!("expected tags");
    };
    let opaque: Vec<&str> = tags.iter().map(EntityTag::opaque).collect();
    assert_eq!(opaque, ["etag-1", "etag-2"]);
}

/// RFC 9110 8.8.3.2's table, on `EntityTag` directly (weak tags on both sides).
#[test]
fn rfc_9110_comparison_table() {
    let t = |s: &str| s.parse::<EntityTag>().unwrap();
    for (a, b, strong, weak) in [
        (r#"W/"1""#, r#"W/"1""#, false, true),
        (r#"W/"1""#, r#"W/"2""#, false, false),
        (r#"W/"1""#, r#""1""#, false, true),
        (r#""1""#, r#""1""#, true, true),
    ] {
        assert_eq!(t(a).strong_eq(&t(b)), strong, "{a} vs {b} strong");
        assert_eq!(t(a).weak_eq(&t(b)), weak, "{a} vs {b} weak");
        // The comparisons are symmetric.
        assert_eq!(t(b).strong_eq(&t(a)), strong);
        assert_eq!(t(b).weak_eq(&t(a)), weak);
    }
}

#[test]
fn date_forms_parse() {
    // RFC 9110 5.6.7: IMF-fixdate, obsolete RFC 850 and asctime forms, one instant.
    const T: u64 = 784_111_777; // Sun, 06 Nov 1994 08:49:37 GMT
    for date in [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        " Sun, 06 Nov 1994 08:49:37 GMT ",
    ] {
        for name in [IMS, IUS] {
            let pre = Preconditions::from_headers(&header_map(&[(name, date)])).unwrap();
            let got = if name == IMS {
                pre.if_modified_since
            } else {
                pre.if_unmodified_since
            };
            assert_eq!(got, Some(T), "{name}: {date:?}");
        }
    }
    // The other dates the vectors use parse to the seconds we hard-coded.
    for (date, secs) in [
        (DJ_LM, DJ_LM_SECS),
        (RFC_DATE, RFC_SECS),
        (GO_DATE, GO_SECS),
        (JS_0000, JS_0000_SECS),
        (JS_0100, JS_0100_SECS),
    ] {
        let pre = Preconditions::from_headers(&header_map(&[(IMS, date)])).unwrap();
        assert_eq!(pre.if_modified_since, Some(secs), "{date}");
    }
}

#[test]
fn invalid_dates_are_ignored() {
    for bad in [
        DJ_INVALID,                        // day 32 (Django's invalid date)
        "Sun, 06 Nov 1994 08:49:37",       // no zone
        "Sun, 06 Nov 1994 08:49:37 +0000", // numeric zone is not an HTTP-date
        "Sun, 06 Nov 1994 25:49:37 GMT",   // hour 25
        "06 Nov 1994 08:49:37 GMT",        // no weekday
        "1994-11-06T08:49:37Z",            // ISO 8601
        "784111777",                       // epoch seconds
        "yesterday",
        "",
        "Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT", // two members
    ] {
        let pre = Preconditions::from_headers(&header_map(&[(IMS, bad), (IUS, bad)])).unwrap();
        assert_eq!(pre.if_modified_since, None, "IMS {bad:?}");
        assert_eq!(pre.if_unmodified_since, None, "IUS {bad:?}");
        assert!(pre.is_empty(), "{bad:?}");
    }
    // Non-UTF-8 bytes in a date field are ignored too, without panicking.
    let mut headers = HeaderMap::new();
    headers.insert(
        header::IF_MODIFIED_SINCE,
        HeaderValue::from_bytes(b"Sun, 06 Nov 1994 08:49:37 GMT\xff").unwrap(),
    );
    assert_eq!(
        Preconditions::from_headers(&headers)
            .unwrap()
            .if_modified_since,
        None
    );
    // An ignored IUS does not guard a write (require_precondition counts it as absent).
    let pre = Preconditions::from_headers(&header_map(&[(IUS, "nope")])).unwrap();
    assert!(!pre.guards_write());
}

#[test]
fn sub_second_modification_times_truncate() {
    // Go's range_with_modtime_nanos / "Last-Modified truncates sub-second precision":
    // a version modified at 17:12:18.123 is not modified since 17:12:18.
    let at = UNIX_EPOCH + Duration::from_secs(GO_SECS) + Duration::from_millis(123);
    let v = Version::new(EntityTag::strong("A").unwrap(), at).unwrap();
    assert_eq!(v.last_modified_secs(), GO_SECS);
    let pre = Preconditions::from_headers(&header_map(&[(IMS, GO_DATE)])).unwrap();
    assert_eq!(evaluate(&Method::GET, &pre, Some(&v)), NM);
    let pre = Preconditions::from_headers(&header_map(&[(IUS, GO_DATE)])).unwrap();
    assert_eq!(evaluate(&Method::PUT, &pre, Some(&v)), OK);
}

#[test]
fn tag_list_bound_is_an_error_not_a_truncation() {
    // The 65th tag (past MAX_LIST_TAGS) would match: a parser that truncated silently
    // would answer 412 for a precondition that holds; ours refuses the field.
    let mut list = vec![r#""x""#.to_owned(); MAX_LIST_TAGS];
    list.push(r#""a""#.to_owned());
    let value = list.join(", ");
    let mut headers = HeaderMap::new();
    headers.insert(header::IF_MATCH, HeaderValue::from_str(&value).unwrap());
    assert!(Preconditions::from_headers(&headers).is_err());
}
