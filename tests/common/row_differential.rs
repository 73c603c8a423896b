//! The generated cases of the row-version differential tests (every database): row
//! states around one second, and the precondition fields of a write, so that each
//! database's one-statement condition can be checked against the RFC evaluator.
#![allow(dead_code)] // each test file uses a different subset

use proptest::prelude::*;
use tower_precondition::{row_version::RowVersion, store::Version};

/// The row's second: 2026-12-02T04:22:55Z.
pub const BASE: i64 = 1_796_185_375;

/// A row state: `None` (absent) or (version, microseconds past `BASE`'s start).
pub fn row_state() -> impl Strategy<Value = Option<(i64, i64)>> {
    prop_oneof![
        1 => Just(None),
        4 => (1i64..=4, prop_oneof![
            Just(-1_000_000i64),   // the second before
            Just(0i64),
            Just(264_513i64),
            Just(999_000i64),      // the last millisecond: not the marker
            Just(999_999i64),      // the marker: a second write within BASE
            Just(1_500_000i64),    // the second after
        ])
        .prop_map(Some),
    ]
}

/// One entity tag: strong, weak, an encoded representation's, a non-canonical number,
/// a foreign one.
fn tag() -> impl Strategy<Value = String> {
    prop_oneof![
        (1i64..=4).prop_map(|n| format!("\"{n}\"")),
        (1i64..=4).prop_map(|n| format!("W/\"{n}\"")),
        (1i64..=4).prop_map(|n| format!("\"{n}-gzip\"")),
        (1i64..=4).prop_map(|n| format!("\"0{n}\"")),
        Just("\"x\"".to_owned()),
    ]
}

/// An `If-Match` / `If-None-Match` value: absent, `*`, or a list.
pub fn tag_field() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some("*".to_owned())),
        3 => prop::collection::vec(tag(), 1..4).prop_map(|tags| Some(tags.join(", "))),
    ]
}

/// An `If-Unmodified-Since` value: absent, the second before, of or after `BASE`, or
/// not a date.
pub fn date_field() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        (-1i64..=1).prop_map(|offset| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs((BASE + offset) as u64);
            Some(httpdate::fmt_http_date(at))
        }),
        Just(Some("not a date".to_owned())),
    ]
}

/// The evaluator's view of a row version: its tag, its second, and whether that
/// second is ambiguous (or unknown).
pub fn version_of(row: &RowVersion) -> Version {
    let secs = row
        .last_modified()
        .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
    Version::from_parts(
        row.etag().clone(),
        secs.unwrap_or(u64::MAX),
        row.last_modified_ambiguous() || secs.is_none(),
    )
    .unwrap()
}
