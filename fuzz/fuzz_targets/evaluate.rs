//! The evaluator: a method, up to four field lines for each precondition field and an
//! optional current version, all derived from the input.
//!
//! `Preconditions::from_headers` then `evaluate` never panic, and the decision keeps the
//! RFC 9110 section 13.2.2 invariants checked below.

#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use arbitrary::Arbitrary;
use http::{
    header::{self, HeaderName},
    HeaderMap, HeaderValue, Method,
};
use libfuzzer_sys::fuzz_target;
use tower_precondition::{
    etag::TagList,
    evaluate::{evaluate, is_read, Decision, Preconditions},
    EntityTag, Version,
};

/// The last second an HTTP-date can name (9999-12-31T23:59:59Z).
const MAX_DATE_SECS: u64 = 253_402_300_799;

/// Any date is measured from here when there is no current version.
const BASE_SECS: u64 = 784_111_777;

/// One `If-Match` / `If-None-Match` field line; the structured variants make matching
/// tags likely, `Raw` keeps the whole byte space reachable.
#[derive(Arbitrary, Debug)]
enum TagLine {
    Raw(Vec<u8>),
    Star,
    Current {
        weak: bool,
    },
    Tag {
        weak: bool,
        opaque: Vec<u8>,
    },
    Pair {
        first_weak: bool,
        second_weak: bool,
        opaque: Vec<u8>,
    },
}

/// One `If-Modified-Since` / `If-Unmodified-Since` field line.
#[derive(Arbitrary, Debug)]
enum DateLine {
    Raw(Vec<u8>),
    /// An IMF-fixdate this many seconds from the current version's date.
    Near(i16),
}

#[derive(Arbitrary, Debug)]
struct Current {
    opaque: Vec<u8>,
    secs: u64,
    /// Keep the date in the range HTTP-dates can name, near `BASE_SECS`, most of the time.
    near: Option<i16>,
    ambiguous: bool,
    /// A version a read gave (not a write).
    seeded: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    method: u8,
    if_match: Vec<TagLine>,
    if_none_match: Vec<TagLine>,
    if_unmodified_since: Vec<DateLine>,
    if_modified_since: Vec<DateLine>,
    current: Option<Current>,
}

fn is_etagc(byte: u8) -> bool {
    byte == 0x21 || (0x23..=0x7E).contains(&byte) || byte >= 0x80
}

fn opaque(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().copied().filter(|&b| is_etagc(b)).collect()
}

fn quoted(weak: bool, opaque: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(opaque.len() + 4);
    if weak {
        out.extend_from_slice(b"W/");
    }
    out.push(b'"');
    out.extend_from_slice(opaque);
    out.push(b'"');
    out
}

fn tag_line(line: &TagLine, current: &[u8]) -> Vec<u8> {
    match line {
        TagLine::Raw(bytes) => bytes.clone(),
        TagLine::Star => b"*".to_vec(),
        TagLine::Current { weak } => quoted(*weak, current),
        TagLine::Tag { weak, opaque: o } => quoted(*weak, &opaque(o)),
        TagLine::Pair {
            first_weak,
            second_weak,
            opaque: o,
        } => {
            let mut out = quoted(*first_weak, &opaque(o));
            out.extend_from_slice(b", ");
            out.extend_from_slice(&quoted(*second_weak, current));
            out
        }
    }
}

fn date_line(line: &DateLine, base: u64) -> Vec<u8> {
    match line {
        DateLine::Raw(bytes) => bytes.clone(),
        DateLine::Near(delta) => {
            let secs = base
                .saturating_add_signed(i64::from(*delta))
                .min(MAX_DATE_SECS);
            httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs)).into_bytes()
        }
    }
}

fn append(headers: &mut HeaderMap, name: &HeaderName, lines: impl Iterator<Item = Vec<u8>>) {
    for line in lines.take(4) {
        if let Ok(value) = HeaderValue::from_bytes(&line) {
            headers.append(name.clone(), value);
        }
    }
}

fuzz_target!(|input: Input| {
    let method = [
        Method::GET,
        Method::HEAD,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::POST,
    ][usize::from(input.method) % 6]
        .clone();

    let current = input.current.as_ref().map(|c| {
        let secs = match c.near {
            Some(delta) => BASE_SECS.saturating_add_signed(i64::from(delta)),
            None => c.secs,
        };
        let opaque: String = opaque(&c.opaque).into_iter().map(char::from).collect();
        let tag = EntityTag::strong(opaque).expect("etagc bytes make a valid tag");
        Version::from_parts(tag, secs, c.ambiguous)
            .expect("a strong tag makes a version")
            .with_seeded(c.seeded)
    });
    let current_opaque: Vec<u8> = current
        .as_ref()
        .map(|v| v.etag().opaque().chars().map(|c| c as u8).collect())
        .unwrap_or_else(|| b"none".to_vec());
    let base = current
        .as_ref()
        .map_or(BASE_SECS, Version::last_modified_secs);

    let mut headers = HeaderMap::new();
    let tags = |lines: &[TagLine]| {
        lines
            .iter()
            .map(|l| tag_line(l, &current_opaque))
            .collect::<Vec<_>>()
    };
    let dates = |lines: &[DateLine]| lines.iter().map(|l| date_line(l, base)).collect::<Vec<_>>();
    append(
        &mut headers,
        &header::IF_MATCH,
        tags(&input.if_match).into_iter(),
    );
    append(
        &mut headers,
        &header::IF_NONE_MATCH,
        tags(&input.if_none_match).into_iter(),
    );
    append(
        &mut headers,
        &header::IF_UNMODIFIED_SINCE,
        dates(&input.if_unmodified_since).into_iter(),
    );
    append(
        &mut headers,
        &header::IF_MODIFIED_SINCE,
        dates(&input.if_modified_since).into_iter(),
    );

    // The layer renders the current version's validators on a 304 / 412: that must not
    // panic whatever date a store hands back.
    if let Some(v) = &current {
        let rendered = httpdate::fmt_http_date(v.last_modified());
        assert!(!rendered.is_empty());
    }

    // What the layer parses: a read ignores a malformed If-None-Match, and its
    // answer then equals the one without that field.
    let pre = match Preconditions::from_request(&method, &headers) {
        Ok(pre) => pre,
        Err(e) => {
            assert!(*e.header() == header::IF_MATCH || *e.header() == header::IF_NONE_MATCH);
            assert!(
                !(is_read(&method) && *e.header() == header::IF_NONE_MATCH),
                "a read refused for a malformed If-None-Match"
            );
            return;
        }
    };
    if let Ok(strict) = Preconditions::from_headers(&headers) {
        assert_eq!(strict, pre, "both parsers agree on well-formed fields");
    }
    let decision = evaluate(&method, &pre, current.as_ref());
    assert_eq!(decision, evaluate(&method, &pre, current.as_ref()));
    let read = is_read(&method);
    let check = |ok: bool, what: &str| {
        assert!(
            ok,
            "{what}: {method} {pre:?} current={current:?} -> {decision:?}"
        );
    };

    check(
        read || decision != Decision::NotModified,
        "a write never gets 304",
    );
    check(
        decision != Decision::NotModified || current.is_some(),
        "304 needs a current version",
    );
    if headers.is_empty() {
        check(pre.is_empty(), "no fields, no preconditions");
    }
    if pre.is_empty() {
        check(decision == Decision::Proceed, "no precondition proceeds");
    }
    if !read && !pre.guards_write() {
        check(
            decision == Decision::Proceed,
            "If-Modified-Since alone never stops a write",
        );
    }
    // A seeded version (a read gave it) does not prove the resource exists: a write's
    // If-None-Match: * is left to the handler then.
    if pre.if_none_match == Some(TagList::Any)
        && current.as_ref().is_some_and(|v| read || !v.is_seeded())
    {
        check(
            decision != Decision::Proceed,
            "If-None-Match: * with a current version",
        );
    }
    match &pre.if_match {
        Some(TagList::Tags(tags)) if tags.iter().all(EntityTag::is_weak) => check(
            decision == Decision::PreconditionFailed,
            "If-Match with only weak tags",
        ),
        Some(_) if current.is_none() => check(
            decision == Decision::PreconditionFailed,
            "If-Match without a current version",
        ),
        _ => {}
    }
    if decision == Decision::Proceed {
        if let (Some(TagList::Tags(tags)), Some(v)) = (&pre.if_match, &current) {
            // Strong comparison, of the version's tag or one of its encoded forms.
            check(
                tags.iter()
                    .any(|t| !t.is_weak() && t.names_version(v.etag())),
                "If-Match proceeds only on a strong match",
            );
        }
        if let (Some(TagList::Tags(tags)), Some(v)) = (&pre.if_none_match, &current) {
            check(
                !tags.iter().any(|t| t.names_version(v.etag())),
                "If-None-Match proceeds only without a weak match",
            );
        }
    }
});
