//! Property tests of SPIFFE ID parsing against an independent oracle: a regular expression written from
//! the specification's grammar, plus its two rules a regex cannot say briefly (no `.`/`..` segments, at most
//! 2048 bytes).

use proptest::prelude::*;
use strait_ca::{IdKind, SpiffeId, TrustDomain};

fn oracle(s: &str) -> bool {
    let re = regex::Regex::new(r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+$").unwrap();
    re.is_match(s)
        && s.len() <= 2048
        && s["spiffe://".len()..]
            .split('/')
            .skip(1)
            .all(|seg| seg != "." && seg != "..")
}

fn td_strategy() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,40}"
}

fn segment_strategy() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,20}".prop_filter("dot segments are invalid", |s| s != "." && s != "..")
}

/// Strings built from the characters that matter at the boundaries of the grammar.
fn tricky_strategy() -> impl Strategy<Value = String> {
    let alphabet = prop::sample::select(vec![
        "spiffe://",
        "spiffe:/",
        "SPIFFE://",
        "/",
        "//",
        ".",
        "..",
        "a",
        "Z",
        "0",
        "-",
        "_",
        "%20",
        "%",
        "?",
        "#",
        ":",
        "@",
        " ",
        "é",
        "example.org",
        "ns",
        "sa",
    ]);
    prop::collection::vec(alphabet, 0..12).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn valid_ids_round_trip(td in td_strategy(), segs in prop::collection::vec(segment_strategy(), 1..6)) {
        let s = format!("spiffe://{td}/{}", segs.join("/"));
        let id = SpiffeId::parse(&s).unwrap();
        prop_assert_eq!(id.as_str(), s.as_str());
        prop_assert_eq!(id.trust_domain_str(), td.as_str());
        prop_assert_eq!(id.path(), format!("/{}", segs.join("/")));
        let rebuilt = SpiffeId::from_segments(&TrustDomain::new(&td).unwrap(), segs.iter().map(String::as_str)).unwrap();
        prop_assert_eq!(rebuilt, id);
    }

    #[test]
    fn parser_agrees_with_the_oracle_on_tricky_strings(s in tricky_strategy()) {
        prop_assert_eq!(SpiffeId::parse(&s).is_ok(), oracle(&s), "input {:?}", s);
    }

    #[test]
    fn parser_agrees_with_the_oracle_on_any_string(s in "spiffe://\\PC{0,60}") {
        prop_assert_eq!(SpiffeId::parse(&s).is_ok(), oracle(&s), "input {:?}", s);
    }

    #[test]
    fn one_bad_character_anywhere_is_refused(
        td in td_strategy(),
        segs in prop::collection::vec(segment_strategy(), 1..4),
        bad in prop::sample::select(vec!['%', '?', '#', ' ', ':', '@', '\\', '\u{0}', 'é', '+', '*']),
        pos in any::<prop::sample::Index>(),
    ) {
        let s = format!("spiffe://{td}/{}", segs.join("/"));
        let body_start = "spiffe://".len();
        let at = body_start + pos.index(s.len() - body_start);
        let mut mutated = s.clone();
        mutated.insert(at, bad);
        prop_assert!(SpiffeId::parse(&mutated).is_err(), "accepted {:?}", mutated);
    }

    #[test]
    fn upper_case_in_the_trust_domain_is_refused(td in "[a-z]{1,10}", i in any::<prop::sample::Index>()) {
        let mut chars: Vec<char> = td.chars().collect();
        let j = i.index(chars.len());
        chars[j] = chars[j].to_ascii_uppercase();
        let upper: String = chars.into_iter().collect();
        let s = format!("spiffe://{}/a", upper);
        prop_assert!(SpiffeId::parse(&s).is_err());
    }

    #[test]
    fn workload_ids_report_their_parts(ns in segment_strategy(), sa in segment_strategy()) {
        let td = TrustDomain::new("example.org").unwrap();
        let id = SpiffeId::workload(&td, &ns, &sa).unwrap();
        prop_assert_eq!(id.kind(), IdKind::Workload { namespace: &ns, service_account: &sa });
    }
}

#[test]
fn length_boundary() {
    let prefix = "spiffe://td/";
    let exact = format!("{prefix}{}", "x".repeat(2048 - prefix.len()));
    assert!(SpiffeId::parse(&exact).is_ok());
    assert!(oracle(&exact));
    let over = format!("{exact}x");
    assert!(SpiffeId::parse(&over).is_err());
    assert!(!oracle(&over));
}
