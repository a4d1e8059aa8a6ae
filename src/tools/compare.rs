//! `hcattn compare`: stock caches and hc configurations over the same tokens, scored against
//! stock f16.
//!
//! Protocol (the same for every configuration): a prompt of `ctx - score - 1` tokens is
//! prefilled, then the next `score` tokens of the text are fed one at a time (teacher forcing),
//! as generation feeds them. Only the distributions of those single-token steps are scored, so
//! every scored token was predicted through the cache the way generation uses it: with hc, the
//! prompt's keys are coded by then (prefill=exact encodes them when the first single-token step
//! arrives). The prompt's own last logits are not scored: under prefill=exact they come from
//! exact attention and would flatter hc.

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::llama::{Batch, Context, ContextOptions, Model};

/// llama.cpp's GGML_TYPE_* for the stock cache types offered here.
const STOCK_TYPES: &[(&str, u32)] = &[("f16", 1), ("q8_0", 8), ("q4_0", 2)];

/// One configuration: a stock cache type or an hc options string.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub name: String,
    /// None: stock cache of `cache_type`
    pub hc_opts: Option<String>,
    pub cache_type: Option<String>,
}

impl Config {
    /// `f16`, `q8_0`, `q4_0` (stock caches, K and V of that type), `hc` (exact), `hc:OPTS`, or a
    /// preset name alone (`50`, `25`, `12.5`, `cpu25`, ...) for `hc:preset=NAME`.
    pub fn parse(s: &str) -> Result<Config> {
        let s = s.trim();
        if let Some((name, _)) = STOCK_TYPES.iter().find(|(n, _)| *n == s) {
            return Ok(Config { name: format!("stock {name}"), hc_opts: None, cache_type: Some(name.to_string()) });
        }
        let opts = if s == "hc" {
            String::new()
        } else if let Some(o) = s.strip_prefix("hc:") {
            o.to_string()
        } else if crate::options::PRESETS.iter().any(|(p, _)| *p == s) {
            format!("preset={s}")
        } else {
            bail!("unknown configuration '{s}'; accepted: f16, q8_0, q4_0, hc, hc:OPTIONS, or a preset name ({})", preset_names());
        };
        crate::options::Options::parse(&opts).map_err(|e| anyhow::anyhow!("configuration '{s}': {e}"))?;
        let name = if opts.is_empty() { "hc exact".to_string() } else { format!("hc {opts}") };
        Ok(Config { name, hc_opts: Some(opts), cache_type: None })
    }

    pub fn context_options(&self, base: &ContextOptions) -> ContextOptions {
        match (&self.hc_opts, &self.cache_type) {
            (Some(o), _) => ContextOptions { kv_backend: Some("hc".into()), kv_backend_opts: Some(o.clone()), ..base.clone() },
            (None, t) => {
                let ty = t.as_deref().and_then(|t| STOCK_TYPES.iter().find(|(n, _)| *n == t)).map(|x| x.1);
                ContextOptions { type_k: ty, type_v: ty, ..base.clone() }
            }
        }
    }
}

fn preset_names() -> String {
    crate::options::PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
}

/// The default set: stock f16, q8_0 and q4_0, and the hc presets whose online codebooks fit in
/// seconds. The paper's 25 and 12.5 (8192 centroids) take minutes to fit online on 2 cores;
/// ask for them, ideally with a calibrated file (`hc:preset=25,codebook=FILE`).
pub const DEFAULT_CONFIGS: &[&str] = &["f16", "q8_0", "q4_0", "50", "cpu25", "cpu12.5"];

#[derive(Debug, Clone)]
pub struct Protocol {
    /// context size: prompt + scored steps + 1
    pub ctx: usize,
    /// single-token steps scored
    pub score: usize,
    pub threads: i32,
}

/// Bytes a configuration holds, per tier; stock caches are all fast tier.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    pub fast: usize,
    pub host: usize,
    pub file: usize,
    pub codebooks: usize,
    /// what stock's f16 cache takes for this context
    pub f16: usize,
}

impl Memory {
    /// The fast tier as a share of the stock f16 cache.
    pub fn fast_share(&self) -> f64 {
        self.fast as f64 / self.f16.max(1) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub config: Config,
    pub memory: Memory,
    pub kld_mean: f64,
    pub kld_p99: f64,
    /// share of steps whose argmax equals stock f16's
    pub top1: f64,
    /// perplexity of the text's next tokens over the scored steps
    pub ppl: f64,
    /// tokens/s as a ratio to stock f16 in the same run
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
    pub prefill_tps: f64,
    pub decode_tps: f64,
}

/// log-softmax in f64
fn log_softmax(l: &[f32]) -> Vec<f64> {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    l.iter().map(|&x| x as f64 - lse).collect()
}

/// KL(p || q) from p's log-probabilities and q's logits.
pub fn kld(p_log: &[f64], q_logits: &[f32]) -> f64 {
    let q_log = log_softmax(q_logits);
    p_log.iter().zip(&q_log).map(|(&lp, &lq)| lp.exp() * (lp - lq)).sum::<f64>().max(0.0)
}

/// The 99th percentile (nearest rank) of `v`.
pub fn p99(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    let rank = ((0.99 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

struct Run {
    /// logits of each scored step
    logits: Vec<Vec<f32>>,
    /// the hc backend's use at the end (None for stock)
    usage: Option<(crate::backend::Usage, usize)>,
    prefill_s: f64,
    decode_s: f64,
}

fn run_one(model: &Model, tokens: &[i32], p: &Protocol, o: &ContextOptions, label: &str) -> Result<Run> {
    let prompt = p.ctx - p.score - 1;
    let mut ctx = Context::new(model, o)?;
    let bar = super::bar((prompt + p.score) as u64, label);
    let t0 = Instant::now();
    for (i, chunk) in tokens[..prompt].chunks(o.n_batch as usize).enumerate() {
        let mut b = Batch::default();
        for (j, &t) in chunk.iter().enumerate() {
            let pos = i * o.n_batch as usize + j;
            b.add(t, pos as i32, &[0], pos + 1 == prompt);
        }
        ctx.decode(&b)?;
        bar.inc(chunk.len() as u64);
    }
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut logits = Vec::with_capacity(p.score);
    // the first step also pays for encoding the prompt's keys (and an online codebook fit):
    // decode speed is timed from the second step on
    let mut t1 = Instant::now();
    for k in 0..p.score {
        let mut b = Batch::default();
        b.add(tokens[prompt + k], (prompt + k) as i32, &[0], true);
        ctx.decode(&b)?;
        logits.push(ctx.logits(-1)?.to_vec());
        bar.inc(1);
        if k == 0 {
            t1 = Instant::now();
        }
    }
    bar.finish_and_clear();
    let decode_s = t1.elapsed().as_secs_f64();
    // SAFETY: this thread drives the only context, and it is idle between decodes
    let usage = unsafe { crate::abi::live_backends(|b| b.last().map(|be| (be.usage(), be.f16_cache_bytes()))) };
    Ok(Run { logits, prefill_s, decode_s, usage })
}

/// Run every configuration; stock f16 runs first as the reference whether listed or not.
pub fn run(model: &Model, tokens: &[i32], p: &Protocol, configs: &[Config], mut report: impl FnMut(&Row)) -> Result<Vec<Row>> {
    if p.score < 2 || p.ctx < p.score + 2 {
        bail!("--ctx {} leaves no prompt before {} scored steps", p.ctx, p.score);
    }
    if tokens.len() < p.ctx {
        bail!("the text has {} tokens; --ctx {} needs that many", tokens.len(), p.ctx);
    }
    let base = ContextOptions { n_ctx: p.ctx as u32, n_batch: 512, n_ubatch: 512, n_threads: p.threads, ..Default::default() };
    let f16 = Config::parse("f16")?;
    // the stock f16 cache's size, read off an exact hc backend for the same context
    let f16_bytes = {
        let _probe = Context::new(model, &ContextOptions { kv_backend: Some("hc".into()), ..base.clone() })?;
        // SAFETY: the probe context is idle
        unsafe { crate::abi::live_backends(|b| b.last().map(|be| be.f16_cache_bytes())) }.unwrap_or(0)
    };
    let reference = run_one(model, tokens, p, &f16.context_options(&base), "stock f16")?;
    let ref_log: Vec<Vec<f64>> = reference.logits.iter().map(|l| log_softmax(l)).collect();
    let prompt = p.ctx - p.score - 1;
    let mut rows = Vec::new();
    for c in configs {
        let r = if *c == f16 { None } else { Some(run_one(model, tokens, p, &c.context_options(&base), &c.name)?) };
        let r = r.as_ref().unwrap_or(&reference);
        let klds: Vec<f64> = ref_log.iter().zip(&r.logits).map(|(a, b)| kld(a, b)).collect();
        let top1 = ref_log.iter().zip(&r.logits).filter(|(a, b)| argmax64(a) == Context::argmax(b) as usize).count();
        let nll: f64 = r.logits.iter().enumerate().map(|(k, l)| -log_softmax(l)[tokens[prompt + k + 1] as usize]).sum();
        let prefill_tps = prompt as f64 / r.prefill_s;
        let decode_tps = (p.score - 1) as f64 / r.decode_s;
        let memory = match (&r.usage, c.cache_type.as_deref()) {
            (Some((u, f)), _) => Memory { fast: u.fast, host: u.host, file: u.file, codebooks: u.codebooks, f16: *f },
            (None, t) => {
                // bits per element of the block formats: q8_0 34 bytes and q4_0 18 bytes per 32
                let bytes = match t {
                    Some("q8_0") => f16_bytes / 64 * 34,
                    Some("q4_0") => f16_bytes / 64 * 18,
                    _ => f16_bytes,
                };
                Memory { fast: bytes, host: bytes, file: 0, codebooks: 0, f16: f16_bytes }
            }
        };
        let row = Row {
            config: c.clone(),
            memory,
            kld_mean: klds.iter().sum::<f64>() / klds.len() as f64,
            kld_p99: p99(&klds),
            top1: top1 as f64 / p.score as f64,
            ppl: (nll / p.score as f64).exp(),
            prefill_tps,
            decode_tps,
            prefill_ratio: prefill_tps / (prompt as f64 / reference.prefill_s),
            decode_ratio: decode_tps / ((p.score - 1) as f64 / reference.decode_s),
        };
        report(&row);
        rows.push(row);
    }
    Ok(rows)
}

fn argmax64(v: &[f64]) -> usize {
    v.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0
}

/// The table as Markdown.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| configuration | fast tier (% of f16) | total | mean KLD | p99 KLD | top-1 | PPL | prefill x f16 | decode x f16 |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    for r in rows {
        let m = &r.memory;
        s += &format!(
            "| {} | {:.1} MiB ({:.1}%) | {:.1} MiB | {:.4} | {:.4} | {:.1}% | {:.3} | {:.2}x | {:.2}x |\n",
            r.config.name,
            mib(m.fast),
            m.fast_share() * 100.0,
            mib(m.host + m.file),
            r.kld_mean,
            r.kld_p99,
            r.top1 * 100.0,
            r.ppl,
            r.prefill_ratio,
            r.decode_ratio
        );
    }
    s
}

/// Quality against memory: mean KLD over the fast tier's share of the f16 cache.
pub fn svg(rows: &[Row]) -> String {
    let pts: Vec<super::svg::Point> = rows
        .iter()
        .map(|r| super::svg::Point { label: r.config.name.clone(), x: r.memory.fast_share() * 100.0, y: r.kld_mean })
        .collect();
    super::svg::scatter_log_y("quality against memory", "fast tier, % of the stock f16 cache", "mean KL divergence to stock f16", &pts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_and_unknown_ones_are_named() {
        assert_eq!(Config::parse("q8_0").unwrap().cache_type.as_deref(), Some("q8_0"));
        assert_eq!(Config::parse("12.5").unwrap().hc_opts.as_deref(), Some("preset=12.5"));
        assert_eq!(Config::parse("hc:keys=int8,tau=0.9").unwrap().hc_opts.as_deref(), Some("keys=int8,tau=0.9"));
        assert_eq!(Config::parse("hc").unwrap().name, "hc exact");
        let e = Config::parse("q5_9").unwrap_err().to_string();
        assert!(e.contains("'q5_9'") && e.contains("cpu12.5"), "{e}");
        assert!(Config::parse("hc:tau=7").unwrap_err().to_string().contains("tau"));
    }

    #[test]
    fn kld_and_p99() {
        let p = log_softmax(&[1.0, 2.0, 3.0]);
        assert!(kld(&p, &[1.0, 2.0, 3.0]).abs() < 1e-12);
        assert!(kld(&p, &[11.0, 12.0, 13.0]).abs() < 1e-9, "shift invariant");
        assert!(kld(&p, &[3.0, 2.0, 1.0]) > 0.5);
        let v: Vec<f64> = (1..=200).map(|x| x as f64).collect();
        assert_eq!(p99(&v), 198.0);
        assert_eq!(p99(&[5.0]), 5.0);
    }
}
