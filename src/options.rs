//! `--kv-backend-opts`: one `key=value,key=value` string. Every key is listed in [`KEYS`] with
//! its default and what it accepts; the README's options table is the same list. A `preset`
//! sets several keys at once; keys given explicitly override the preset wherever they stand.

use crate::error::{Error, Result};

/// How keys are stored in the fast tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCodec {
    /// Exact half-precision keys.
    F16,
    /// Product quantization: sub-vectors of `dim` dims, each the index of one of `centroids`;
    /// one codebook per layer shared by its heads and groups, or one per group (`per_group`).
    Pq { dim: usize, centroids: usize, per_group: bool },
    /// Scalar quantization in groups of `group` channels with a scale and a zero point.
    Int { bits: u32, group: usize },
}

impl KeyCodec {
    /// Bits per key dimension (the fast-tier cost), not counting codebooks or scales.
    pub fn bits_per_dim(&self) -> f64 {
        match *self {
            KeyCodec::F16 => 16.0,
            KeyCodec::Pq { dim, centroids, .. } => code_bits(centroids) as f64 / dim as f64,
            KeyCodec::Int { bits, group } => bits as f64 + 32.0 / group as f64,
        }
    }
}

/// Bits of one PQ code: 8 up to 256 centroids, 16 above.
pub fn code_bits(centroids: usize) -> u32 {
    if centroids <= 256 {
        8
    } else {
        16
    }
}

/// Which tokens' weights the value sum uses, per decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// one k per layer: the max over its heads on a 1% grid (the paper's code)
    Layer,
    /// each head its own smallest set
    Head,
}

/// When a prompt's keys are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// kept exact while a prompt is processed, encoded when generation starts (the paper's)
    Exact,
    /// encoded after each ubatch: later ubatches of a prompt see earlier ones through codes
    Coded,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub keys: KeyCodec,
    /// Attention mass that the selected tokens must reach; 1 = attend to every token.
    pub tau: f32,
    pub select: Select,
    /// Divide the value sum by the selected mass (the paper does not).
    pub renorm: bool,
    /// Keep the keys of the last `recent` tokens exact.
    pub recent: usize,
    /// Keep the keys of the first `sink` tokens exact.
    pub sink: usize,
    /// Online codebooks are fitted once a layer holds this many keys (the first prompt's).
    pub fit_tokens: usize,
    /// Seed of the k-means fit.
    pub seed: u64,
    pub prefill: Prefill,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            keys: KeyCodec::F16,
            tau: 1.0,
            select: Select::Layer,
            renorm: false,
            recent: 0,
            sink: 0,
            fit_tokens: 256,
            seed: 0,
            prefill: Prefill::Exact,
        }
    }
}

/// (key, default, accepted values, meaning)
pub const KEYS: &[(&str, &str, &str, &str)] = &[
    ("preset", "exact", "exact, 50, 25, 12.5, cpu25, cpu12.5", "a named set of the keys below (see Presets)"),
    ("keys", "f16", "f16, pq, int8, int4", "how keys are stored in the fast tier"),
    ("pq_dim", "2", "1, 2, 4, 8", "dimensions per PQ sub-vector (keys=pq)"),
    ("pq_centroids", "8192", "16 to 65536", "centroids per PQ codebook; up to 256 gives 8-bit codes (keys=pq)"),
    ("int_group", "32", "8 to 256, a divisor of the head dimension", "channels sharing a scale and zero point (keys=int8/int4)"),
    ("codebook", "online", "online", "where PQ codebooks come from: fitted per layer from the first keys"),
    ("codebook_scope", "layer", "layer, group", "one PQ codebook per layer (shared by heads and groups) or one per group"),
    ("fit_tokens", "256", "1 or more", "keys a layer collects (exact) before its online codebook is fitted"),
    ("seed", "0", "an integer", "seed of the k-means fit"),
    ("prefill", "exact", "exact, coded", "a prompt's keys stay exact until generation starts, or are encoded after each ubatch"),
    ("tau", "1", "(0, 1]", "attention mass the selected tokens must cover (1 = every token)"),
    ("select", "layer", "layer, head", "one k per layer (max over heads, 1% grid) or per head"),
    ("renorm", "0", "0, 1", "divide the value sum by the selected mass"),
    ("recent", "0", "0 or more", "the last N tokens keep exact keys"),
    ("sink", "0", "0 or more", "the first N tokens keep exact keys"),
];

/// Presets: (name, the options string it stands for). The paper's 50/25/12.5 are fast-tier
/// fractions of the f16 cache with values in the host tier; the cpu* ones have the same key
/// bits with 256-centroid (8-bit code) books, whose tables are far cheaper on a CPU; the
/// codebook scope of each is the one measured better (README).
pub const PRESETS: &[(&str, &str)] = &[
    ("exact", "keys=f16,tau=1"),
    ("50", "keys=f16,tau=0.9"),
    ("25", "keys=pq,pq_dim=2,pq_centroids=8192,tau=0.9"),
    ("12.5", "keys=pq,pq_dim=4,pq_centroids=8192,tau=0.9"),
    ("cpu25", "keys=pq,pq_dim=1,pq_centroids=256,tau=0.9"),
    ("cpu12.5", "keys=pq,pq_dim=2,pq_centroids=256,codebook_scope=group,tau=0.9"),
];

fn bad(key: &str, problem: impl Into<String>) -> Error {
    Error::Option { key: key.to_string(), problem: problem.into() }
}

fn parse_usize(key: &str, value: &str, accepted: &str) -> Result<usize> {
    value.parse().map_err(|_| bad(key, format!("'{value}' is not a whole number; accepted: {accepted}")))
}

fn pairs(s: &str) -> Result<Vec<(&str, &str)>> {
    s.split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(|item| item.split_once('=').map(|(k, v)| (k.trim(), v.trim())).ok_or_else(|| bad(item, "expected key=value")))
        .collect()
}

impl Options {
    /// Parse an options string. The empty string gives the defaults (the exact mode).
    pub fn parse(s: &str) -> Result<Options> {
        let items = pairs(s)?;
        let mut o = Options::default();
        // the preset first, whatever its place, so that explicit keys override it
        let mut pq_dim = 2;
        let mut pq_centroids = 8192;
        let mut int_group = 32;
        let mut per_group = false;
        let mut keys = "f16".to_string();
        let mut explicit = Vec::new();
        for (k, v) in &items {
            if *k == "preset" {
                let (_, expansion) = PRESETS.iter().find(|p| p.0 == *v).ok_or_else(|| {
                    let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
                    bad(k, format!("unknown preset '{v}'; accepted: {}", names.join(", ")))
                })?;
                for (pk, pv) in pairs(expansion)? {
                    explicit.insert(0, (pk, pv));
                }
            }
        }
        explicit.extend(items.iter().copied().filter(|(k, _)| *k != "preset"));
        for (key, value) in explicit {
            match key {
                "keys" => {
                    if !["f16", "pq", "int8", "int4"].contains(&value) {
                        return Err(bad(key, format!("unknown value '{value}'; accepted: f16, pq, int8, int4")));
                    }
                    keys = value.to_string();
                }
                "pq_dim" => {
                    pq_dim = parse_usize(key, value, "1, 2, 4, 8")?;
                    if ![1, 2, 4, 8].contains(&pq_dim) {
                        return Err(bad(key, format!("{value} is not accepted; accepted: 1, 2, 4, 8")));
                    }
                }
                "pq_centroids" => {
                    pq_centroids = parse_usize(key, value, "16 to 65536")?;
                    if !(16..=65536).contains(&pq_centroids) {
                        return Err(bad(key, format!("{value} is outside 16 to 65536")));
                    }
                }
                "int_group" => {
                    int_group = parse_usize(key, value, "8 to 256")?;
                    if !(8..=256).contains(&int_group) {
                        return Err(bad(key, format!("{value} is outside 8 to 256")));
                    }
                }
                "codebook" => {
                    if value != "online" {
                        return Err(bad(key, format!("'{value}': codebook files are not supported yet; accepted: online")));
                    }
                }
                "codebook_scope" => {
                    per_group = match value {
                        "layer" => false,
                        "group" => true,
                        _ => return Err(bad(key, format!("unknown value '{value}'; accepted: layer, group"))),
                    }
                }
                "fit_tokens" => {
                    o.fit_tokens = parse_usize(key, value, "1 or more")?;
                    if o.fit_tokens == 0 {
                        return Err(bad(key, "0 is not accepted; accepted: 1 or more"));
                    }
                }
                "seed" => o.seed = value.parse().map_err(|_| bad(key, format!("'{value}' is not an integer")))?,
                "tau" => {
                    let t: f32 = value.parse().map_err(|_| bad(key, format!("'{value}' is not a number; accepted: (0, 1]")))?;
                    if !(t > 0.0 && t <= 1.0) {
                        return Err(bad(key, format!("{value} is outside (0, 1]")));
                    }
                    o.tau = t;
                }
                "select" => {
                    o.select = match value {
                        "layer" => Select::Layer,
                        "head" => Select::Head,
                        _ => return Err(bad(key, format!("unknown value '{value}'; accepted: layer, head"))),
                    }
                }
                "renorm" => {
                    o.renorm = match value {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad(key, format!("'{value}'; accepted: 0, 1"))),
                    }
                }
                "prefill" => {
                    o.prefill = match value {
                        "exact" => Prefill::Exact,
                        "coded" => Prefill::Coded,
                        _ => return Err(bad(key, format!("unknown value '{value}'; accepted: exact, coded"))),
                    }
                }
                "recent" => o.recent = parse_usize(key, value, "0 or more")?,
                "sink" => o.sink = parse_usize(key, value, "0 or more")?,
                _ => {
                    let known: Vec<&str> = KEYS.iter().map(|k| k.0).collect();
                    return Err(bad(key, format!("unknown option (value '{value}'); known options: {}", known.join(", "))));
                }
            }
        }
        o.keys = match keys.as_str() {
            "pq" => KeyCodec::Pq { dim: pq_dim, centroids: pq_centroids, per_group },
            "int8" => KeyCodec::Int { bits: 8, group: int_group },
            "int4" => KeyCodec::Int { bits: 4, group: int_group },
            _ => KeyCodec::F16,
        };
        Ok(o)
    }

    /// True when nothing is approximated: f16 keys and every token.
    pub fn is_exact(&self) -> bool {
        self.keys == KeyCodec::F16 && self.tau >= 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_gives_exact_defaults() {
        assert_eq!(Options::parse("").unwrap(), Options::default());
        assert_eq!(Options::parse(" , ").unwrap(), Options::default());
        assert_eq!(Options::parse("keys=f16,tau=1").unwrap(), Options::default());
        assert_eq!(Options::parse(" keys = f16 , tau = 1.0 ").unwrap(), Options::default());
        assert_eq!(Options::parse("preset=exact").unwrap(), Options::default());
        assert!(Options::default().is_exact());
    }

    #[test]
    fn errors_name_key_value_and_accepted() {
        let e = Options::parse("foo=3").unwrap_err().to_string();
        assert!(e.contains("'foo'") && e.contains("'3'") && e.contains("keys, pq_dim"), "{e}");
        let e = Options::parse("keys=pq9").unwrap_err().to_string();
        assert!(e.contains("'keys'") && e.contains("pq9") && e.contains("accepted: f16, pq, int8, int4"), "{e}");
        let e = Options::parse("tau=abc").unwrap_err().to_string();
        assert!(e.contains("'tau'") && e.contains("abc") && e.contains("accepted"), "{e}");
        let e = Options::parse("tau=1.5").unwrap_err().to_string();
        assert!(e.contains("1.5") && e.contains("(0, 1]"), "{e}");
        let e = Options::parse("tau").unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
        assert!(Options::parse("tau=nan").is_err());
        assert!(Options::parse("tau=0").is_err());
        let e = Options::parse("pq_dim=3").unwrap_err().to_string();
        assert!(e.contains("'pq_dim'") && e.contains("1, 2, 4, 8"), "{e}");
        let e = Options::parse("pq_centroids=70000").unwrap_err().to_string();
        assert!(e.contains("70000") && e.contains("16 to 65536"), "{e}");
        let e = Options::parse("preset=7").unwrap_err().to_string();
        assert!(e.contains("'7'") && e.contains("12.5"), "{e}");
        let e = Options::parse("codebook=/tmp/x.gguf").unwrap_err().to_string();
        assert!(e.contains("'codebook'") && e.contains("accepted: online"), "{e}");
    }

    #[test]
    fn presets_expand_and_explicit_keys_override_them() {
        let o = Options::parse("preset=12.5").unwrap();
        assert_eq!(o.keys, KeyCodec::Pq { dim: 4, centroids: 8192, per_group: false });
        assert_eq!(o.tau, 0.9);
        let o = Options::parse("tau=0.95,preset=25").unwrap();
        assert_eq!(o.keys, KeyCodec::Pq { dim: 2, centroids: 8192, per_group: false });
        assert_eq!(o.tau, 0.95, "an explicit key before the preset still wins");
        let o = Options::parse("preset=cpu12.5,pq_centroids=512").unwrap();
        assert_eq!(o.keys, KeyCodec::Pq { dim: 2, centroids: 512, per_group: true });
        let o = Options::parse("codebook_scope=group,preset=cpu25").unwrap();
        assert_eq!(o.keys, KeyCodec::Pq { dim: 1, centroids: 256, per_group: true });
        assert!(Options::parse("codebook_scope=model").unwrap_err().to_string().contains("accepted: layer, group"));
        for (name, _) in PRESETS {
            Options::parse(&format!("preset={name}")).unwrap();
        }
    }

    #[test]
    fn preset_memory_matches_its_name() {
        // fast-tier bits per key dimension against 16 for f16; values are in the host tier
        for (name, share) in [("25", 0.25), ("12.5", 0.125), ("cpu25", 0.25), ("cpu12.5", 0.125)] {
            let o = Options::parse(&format!("preset={name}")).unwrap();
            let frac = o.keys.bits_per_dim() / 16.0 / 2.0;
            assert!((frac - share).abs() < 1e-9, "{name}: {frac}");
        }
    }

    #[test]
    fn readme_documents_every_key_and_preset() {
        let readme = include_str!("../README.md");
        for (key, default, _, _) in KEYS {
            let row = format!("| `{key}` | `{default}` |");
            assert!(readme.contains(&row), "README's options table lacks {row}");
        }
        for (name, expansion) in PRESETS {
            let row = format!("| `{name}` | `{expansion}`");
            assert!(readme.contains(&row), "README's presets table lacks {row}");
        }
    }

    #[test]
    fn every_documented_key_parses_with_its_default() {
        for (key, default, _, _) in KEYS {
            Options::parse(&format!("{key}={default}")).unwrap();
        }
    }
}
