//! `hcattn bench`: prefill and decode speed at several depths, each configuration as a ratio
//! to stock f16 at the same depth in the same run (as llama-bench's pp and tg tests at `-d`).
//!
//! Per depth and configuration: a fresh context is filled with `depth` tokens (not timed), then
//! `n_prompt` tokens are prefilled in one batch (timed: prefill), then `n_gen` tokens are decoded
//! one at a time (timed from the second step: the first one also encodes a prompt kept exact by
//! prefill=exact, a one-time cost that belongs to the prompt).
//!
//! With `--reps`, the configurations take turns (stock, then each, then again), so that a
//! noisy machine slows them alike, and each keeps its best. With `--fill-cache DIR`, a
//! configuration's fill at a depth is saved to DIR the first time (llama.cpp's state file of
//! the context) and restored after that: at 32768 tokens the fill takes most of an hour on 2
//! cores, the timed part seconds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::compare::Config;
use crate::llama::{Batch, Context, ContextOptions, Model};

#[derive(Debug, Clone)]
pub struct Args {
    pub depths: Vec<usize>,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub reps: usize,
    pub threads: i32,
    /// where fills are kept between runs (None: every run fills)
    pub fill_cache: Option<PathBuf>,
    /// names the model in the fill cache's keys (its path and size, say)
    pub model_id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub config: String,
    pub depth: usize,
    /// best of the repetitions
    pub prefill_tps: f64,
    pub decode_tps: f64,
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
    /// Bytes per context cell of the fast tier: for stock, its whole K and V cache (on the GPU
    /// with `--ngl`); for hc, its GPU memory with device=cuda, else the host's codes,
    /// codebooks and exact rows
    pub fast_bytes_per_token: f64,
}

/// FNV-1a, for the fill cache's file names.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The fill cache's file for this model, configuration, depth, context size and text.
fn fill_file(dir: &Path, a: &Args, config: &Config, tokens: &[i32], depth: usize, o: &ContextOptions) -> PathBuf {
    let mut h = fnv(0xcbf2_9ce4_8422_2325, a.model_id.as_bytes());
    h = fnv(h, format!("{config:?}|{depth}|{}|{}|{}", o.n_ctx, o.n_ubatch, tokens.len()).as_bytes());
    h = tokens.iter().fold(h, |h, t| fnv(h, &t.to_le_bytes()));
    dir.join(format!("fill-{depth}-{h:016x}.state"))
}

fn once(model: &Model, tokens: &[i32], depth: usize, a: &Args, config: &Config, o: &ContextOptions) -> Result<(f64, f64, Option<f64>)> {
    let mut ctx = Context::new(model, o)?;
    let tok = |i: usize| tokens[i % tokens.len()];
    let feed = |ctx: &mut Context, from: usize, n: usize| -> Result<()> {
        let mut done = 0;
        while done < n {
            let m = (n - done).min(o.n_batch as usize);
            let mut b = Batch::default();
            for j in 0..m {
                let pos = from + done + j;
                b.add(tok(pos), pos as i32, &[0], done + j + 1 == n);
            }
            ctx.decode(&b)?;
            done += m;
        }
        Ok(())
    };
    match a.fill_cache.as_deref().filter(|_| depth > 0) {
        Some(dir) => {
            let file = fill_file(dir, a, config, tokens, depth, o);
            if file.exists() {
                let data = std::fs::read(&file).with_context(|| format!("reading the fill {}", file.display()))?;
                ctx.load_state(&data).with_context(|| format!("restoring the fill {} (delete it to fill again)", file.display()))?;
                eprintln!("bench: restored the fill of {} at depth {depth} from {}", config.name, file.display());
            } else {
                eprintln!("bench: filling {} to depth {depth}, to be kept in {}", config.name, file.display());
                feed(&mut ctx, 0, depth)?;
                std::fs::create_dir_all(dir).with_context(|| format!("creating the fill cache {}", dir.display()))?;
                // written aside and renamed, so that an interrupted run leaves no partial file
                let part = file.with_extension("part");
                std::fs::write(&part, ctx.save_state()?).with_context(|| format!("writing the fill {}", part.display()))?;
                std::fs::rename(&part, &file).with_context(|| format!("renaming {} to {}", part.display(), file.display()))?;
            }
        }
        None => feed(&mut ctx, 0, depth)?,
    }
    let t0 = Instant::now();
    feed(&mut ctx, depth, a.n_prompt)?;
    let prefill = a.n_prompt as f64 / t0.elapsed().as_secs_f64();
    let mut t1 = Instant::now();
    for k in 0..a.n_gen {
        let pos = depth + a.n_prompt + k;
        let mut b = Batch::default();
        b.add(tok(pos), pos as i32, &[0], true);
        ctx.decode(&b)?;
        if k == 0 {
            t1 = Instant::now();
        }
    }
    let decode = (a.n_gen - 1) as f64 / t1.elapsed().as_secs_f64();
    // SAFETY: this thread drives the only context, and it is idle between decodes
    let usage = unsafe { crate::abi::live_backends(|b| b.last().map(|be| (be.usage(), be.config().n_ctx))) };
    // per cell of the backend (llama.cpp rounds the context size up)
    let per_token = usage.map(|(u, cells)| if u.device > 0 { u.device } else { u.fast } as f64 / cells.max(1) as f64);
    Ok((prefill, decode, per_token))
}

/// Every (depth, configuration); stock f16 runs first at each depth as the reference.
pub fn run(model: &Model, tokens: &[i32], configs: &[Config], a: &Args, mut report: impl FnMut(&Row)) -> Result<Vec<Row>> {
    if a.n_gen < 2 || a.n_prompt == 0 || a.reps == 0 || tokens.is_empty() {
        bail!("bench needs --n-prompt >= 1, --n-gen >= 2, --reps >= 1 and some tokens");
    }
    let f16 = Config::parse("f16")?;
    let mut rows = Vec::new();
    // stock f16 runs once per depth as the reference, whether or not it is also listed
    let total = a.depths.len() * (configs.iter().filter(|c| **c != f16).count() + 1) * a.reps;
    let bar = super::bar(total as u64, "bench");
    // the bar hides itself when stderr is not a terminal; a log still gets one line a run,
    // since one run at a long depth takes many minutes
    let log_runs = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = std::time::Instant::now();
    let done = std::cell::Cell::new(0usize);
    for &depth in &a.depths {
        let base = ContextOptions {
            n_ctx: (depth + a.n_prompt + a.n_gen + 8) as u32,
            n_batch: a.n_prompt.max(512) as u32,
            n_ubatch: 512,
            n_threads: a.threads,
            ..Default::default()
        };
        // the configurations take turns, each rep running stock and then every other one
        let others: Vec<&Config> = configs.iter().filter(|c| **c != f16).collect();
        let mut best = vec![(0.0f64, 0.0f64, None); others.len() + 1];
        for _ in 0..a.reps {
            for (c, b) in std::iter::once(&f16).chain(others.iter().copied()).zip(best.iter_mut()) {
                if log_runs {
                    done.set(done.get() + 1);
                    eprintln!("bench: run {} of {}: {} at depth {depth} ({:.0} s so far)", done.get(), total, c.name, started.elapsed().as_secs_f64());
                }
                let (p, d, m) = once(model, tokens, depth, a, c, &c.context_options(&base))?;
                *b = (b.0.max(p), b.1.max(d), m);
                bar.inc(1);
            }
        }
        let reference = best[0];
        for c in configs {
            let (p, d, m) = if *c == f16 { reference } else { best[1 + others.iter().position(|o| *o == c).expect("listed")] };
            let stock = |t: Option<&str>| {
                let per_elem = match t {
                    Some("q8_0") => 34.0 / 32.0,
                    Some("q4_0") => 18.0 / 32.0,
                    _ => 2.0,
                };
                model.kv_elements_per_token() as f64 * per_elem
            };
            let m = if c.hc_opts.is_some() { m.unwrap_or(0.0) } else { stock(c.cache_type.as_deref()) };
            let row = Row {
                config: c.name.clone(),
                depth,
                prefill_tps: p,
                decode_tps: d,
                prefill_ratio: p / reference.0,
                decode_ratio: d / reference.1,
                fast_bytes_per_token: m,
            };
            report(&row);
            rows.push(row);
        }
    }
    bar.finish_and_clear();
    Ok(rows)
}

pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from("| configuration | depth | prefill t/s | x f16 | decode t/s | x f16 | fast tier B/token |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        s += &format!(
            "| {} | {} | {:.1} | {:.2}x | {:.2} | {:.2}x | {} |\n",
            r.config,
            r.depth,
            r.prefill_tps,
            r.prefill_ratio,
            r.decode_tps,
            r.decode_ratio,
            format!("{:.0}", r.fast_bytes_per_token)
        );
    }
    s
}
