//! Property tests for the entity-tag parser and the evaluator.

use http::{
    header::{IF_MATCH, IF_NONE_MATCH},
    HeaderMap, HeaderValue, Method,
};
use proptest::prelude::*;
use tower_precondition::{
    etag::{parse_tag_list, EntityTag, TagList, MAX_LIST_BYTES, MAX_LIST_TAGS},
    evaluate::{evaluate, Decision, Preconditions},
    store::Version,
};

// ---------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------

/// Bytes allowed inside an opaque tag (`etagc`: %x21 / %x23-7E / obs-text).
fn etagc() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(0x21u8),
        0x23u8..=0x7E,
        0x80u8..=0xFF,
        // Bias towards the bytes that mean something to the list grammar.
        Just(b','),
        Just(b'W'),
        Just(b'/'),
        Just(b'*'),
    ]
}

/// A valid tag as (weak, opaque wire bytes).
fn wire_tag() -> impl Strategy<Value = (bool, Vec<u8>)> {
    (any::<bool>(), prop::collection::vec(etagc(), 0..24))
}

fn wire_bytes(weak: bool, opaque: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(opaque.len() + 4);
    if weak {
        out.extend_from_slice(b"W/");
    }
    out.push(b'"');
    out.extend_from_slice(opaque);
    out.push(b'"');
    out
}

/// Bytes with a heavy share of the grammar's own characters, so that the parser's
/// interesting paths are hit far more often than uniform bytes would.
fn list_noise() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(b"\"W/,* \tw".to_vec()),
            2 => 0x21u8..=0x7E,
            1 => any::<u8>(),
        ],
        0..160,
    )
}

/// Optional whitespace: zero to three spaces or tabs.
fn ows() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![b' ', b'\t']), 0..3)
}

fn headers_with(name: &http::HeaderName, lines: &[Vec<u8>]) -> Option<HeaderMap> {
    let mut map = HeaderMap::new();
    for line in lines {
        map.append(name.clone(), HeaderValue::from_bytes(line).ok()?);
    }
    Some(map)
}

/// Tags from a tiny alphabet so that matches are frequent.
fn small_tag() -> impl Strategy<Value = EntityTag> {
    (any::<bool>(), prop::sample::select(vec!["a", "b", "c"])).prop_map(|(weak, o)| {
        if weak {
            EntityTag::weak(o).unwrap()
        } else {
            EntityTag::strong(o).unwrap()
        }
    })
}

fn tag_list() -> impl Strategy<Value = Option<TagList>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(TagList::Any)),
        3 => prop::collection::vec(small_tag(), 1..4).prop_map(|t| Some(TagList::Tags(t.into()))),
    ]
}

const BASE: u64 = 1_700_000_000;

fn date() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![Just(None), (BASE - 3..BASE + 3).prop_map(Some)]
}

fn preconditions() -> impl Strategy<Value = Preconditions> {
    (tag_list(), tag_list(), date(), date()).prop_map(|(im, inm, ius, ims)| Preconditions {
        if_match: im,
        if_none_match: inm,
        if_unmodified_since: ius,
        if_modified_since: ims,
    })
}

fn current() -> impl Strategy<Value = Option<Version>> {
    prop_oneof![
        1 => Just(None),
        4 => (
            prop::sample::select(vec!["a", "b", "c"]),
            BASE - 2..BASE + 2,
            any::<bool>()
        )
            .prop_map(|(t, secs, amb)| Version::from_parts(
                EntityTag::strong(t).unwrap(),
                secs,
                amb
            )),
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop::sample::select(vec![
        Method::GET,
        Method::HEAD,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::POST,
        Method::OPTIONS,
    ])
}

fn is_read(m: &Method) -> bool {
    m == Method::GET || m == Method::HEAD
}

// ---------------------------------------------------------------------------------
// Parser properties
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// The list parser never panics, whatever the bytes and however many lines; when
    /// it accepts, it respects its bounds and the result re-serializes to itself.
    #[test]
    fn list_parser_never_panics(lines in prop::collection::vec(list_noise(), 1..4)) {
        for name in [&IF_MATCH, &IF_NONE_MATCH] {
            let Some(headers) = headers_with(name, &lines) else { continue };
            match parse_tag_list(&headers, name) {
                Ok(Some(TagList::Tags(tags))) => {
                    prop_assert!(!tags.is_empty() && tags.len() <= MAX_LIST_TAGS);
                    let joined: Vec<u8> = tags
                        .iter()
                        .map(|t| t.to_header_value().as_bytes().to_vec())
                        .collect::<Vec<_>>()
                        .join(&b", "[..]);
                    let again = headers_with(name, &[joined]).unwrap();
                    prop_assert_eq!(
                        parse_tag_list(&again, name).unwrap(),
                        Some(TagList::Tags(tags))
                    );
                }
                Ok(Some(TagList::Any)) => {}
                Ok(None) => prop_assert!(false, "present field parsed as absent"),
                Err(e) => prop_assert!(!e.reason().is_empty()),
            }
        }
    }

    /// A single-tag parse never panics either.
    #[test]
    fn single_tag_parser_never_panics(bytes in list_noise()) {
        if let Ok(tag) = EntityTag::parse_bytes(&bytes) {
            prop_assert_eq!(tag.to_header_value().as_bytes().to_vec(), bytes);
        }
    }

}

proptest! {
    // Each case builds up to MAX_LIST_TAGS tags: fewer cases keep the debug run short.
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any list of valid tags, written with random OWS, random empty members and split
    /// over random field lines, parses back to exactly those tags in order.
    #[test]
    fn valid_lists_round_trip(
        tags in prop::collection::vec(wire_tag(), 1..=MAX_LIST_TAGS),
        seps in prop::collection::vec((ows(), 0usize..3, ows(), any::<bool>()), MAX_LIST_TAGS + 1),
        leading in (ows(), 0usize..3),
    ) {
        let mut lines: Vec<Vec<u8>> = Vec::new();
        let mut line = leading.0.clone();
        line.extend(std::iter::repeat_n(b',', leading.1));
        for (i, (weak, opaque)) in tags.iter().enumerate() {
            line.extend(wire_bytes(*weak, opaque));
            let (before, empties, after, new_line) = &seps[i];
            line.extend(before);
            if i + 1 < tags.len() && *new_line {
                // End this field line here; the next member starts a new one.
                lines.push(std::mem::take(&mut line));
                line.extend(after);
                continue;
            }
            line.push(b',');
            for _ in 0..*empties {
                line.extend(after);
                line.push(b',');
            }
            line.extend(after);
        }
        lines.push(line);
        prop_assume!(lines.iter().map(Vec::len).sum::<usize>() <= MAX_LIST_BYTES);

        let headers = headers_with(&IF_NONE_MATCH, &lines).expect("valid header bytes");
        let parsed = parse_tag_list(&headers, &IF_NONE_MATCH);
        let Ok(Some(TagList::Tags(parsed))) = parsed else {
            return Err(TestCaseError::fail(format!("{parsed:?} for {lines:?}")));
        };
        prop_assert_eq!(parsed.len(), tags.len());
        for (got, (weak, opaque)) in parsed.iter().zip(&tags) {
            prop_assert_eq!(got.is_weak(), *weak);
            prop_assert_eq!(got.to_header_value().as_bytes().to_vec(), wire_bytes(*weak, opaque));
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// A tag survives every conversion: wire bytes -> tag -> header value -> tag, the
    /// constructors agree with the parser, and `Display` / `FromStr` are inverses.
    #[test]
    fn tag_round_trips((weak, opaque) in wire_tag()) {
        let wire = wire_bytes(weak, &opaque);
        let tag = EntityTag::parse_bytes(&wire).unwrap();
        prop_assert_eq!(tag.is_weak(), weak);
        prop_assert_eq!(tag.to_header_value().as_bytes().to_vec(), wire.clone());
        prop_assert_eq!(&EntityTag::parse_bytes(tag.to_header_value().as_bytes()).unwrap(), &tag);
        // Each wire byte is one char of the opaque value (ISO-8859-1 reading).
        prop_assert_eq!(tag.opaque().chars().count(), opaque.len());
        let built = if weak {
            EntityTag::weak(tag.opaque()).unwrap()
        } else {
            EntityTag::strong(tag.opaque()).unwrap()
        };
        prop_assert_eq!(&built, &tag);
        prop_assert_eq!(&tag.to_string().parse::<EntityTag>().unwrap(), &tag);
    }

    // -------------------------------------------------------------------------------
    // Evaluator properties
    // -------------------------------------------------------------------------------

    /// The evaluator never panics, and its decisions keep the RFC's invariants.
    #[test]
    fn evaluator_invariants(m in method(), pre in preconditions(), cur in current()) {
        let d = evaluate(&m, &pre, cur.as_ref());
        let read = is_read(&m);

        // Writes never get 304.
        if !read {
            prop_assert_ne!(d, Decision::NotModified);
        }
        // HEAD is evaluated exactly as GET.
        if read {
            let other = if m == Method::GET { Method::HEAD } else { Method::GET };
            prop_assert_eq!(evaluate(&other, &pre, cur.as_ref()), d);
        }
        // If-None-Match: * with a current version never proceeds.
        if matches!(pre.if_none_match, Some(TagList::Any)) && cur.is_some() {
            prop_assert_ne!(d, Decision::Proceed);
        }
        // If-Match with no current version always fails.
        if pre.if_match.is_some() && cur.is_none() {
            prop_assert_eq!(d, Decision::PreconditionFailed);
        }
        // A list of only weak tags never satisfies If-Match.
        if let Some(TagList::Tags(tags)) = &pre.if_match {
            if tags.iter().all(EntityTag::is_weak) {
                prop_assert_eq!(d, Decision::PreconditionFailed);
            }
        }
        // If-Match naming the current strong tag: IUS is masked, and the answer is the
        // one If-None-Match / If-Modified-Since give on their own.
        if let (Some(TagList::Tags(tags)), Some(v)) = (&pre.if_match, &cur) {
            if tags.iter().any(|t| !t.is_weak() && t.opaque() == v.etag().opaque()) {
                let rest = Preconditions {
                    if_match: None,
                    if_unmodified_since: None,
                    ..pre.clone()
                };
                prop_assert_eq!(d, evaluate(&m, &rest, cur.as_ref()));
                let inm_matches = match &pre.if_none_match {
                    Some(TagList::Any) => true,
                    Some(TagList::Tags(t)) => t.iter().any(|t| t.weak_eq(v.etag())),
                    None => false,
                };
                if !inm_matches && (!read || pre.if_modified_since.is_none()) {
                    prop_assert_eq!(d, Decision::Proceed);
                }
            }
        }
        // If-Modified-Since only ever matters to reads.
        if !read {
            let no_ims = Preconditions { if_modified_since: None, ..pre.clone() };
            prop_assert_eq!(evaluate(&m, &no_ims, cur.as_ref()), d);
        }
        // No precondition at all: always proceed.
        prop_assert_eq!(evaluate(&m, &Preconditions::default(), cur.as_ref()), Decision::Proceed);
    }

    /// If-Unmodified-Since alone is monotonic in its date: passing at `since` implies
    /// passing at any later date; and an ambiguous version fails its own second.
    #[test]
    fn unmodified_since_is_monotonic(m in method(), cur in current(), since in BASE - 3..BASE + 3) {
        let at = |s| Preconditions { if_unmodified_since: Some(s), ..Default::default() };
        if evaluate(&m, &at(since), cur.as_ref()) == Decision::Proceed {
            prop_assert_eq!(evaluate(&m, &at(since + 1), cur.as_ref()), Decision::Proceed);
        }
        if let Some(v) = &cur {
            if v.last_modified_ambiguous() {
                prop_assert_eq!(
                    evaluate(&m, &at(v.last_modified_secs()), cur.as_ref()),
                    Decision::PreconditionFailed
                );
            }
        }
    }

    /// Parsing then evaluating arbitrary header bytes never panics.
    #[test]
    fn from_headers_then_evaluate_never_panics(
        im in prop::option::of(list_noise()),
        inm in prop::option::of(list_noise()),
        ius in prop::option::of(list_noise()),
        ims in prop::option::of(list_noise()),
        m in method(),
        cur in current(),
    ) {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            (http::header::IF_MATCH, im),
            (http::header::IF_NONE_MATCH, inm),
            (http::header::IF_UNMODIFIED_SINCE, ius),
            (http::header::IF_MODIFIED_SINCE, ims),
        ] {
            if let Some(v) = value.and_then(|v| HeaderValue::from_bytes(&v).ok()) {
                headers.insert(name, v);
            }
        }
        if let Ok(pre) = Preconditions::from_headers(&headers) {
            let _ = evaluate(&m, &pre, cur.as_ref());
        }
    }
}

// ---------------------------------------------------------------------------------
// Bounded work
// ---------------------------------------------------------------------------------

#[test]
fn thousands_of_tags_are_refused() {
    // On one line (within the byte bound, so the tag-count bound is what refuses it).
    let many = vec![r#""x""#; 2000].join(",");
    assert!(many.len() <= MAX_LIST_BYTES);
    let headers = headers_with(&IF_MATCH, &[many.into_bytes()]).unwrap();
    assert!(parse_tag_list(&headers, &IF_MATCH).is_err());

    // Spread over thousands of field lines.
    let lines: Vec<Vec<u8>> = (0..2000).map(|_| b"\"x\"".to_vec()).collect();
    let headers = headers_with(&IF_NONE_MATCH, &lines).unwrap();
    assert!(parse_tag_list(&headers, &IF_NONE_MATCH).is_err());
    assert!(Preconditions::from_headers(&headers).is_err());

    // One enormous line.
    let huge = format!("\"{}\"", "a".repeat(1 << 20));
    let headers = headers_with(&IF_MATCH, &[huge.into_bytes()]).unwrap();
    assert!(parse_tag_list(&headers, &IF_MATCH).is_err());

    // Thousands of empty members around one tag stay within the byte bound and parse;
    // past it they are refused.
    let commas = format!("{}\"a\"", ",".repeat(MAX_LIST_BYTES - 3));
    let headers = headers_with(&IF_MATCH, &[commas.into_bytes()]).unwrap();
    assert!(matches!(
        parse_tag_list(&headers, &IF_MATCH),
        Ok(Some(TagList::Tags(t))) if t.len() == 1
    ));
    let commas = format!("{}\"a\"", ",".repeat(MAX_LIST_BYTES));
    let headers = headers_with(&IF_MATCH, &[commas.into_bytes()]).unwrap();
    assert!(parse_tag_list(&headers, &IF_MATCH).is_err());
}

#[test]
fn exactly_the_bound_is_accepted() {
    let max = vec![r#""x""#; MAX_LIST_TAGS].join(",");
    let headers = headers_with(&IF_MATCH, &[max.into_bytes()]).unwrap();
    assert!(matches!(
        parse_tag_list(&headers, &IF_MATCH),
        Ok(Some(TagList::Tags(t))) if t.len() == MAX_LIST_TAGS
    ));
}

#[test]
fn display_and_from_str_are_inverse_for_obs_text() {
    // Regression: `FromStr` used to read the string's UTF-8 bytes, so `é` (shown by
    // `Display` as the one char U+00E9, from the wire byte 0xE9) came back as the two
    // bytes 0xC3 0xA9: a different tag.
    let tag = EntityTag::parse_bytes(b"W/\"caf\xe9\xff\"").unwrap();
    let shown = tag.to_string();
    assert_eq!(shown, "W/\"caf\u{e9}\u{ff}\"");
    assert_eq!(shown.parse::<EntityTag>().unwrap(), tag);
    assert_eq!(
        "\"caf\u{e9}\"".parse::<EntityTag>().unwrap(),
        EntityTag::strong("caf\u{e9}").unwrap()
    );
    // A char that is not one byte cannot be in a tag.
    assert!("\"\u{263a}\"".parse::<EntityTag>().is_err());
}
