//! `--kv-backend-opts`: one `key=value,key=value` string. Every key is listed in [`KEYS`] with
//! its default and what it accepts; the README's options table is the same list. A `preset`
//! sets several keys at once; keys given explicitly override the preset wherever they stand.

use crate::error::{Error, Result};

/// How keys are stored in the fast tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCodec {
    /// Exact half-precision keys.
    F16,
    /// Product quantization: sub-vectors of `dim` dims, each the index of one of `centroids`,
    /// from codebooks of the given scope.
    Pq { dim: usize, centroids: usize, scope: Scope },
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

/// Bits of one PQ code: 4 up to 16 centroids (two codes a byte), 8 up to 256, 16 above.
pub fn code_bits(centroids: usize) -> u32 {
    if centroids <= 16 {
        4
    } else if centroids <= 256 {
        8
    } else {
        16
    }
}

/// What one PQ codebook serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// one per layer, shared by its heads and sub-vector groups
    Layer,
    /// one per layer and sub-vector group (dk / pq_dim of them per layer)
    Group,
    /// one for the whole model (calibrated files only)
    Model,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Layer => "layer",
            Scope::Group => "group",
            Scope::Model => "model",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        [Scope::Layer, Scope::Group, Scope::Model].into_iter().find(|x| x.name() == s)
    }

    /// Codebooks per layer.
    pub fn books_per_layer(self, dk: usize, dim: usize) -> usize {
        if self == Scope::Group {
            dk / dim
        } else {
            1
        }
    }
}

/// Where PQ codebooks come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodebookSource {
    /// fitted from the first `fit_tokens` keys of each layer
    Online,
    /// a file written by `hcattn calibrate`; `pq_given`: the PQ settings (keys, pq_dim,
    /// pq_centroids, codebook_scope) were given by the user or a preset, and must then equal
    /// the file's; otherwise the file's are used
    File { path: String, pq_given: bool },
}

/// Where the values (the host tier) live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Values {
    /// host memory
    Host,
    /// a memory-mapped file in this folder, created and removed by the context
    File(String),
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
    /// each ubatch of a prompt attends only to the first N tokens (kept exact while the prompt
    /// is processed) and to itself; keys encoded after each ubatch. Linear-cost prefill for
    /// prompts far beyond what quadratic prefill allows.
    Anchor(usize),
}

/// Who computes attention in the exact mode (keys=f16, tau=1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExactAttn {
    /// llama.cpp's own flash-attention op over a dense copy of the sequence's cells that hc
    /// fills each step: stock's kernel on stock's layout, so answers identical to the stock
    /// cache's (full-attention layers of one sequence per ubatch; otherwise hc's kernels)
    Ggml,
    /// hc's exact kernels over its own storage (no copy; equal to stock up to f32 rounding)
    Hc,
}

/// Where the fast tier (the key codes, their scoring and the selection) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// CUDA device N (see `gpu`): codes in its memory, values still in the host tier
    Cuda(usize),
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
    pub codebook: CodebookSource,
    pub values: Values,
    pub device: Device,
    pub exact_attn: ExactAttn,
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
            codebook: CodebookSource::Online,
            values: Values::Host,
            device: Device::Cpu,
            exact_attn: ExactAttn::Ggml,
        }
    }
}

/// (key, default, accepted values, meaning)
pub const KEYS: &[(&str, &str, &str, &str)] = &[
    ("preset", "exact", "exact, 50, 25, 12.5, cpu25, cpu12.5", "a named set of the keys below (see Presets)"),
    ("keys", "f16", "f16, pq, int8, int4", "how keys are stored in the fast tier"),
    ("pq_dim", "2", "1, 2, 4, 8", "dimensions per PQ sub-vector (keys=pq)"),
    ("pq_centroids", "8192", "16 to 65536", "centroids per PQ codebook; 16 gives 4-bit codes (the fast scan), up to 256 8-bit codes, more 16-bit codes (keys=pq)"),
    ("int_group", "32", "8 to 256, a divisor of the head dimension", "channels sharing a scale and zero point (keys=int8/int4)"),
    ("codebook", "online", "online, or the path of a file from `hcattn calibrate`", "where PQ codebooks come from: fitted from the first keys, or calibrated offline (implies keys=pq with the file's settings)"),
    ("codebook_scope", "layer", "layer, group, model", "one PQ codebook per layer (shared by heads and groups), one per group, or one for the model (files only)"),
    ("fit_tokens", "256", "1 or more", "keys a layer collects (exact) before its online codebook is fitted"),
    ("seed", "0", "an integer", "seed of the k-means fit"),
    ("prefill", "exact", "exact, coded, anchor:N", "a prompt's keys stay exact until generation starts, or are encoded after each ubatch; anchor:N: each prompt ubatch attends only to the first N tokens and itself"),
    ("tau", "1", "(0, 1]", "attention mass the selected tokens must cover (1 = every token)"),
    ("select", "layer", "layer, head", "one k per layer (max over heads, 1% grid) or per head"),
    ("renorm", "0", "0, 1", "divide the value sum by the selected mass"),
    ("values", "host", "host, file:DIR", "values in host memory, or in a memory-mapped file in DIR (created, and removed at once, by the context)"),
    ("recent", "0", "0 or more", "the last N tokens keep exact keys"),
    ("sink", "0", "0 or more", "the first N tokens keep exact keys"),
    ("exact_attn", "ggml", "ggml, hc", "in the exact mode (keys=f16, tau=1), who attends: llama.cpp's own flash-attention op over a dense copy of the sequence's cells (answers identical to the stock cache's), or hc's exact kernels (no copy, equal up to f32 rounding)"),
    ("device", "cpu", "cpu, cuda, cuda:N", "where the key codes are kept, scored and selected: host memory, or CUDA device N (0 for `cuda`); values stay in the host tier. Needs a build with `--features cuda` and keys=pq; otherwise the CPU tier is used and the log says why"),
];

/// Presets: (name, the options string it stands for). The paper's 50/25/12.5 are fast-tier
/// fractions of the f16 cache with values in the host tier. The cpu* ones have the same key
/// bits with small books whose tables are cheap on a CPU: cpu25 one 256-centroid book per
/// layer for single channels (8-bit codes); cpu12.5 a 16-centroid book per channel (4-bit
/// codes, scanned with byte shuffles, see `scan`), the first 4 and last 16 tokens' keys kept
/// exact and the selected mass renormalised, which the measurements in the README chose.
pub const PRESETS: &[(&str, &str)] = &[
    ("exact", "keys=f16,tau=1"),
    ("50", "keys=f16,tau=0.9"),
    ("25", "keys=pq,pq_dim=2,pq_centroids=8192,tau=0.9"),
    ("12.5", "keys=pq,pq_dim=4,pq_centroids=8192,tau=0.9"),
    ("cpu25", "keys=pq,pq_dim=1,pq_centroids=256,tau=0.95,renorm=1"),
    ("cpu12.5", "keys=pq,pq_dim=1,pq_centroids=16,codebook_scope=group,tau=0.9,sink=4,recent=16,renorm=1"),
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
        let mut scope = Scope::Layer;
        let mut keys = "f16".to_string();
        // any PQ setting given by the user or a preset (see CodebookSource::File)
        let mut pq_given = false;
        let mut keys_given = false;
        let mut codebook_file = None;
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
                    keys_given = true;
                    pq_given = true;
                }
                "pq_dim" => {
                    pq_given = true;
                    pq_dim = parse_usize(key, value, "1, 2, 4, 8")?;
                    if ![1, 2, 4, 8].contains(&pq_dim) {
                        return Err(bad(key, format!("{value} is not accepted; accepted: 1, 2, 4, 8")));
                    }
                }
                "pq_centroids" => {
                    pq_given = true;
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
                    codebook_file = match value {
                        "online" => None,
                        "" => return Err(bad(key, "empty; accepted: online, or the path of a codebook file")),
                        path => Some(path.to_string()),
                    }
                }
                "codebook_scope" => {
                    pq_given = true;
                    scope = Scope::parse(value)
                        .ok_or_else(|| bad(key, format!("unknown value '{value}'; accepted: layer, group, model")))?;
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
                        v => match v.strip_prefix("anchor:").map(str::parse::<usize>) {
                            Some(Ok(n)) if n >= 1 => Prefill::Anchor(n),
                            _ => return Err(bad(key, format!("unknown value '{value}'; accepted: exact, coded, anchor:N (N >= 1)"))),
                        },
                    }
                }
                "values" => {
                    o.values = match value {
                        "host" => Values::Host,
                        v => match v.strip_prefix("file:") {
                            Some(dir) if !dir.is_empty() => Values::File(dir.to_string()),
                            _ => return Err(bad(key, format!("unknown value '{value}'; accepted: host, file:DIR"))),
                        },
                    }
                }
                "device" => {
                    o.device = match value {
                        "cpu" => Device::Cpu,
                        "cuda" => Device::Cuda(0),
                        v => match v.strip_prefix("cuda:").map(str::parse::<usize>) {
                            Some(Ok(n)) => Device::Cuda(n),
                            _ => return Err(bad(key, format!("unknown value '{value}'; accepted: cpu, cuda, cuda:N"))),
                        },
                    }
                }
                "exact_attn" => {
                    o.exact_attn = match value {
                        "ggml" => ExactAttn::Ggml,
                        "hc" => ExactAttn::Hc,
                        _ => return Err(bad(key, format!("unknown value '{value}'; accepted: ggml, hc"))),
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
        if let Some(path) = codebook_file {
            if keys_given && keys != "pq" {
                return Err(bad("codebook", format!("a codebook file needs keys=pq, not keys={keys}")));
            }
            keys = "pq".into();
            o.codebook = CodebookSource::File { path, pq_given };
        } else if scope == Scope::Model && keys == "pq" {
            return Err(bad("codebook_scope", "'model' needs a calibrated file (codebook=FILE from hcattn calibrate)"));
        }
        o.keys = match keys.as_str() {
            "pq" => KeyCodec::Pq { dim: pq_dim, centroids: pq_centroids, scope },
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
        assert_eq!(Options::parse("prefill=anchor:64").unwrap().prefill, Prefill::Anchor(64));
        for v in ["anchor:0", "anchor:", "anchor:x", "anchors:4"] {
            let e = Options::parse(&format!("prefill={v}")).unwrap_err().to_string();
            assert!(e.contains("anchor:N"), "{e}");
        }
        let e = Options::parse("values=disk").unwrap_err().to_string();
        assert!(e.contains("'values'") && e.contains("file:DIR"), "{e}");
        assert!(Options::parse("values=file:").is_err());
        assert_eq!(Options::parse("values=file:/tmp").unwrap().values, Values::File("/tmp".into()));
        let e = Options::parse("codebook=").unwrap_err().to_string();
        assert!(e.contains("'codebook'") && e.contains("accepted: online"), "{e}");
        let e = Options::parse("keys=int8,codebook=/tmp/x.gguf").unwrap_err().to_string();
        assert!(e.contains("'codebook'") && e.contains("keys=pq"), "{e}");
        let e = Options::parse("keys=pq,codebook_scope=model").unwrap_err().to_string();
        assert!(e.contains("calibrated file"), "{e}");
    }

    #[test]
    fn presets_expand_and_explicit_keys_override_them() {
        let o = Options::parse("preset=12.5").unwrap();
        assert_eq!(o.keys, KeyCodec::Pq { dim: 4, centroids: 8192, scope: Scope::Layer });
        assert_eq!(o.tau, 0.9);
        let o = Options::parse("tau=0.95,preset=25").unwrap();
        assert_eq!(o.keys, KeyCodec::Pq { dim: 2, centroids: 8192, scope: Scope::Layer });
        assert_eq!(o.tau, 0.95, "an explicit key before the preset still wins");
        let o = Options::parse("preset=cpu12.5,pq_centroids=512").unwrap();
        assert_eq!(o.keys, KeyCodec::Pq { dim: 1, centroids: 512, scope: Scope::Group });
        assert_eq!((o.sink, o.recent, o.renorm), (4, 16, true));
        let o = Options::parse("codebook_scope=group,preset=cpu25").unwrap();
        assert_eq!(o.keys, KeyCodec::Pq { dim: 1, centroids: 256, scope: Scope::Group });
        assert!(Options::parse("codebook_scope=all").unwrap_err().to_string().contains("accepted: layer, group, model"));
        for (name, _) in PRESETS {
            Options::parse(&format!("preset={name}")).unwrap();
        }
    }

    #[test]
    fn codebook_files_take_or_check_the_pq_settings() {
        let o = Options::parse("codebook=/x/cb.gguf").unwrap();
        assert_eq!(o.codebook, CodebookSource::File { path: "/x/cb.gguf".into(), pq_given: false });
        assert!(matches!(o.keys, KeyCodec::Pq { .. }));
        let o = Options::parse("preset=12.5,codebook=cb.gguf").unwrap();
        assert_eq!(o.codebook, CodebookSource::File { path: "cb.gguf".into(), pq_given: true });
        assert_eq!(o.keys, KeyCodec::Pq { dim: 4, centroids: 8192, scope: Scope::Layer });
        let o = Options::parse("codebook=cb.gguf,codebook_scope=model").unwrap();
        assert_eq!(o.keys, KeyCodec::Pq { dim: 2, centroids: 8192, scope: Scope::Model });
        assert_eq!(Options::parse("codebook=cb.gguf,codebook=online").unwrap().codebook, CodebookSource::Online);
        let o = Options::parse("pq_centroids=512,codebook=cb.gguf").unwrap();
        assert_eq!(o.codebook, CodebookSource::File { path: "cb.gguf".into(), pq_given: true });
        assert_eq!(o.keys, KeyCodec::Pq { dim: 2, centroids: 512, scope: Scope::Layer });
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
