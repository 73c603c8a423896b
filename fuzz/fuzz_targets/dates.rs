//! `If-Modified-Since` / `If-Unmodified-Since`: arbitrary bytes as one or two field lines.
//!
//! `Preconditions::from_headers` never panics and never fails on dates; both fields read
//! the same bytes the same way; a repeated field is ignored; an accepted date survives a
//! format-and-parse round trip and compares as the evaluator says it should.

#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use http::{
    header::{IF_MODIFIED_SINCE, IF_UNMODIFIED_SINCE},
    HeaderMap, HeaderValue, Method,
};
use libfuzzer_sys::fuzz_target;
use tower_precondition::{
    evaluate::{evaluate, Decision, Preconditions},
    EntityTag, Version,
};

fuzz_target!(|data: &[u8]| {
    let lines: Vec<HeaderValue> = data
        .split(|&b| b == b'\n')
        .take(2)
        .filter_map(|line| HeaderValue::from_bytes(line).ok())
        .collect();
    if lines.is_empty() {
        return;
    }
    let mut headers = HeaderMap::new();
    for line in &lines {
        headers.append(IF_MODIFIED_SINCE, line.clone());
        headers.append(IF_UNMODIFIED_SINCE, line.clone());
    }
    let pre = Preconditions::from_headers(&headers).expect("dates alone never fail parsing");
    assert!(pre.if_match.is_none() && pre.if_none_match.is_none());
    assert_eq!(pre.if_modified_since, pre.if_unmodified_since);
    if lines.len() > 1 {
        assert_eq!(
            pre.if_modified_since, None,
            "a repeated date field is ignored"
        );
    }
    let Some(secs) = pre.if_modified_since else {
        return;
    };

    // An accepted date is one an IMF-fixdate can name again.
    let text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
    let mut again = HeaderMap::new();
    again.insert(
        IF_MODIFIED_SINCE,
        text.parse().expect("IMF-fixdate is a header value"),
    );
    let reparsed = Preconditions::from_headers(&again).expect("dates alone never fail parsing");
    assert_eq!(reparsed.if_modified_since, Some(secs), "{text}");

    // And it compares with one-second resolution.
    let tag = EntityTag::strong("v").expect("valid tag");
    let at = Version::from_parts(tag.clone(), secs, false).expect("strong");
    let after = Version::from_parts(tag, secs + 1, false).expect("strong");
    let ims = Preconditions {
        if_modified_since: Some(secs),
        ..Default::default()
    };
    assert_eq!(
        evaluate(&Method::GET, &ims, Some(&at)),
        Decision::NotModified
    );
    assert_eq!(
        evaluate(&Method::GET, &ims, Some(&after)),
        Decision::Proceed
    );
    let ius = Preconditions {
        if_unmodified_since: Some(secs),
        ..Default::default()
    };
    assert_eq!(evaluate(&Method::PUT, &ius, Some(&at)), Decision::Proceed);
    assert_eq!(
        evaluate(&Method::PUT, &ius, Some(&after)),
        Decision::PreconditionFailed
    );
});
