//! Fuzzing the options parser (proptest): arbitrary strings, and known keys with arbitrary
//! values, give options or an error that names the offending item, never a panic.
//! 10,000 cases per property by default; `HCATTN_FUZZ_CASES=1000000` for a longer local run.

use hcattn::options::{Options, KEYS};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("HCATTN_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000)
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() }
}

/// Every parse error names an item of the input: "option 'KEY': ...".
fn check(s: &str) -> Result<(), TestCaseError> {
    match Options::parse(s) {
        Ok(o) => {
            // what parsed is usable: its memory share is a number in (0, 1]
            let bits = o.keys.bits_per_dim();
            prop_assert!(bits > 0.0 && bits <= 16.0, "{s:?}: {bits} bits per dimension");
        }
        Err(e) => {
            let m = e.to_string();
            prop_assert!(m.starts_with("option '"), "{s:?}: {m}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_strings(s in "\\PC{0,120}") {
        check(&s)?;
    }

    #[test]
    fn known_keys_with_arbitrary_values(items in prop::collection::vec((0..KEYS.len(), "[-+0-9a-z.:/=_ ,]{0,14}"), 0..7)) {
        let s = items.iter().map(|(k, v)| format!("{}={v}", KEYS[*k].0)).collect::<Vec<_>>().join(",");
        check(&s)?;
    }

    #[test]
    fn known_keys_with_their_own_kind_of_values(items in prop::collection::vec((0..KEYS.len(), prop_oneof![
        (0u64..100_000).prop_map(|n| n.to_string()),
        (-2.0f64..2.0).prop_map(|x| format!("{x}")),
        prop::sample::select(vec!["exact", "50", "25", "12.5", "cpu25", "cpu12.5", "pq", "int4", "int8", "f16", "layer", "group", "model", "head", "coded", "anchor:8", "anchor:", "file:/tmp", "online", "0", "1", ""]).prop_map(String::from),
    ]), 0..7)) {
        let s = items.iter().map(|(k, v)| format!("{}={v}", KEYS[*k].0)).collect::<Vec<_>>().join(",");
        check(&s)?;
    }
}
