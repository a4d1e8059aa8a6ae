//! `hcattn calibrate`: run a text through the model with an exact hc cache while capturing
//! every layer's post-RoPE keys, fit PQ codebooks on them, and write the codebook file that
//! `codebook=FILE` loads.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use crate::calibration::{self, CodebookFile, Settings};
use crate::capture::Capture;
use crate::llama::{self, Batch, Context, ContextOptions, Model};
use crate::options::Scope;

#[derive(Debug, Clone)]
pub struct Args {
    pub model: PathBuf,
    pub text: PathBuf,
    /// tokens of the text to capture keys from
    pub tokens: usize,
    pub pq_dim: usize,
    pub centroids: usize,
    pub scope: Scope,
    pub seed: u64,
    pub threads: i32,
    pub out: PathBuf,
}

/// Run the calibration; returns what was written.
pub fn run(a: &Args) -> Result<CodebookFile> {
    if ![1, 2, 4, 8].contains(&a.pq_dim) {
        bail!("--pq-dim {}: accepted 1, 2, 4, 8", a.pq_dim);
    }
    if !(16..=65536).contains(&a.centroids) {
        bail!("--centroids {}: accepted 16 to 65536", a.centroids);
    }
    if a.tokens < 16 {
        bail!("--tokens {}: at least 16 are needed", a.tokens);
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("output folder {} does not exist", dir.display());
        }
    }
    let text = std::fs::read(&a.text).with_context(|| format!("cannot read the text {}", a.text.display()))?;
    let text_str = String::from_utf8_lossy(&text);
    if !a.model.is_file() {
        bail!("model file {} does not exist", a.model.display());
    }
    llama::register_hc()?;
    let model = Model::load(&a.model)?;
    let tokens = model.tokenize(&text_str, true)?;
    if tokens.len() < a.tokens {
        bail!("the text {} has {} tokens; --tokens asks for {}", a.text.display(), tokens.len(), a.tokens);
    }
    let tokens = &tokens[..a.tokens];
    let n_batch = 512u32;
    let opts = ContextOptions {
        n_ctx: a.tokens as u32,
        n_batch,
        n_ubatch: n_batch,
        n_threads: a.threads,
        kv_backend: Some("hc".into()),
        kv_backend_opts: Some("keys=f16".into()),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let capture = Capture::start()?;
    let captured = (|| -> Result<_> {
        let mut ctx = Context::new(&model, &opts)?;
        let bar = super::bar(tokens.len() as u64, "keys");
        for (i, chunk) in tokens.chunks(n_batch as usize).enumerate() {
            let mut b = Batch::default();
            for (j, &t) in chunk.iter().enumerate() {
                b.add(t, (i * n_batch as usize + j) as i32, &[0], j + 1 == chunk.len());
            }
            ctx.decode(&b)?;
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(())
    })();
    let got = capture.finish();
    captured?;
    let identity = match got.model {
        Some(Ok(id)) => id,
        Some(Err(e)) => bail!("{e}"),
        None => bail!("no hc backend was created for the model, so no keys were captured"),
    };
    let settings = Settings { pq_dim: a.pq_dim, centroids: a.centroids, scope: a.scope, seed: a.seed };
    eprintln!(
        "hcattn: captured {} tokens x {} layers of keys in {:.1} s; fitting {} ({})",
        tokens.len(),
        identity.layers.len(),
        t0.elapsed().as_secs_f64(),
        match a.scope {
            Scope::Model => "one codebook".to_string(),
            Scope::Layer => format!("{} codebooks", identity.layers.len()),
            Scope::Group => format!("{} codebooks", identity.layers.iter().map(|l| l.dk / a.pq_dim).sum::<usize>()),
        },
        settings.describe()
    );
    let n_fits = match a.scope {
        Scope::Model => 1,
        Scope::Layer => identity.layers.len(),
        Scope::Group => identity.layers.iter().map(|l| l.dk / a.pq_dim).sum(),
    };
    let bar = super::bar(n_fits as u64, "codebooks");
    let books = calibration::fit(&got.keys, &identity.layers, &settings, &|_, done, _| bar.set_position(done as u64))
        .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    let file = CodebookFile {
        identity,
        settings,
        model_sha256: crate::models::sha256_file(&a.model)?,
        text: file_name(&a.text),
        text_sha256: hex_sha256(&text),
        tokens: tokens.len() as u64,
        books,
    };
    file.save(&a.out).with_context(|| format!("cannot write {}", a.out.display()))?;
    Ok(file)
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}
