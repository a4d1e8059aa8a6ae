//! `hcattn needle`: passkey retrieval. A random five-digit key is hidden at a given depth of
//! filler text ("The pass key is 48213. Remember it. 48213 is the pass key."), the prompt ends
//! with "What is the pass key? The pass key is", and the greedy answer must contain the key.
//! Accuracy per (context length, depth) for each configuration.

use anyhow::{bail, Result};
use serde::Serialize;

use super::compare::Config;
use crate::llama::{Batch, Context, ContextOptions, Model};

#[derive(Debug, Clone)]
pub struct Args {
    pub lengths: Vec<usize>,
    /// where the needle sits, as a share of the filler (0 = start, 1 = end)
    pub depths: Vec<f64>,
    pub trials: usize,
    pub seed: u64,
    pub threads: i32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub config: String,
    pub length: usize,
    pub depth: f64,
    pub found: usize,
    pub trials: usize,
    /// the answers, for inspection
    pub answers: Vec<String>,
}

impl Cell {
    pub fn accuracy(&self) -> f64 {
        self.found as f64 / self.trials.max(1) as f64
    }
}

/// Tokens generated for the answer.
const ANSWER_TOKENS: usize = 8;

fn key(seed: u64, trial: usize) -> u32 {
    let mut z = seed.wrapping_add((trial as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    10_000 + ((z ^ (z >> 31)) % 90_000) as u32
}

/// The prompt of one trial: `length` tokens, the needle at `depth` of the filler.
pub fn prompt(model: &Model, filler: &[i32], length: usize, depth: f64, key: u32, trial: usize) -> Result<Vec<i32>> {
    let needle = model.tokenize(&format!(" The pass key is {key}. Remember it. {key} is the pass key. "), false)?;
    let question = model.tokenize("\nWhat is the pass key? The pass key is", false)?;
    let bos = model.tokenize("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the pass key.\n", true)?;
    let fixed = bos.len() + needle.len() + question.len();
    if length < fixed + 16 {
        bail!("length {length} is too short for the needle and the question ({fixed} tokens)");
    }
    let n_fill = length - fixed;
    // each trial reads the filler from another place
    let start = (trial * 997) % filler.len().saturating_sub(n_fill).max(1);
    if filler.len() < start + n_fill {
        bail!("the filler text has {} tokens; length {length} needs {n_fill}", filler.len());
    }
    let fill = &filler[start..start + n_fill];
    let at = ((n_fill as f64) * depth.clamp(0.0, 1.0)).round() as usize;
    let mut p = bos; // with the instruction
    p.extend_from_slice(&fill[..at]);
    p.extend_from_slice(&needle);
    p.extend_from_slice(&fill[at..]);
    p.extend_from_slice(&question);
    Ok(p)
}

fn answer(model: &Model, o: &ContextOptions, prompt: &[i32]) -> Result<String> {
    let mut ctx = Context::new(model, o)?;
    for (i, chunk) in prompt.chunks(o.n_batch as usize).enumerate() {
        let mut b = Batch::default();
        for (j, &t) in chunk.iter().enumerate() {
            let pos = i * o.n_batch as usize + j;
            b.add(t, pos as i32, &[0], pos + 1 == prompt.len());
        }
        ctx.decode(&b)?;
    }
    let mut text = String::new();
    let mut pos = prompt.len() as i32;
    for _ in 0..ANSWER_TOKENS {
        let t = Context::argmax(ctx.logits(-1)?);
        text.push_str(&model.token_to_piece(t));
        let mut b = Batch::default();
        b.add(t, pos, &[0], true);
        pos += 1;
        ctx.decode(&b)?;
    }
    Ok(text)
}

/// Every (configuration, length, depth) cell, `args.trials` keys each.
pub fn run(model: &Model, filler: &[i32], configs: &[Config], a: &Args, mut report: impl FnMut(&Cell)) -> Result<Vec<Cell>> {
    if a.lengths.is_empty() || a.depths.is_empty() || a.trials == 0 {
        bail!("nothing to run: give at least one length, one depth and one trial");
    }
    if let Some(d) = a.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        bail!("depth {d} is outside [0, 1]");
    }
    let total = (configs.len() * a.lengths.len() * a.depths.len() * a.trials) as u64;
    let bar = super::bar(total, "needles");
    let mut cells = Vec::new();
    for c in configs {
        for &length in &a.lengths {
            let base = ContextOptions {
                n_ctx: (length + ANSWER_TOKENS + 8) as u32,
                n_batch: 512,
                n_ubatch: 512,
                n_threads: a.threads,
                ..Default::default()
            };
            let o = c.context_options(&base);
            for &depth in &a.depths {
                let mut cell = Cell { config: c.name.clone(), length, depth, found: 0, trials: a.trials, answers: Vec::new() };
                for trial in 0..a.trials {
                    let k = key(a.seed, trial);
                    let p = prompt(model, filler, length, depth, k, trial)?;
                    let ans = answer(model, &o, &p)?;
                    cell.found += ans.contains(&k.to_string()) as usize;
                    cell.answers.push(ans);
                    bar.inc(1);
                }
                report(&cell);
                cells.push(cell);
            }
        }
    }
    bar.finish_and_clear();
    Ok(cells)
}

/// One accuracy table per configuration (rows: lengths, columns: depths), as Markdown.
pub fn markdown(cells: &[Cell], a: &Args) -> String {
    let mut s = String::new();
    let mut names: Vec<&str> = cells.iter().map(|c| c.config.as_str()).collect();
    names.dedup();
    for name in names {
        s += &format!("\n{name}\n\n| length |");
        for d in &a.depths {
            s += &format!(" depth {d} |");
        }
        s += "\n|---|";
        s += &"---|".repeat(a.depths.len());
        s += "\n";
        for &l in &a.lengths {
            s += &format!("| {l} |");
            for &d in &a.depths {
                let acc = cells.iter().find(|c| c.config == name && c.length == l && c.depth == d).map_or(f64::NAN, |c| c.accuracy());
                s += &format!(" {acc:.2} |");
            }
            s += "\n";
        }
    }
    s
}

/// The heat maps of every configuration.
pub fn svg(cells: &[Cell], a: &Args) -> String {
    let mut names: Vec<&str> = cells.iter().map(|c| c.config.as_str()).collect();
    names.dedup();
    let maps = names
        .iter()
        .map(|n| {
            let grid = a
                .lengths
                .iter()
                .map(|&l| a.depths.iter().map(|&d| cells.iter().find(|c| c.config == *n && c.length == l && c.depth == d).map_or(f64::NAN, |c| c.accuracy())).collect())
                .collect();
            (n.to_string(), grid)
        })
        .collect::<Vec<_>>();
    let rows: Vec<String> = a.lengths.iter().map(|l| l.to_string()).collect();
    let cols: Vec<String> = a.depths.iter().map(|d| format!("{d}")).collect();
    super::svg::heat_maps("pass key retrieval (share found)", "context length", "needle depth", &rows, &cols, &maps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_five_digits_and_vary() {
        let ks: Vec<u32> = (0..50).map(|t| key(7, t)).collect();
        assert!(ks.iter().all(|k| (10_000..100_000).contains(k)));
        let mut u = ks.clone();
        u.sort();
        u.dedup();
        assert!(u.len() > 45);
        assert_eq!(key(7, 3), key(7, 3));
    }
}
