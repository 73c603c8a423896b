//! A single entity tag: `EntityTag::parse_bytes` on arbitrary bytes (and `FromStr` on
//! arbitrary text).
//!
//! Never panics; an accepted tag turns back into exactly the bytes it came from, its
//! `Display` form parses back to it, the constructors agree with the parser, and the list
//! parser reads the same tag.

#![no_main]

use http::{header::IF_MATCH, HeaderMap};
use libfuzzer_sys::fuzz_target;
use tower_precondition::etag::{parse_tag_list, EntityTag, TagList, MAX_LIST_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(tag) = text.parse::<EntityTag>() {
            assert_eq!(
                tag.to_string(),
                text,
                "FromStr then Display is the identity"
            );
        }
    }

    let Ok(tag) = EntityTag::parse_bytes(data) else {
        return;
    };
    assert_eq!(tag.to_header_value().as_bytes(), data, "exact round trip");

    let text = tag.to_string();
    let back: EntityTag = text.parse().expect("Display output parses");
    assert_eq!(back, tag);
    assert_eq!(format!("{tag:?}"), text);

    let prefix = if tag.is_weak() { 4 } else { 2 };
    assert_eq!(tag.opaque().chars().count() + prefix, data.len());
    let rebuilt = if tag.is_weak() {
        EntityTag::weak(tag.opaque())
    } else {
        EntityTag::strong(tag.opaque())
    }
    .expect("an accepted opaque value is accepted by the constructors");
    assert_eq!(rebuilt, tag);
    assert!(tag.weak_eq(&rebuilt));
    assert_eq!(tag.strong_eq(&rebuilt), !tag.is_weak());

    if data.len() <= MAX_LIST_BYTES {
        let mut headers = HeaderMap::new();
        headers.insert(IF_MATCH, tag.to_header_value());
        assert_eq!(
            parse_tag_list(&headers, &IF_MATCH),
            Ok(Some(TagList::Tags(tag.into())))
        );
    }
});
