//! `If-Match` / `If-None-Match` list parser: arbitrary bytes as one to four field lines.
//!
//! Never panics; a parsed list is bounded, each tag re-parses from its own header value,
//! both fields share one grammar, and field lines are equivalent to one line joined
//! with `", "` (RFC 9110 section 5.3).

#![no_main]

use http::{
    header::{IF_MATCH, IF_NONE_MATCH},
    HeaderMap, HeaderValue,
};
use libfuzzer_sys::fuzz_target;
use tower_precondition::etag::{parse_tag_list, EntityTag, TagList, MAX_LIST_BYTES, MAX_LIST_TAGS};

fuzz_target!(|data: &[u8]| {
    // `\n` can never be inside a header value, so it is a safe line separator.
    let lines: Vec<HeaderValue> = data
        .split(|&b| b == b'\n')
        .take(4)
        .filter_map(|line| HeaderValue::from_bytes(line).ok())
        .collect();
    if lines.is_empty() {
        return;
    }
    let mut headers = HeaderMap::new();
    for line in &lines {
        headers.append(IF_MATCH, line.clone());
        headers.append(IF_NONE_MATCH, line.clone());
    }

    let if_match = parse_tag_list(&headers, &IF_MATCH);
    let if_none_match = parse_tag_list(&headers, &IF_NONE_MATCH);
    match (&if_match, &if_none_match) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => {
            assert_eq!(a.reason(), b.reason());
            assert_eq!(a.header(), IF_MATCH);
            assert_eq!(b.header(), IF_NONE_MATCH);
        }
        _ => panic!("If-Match and If-None-Match disagree: {if_match:?} / {if_none_match:?}"),
    }

    let total: usize = lines.iter().map(HeaderValue::len).sum();
    let Ok(list) = if_match else {
        check_joined(&lines, None);
        return;
    };
    let list = list.expect("the field is present, so it is never Ok(None)");
    assert!(total <= MAX_LIST_BYTES, "accepted {total} bytes");
    if let TagList::Tags(tags) = &list {
        assert!(
            !tags.is_empty() && tags.len() <= MAX_LIST_TAGS,
            "{} tags",
            tags.len()
        );
        for tag in tags {
            let wire = tag.to_header_value();
            let back = EntityTag::parse_bytes(wire.as_bytes()).expect("a tag's own value parses");
            assert_eq!(&back, tag);
        }
    }
    check_joined(&lines, Some(&list));
});

/// The same lines joined into one field line parse to the same list, or fail likewise.
fn check_joined(lines: &[HeaderValue], expected: Option<&TagList>) {
    let joined = lines
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b", "[..]);
    if joined.len() > MAX_LIST_BYTES {
        return;
    }
    let mut one = HeaderMap::new();
    one.insert(
        IF_MATCH,
        HeaderValue::from_bytes(&joined).expect("valid lines joined by \", \" stay valid"),
    );
    let parsed = parse_tag_list(&one, &IF_MATCH);
    assert_eq!(
        parsed.as_ref().ok().map(|list| list.as_ref()),
        expected.map(Some),
        "joined line {:?}",
        String::from_utf8_lossy(&joined)
    );
}
