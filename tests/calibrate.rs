//! `hcattn calibrate` and `codebook=FILE`: the file loads and serves, a file for another model
//! or other settings is refused, and the command's bad inputs are clear errors. Calibration
//! runs as a separate process: its key capture is process-wide, and other tests of this binary
//! create backends at the same time.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use hcattn::llama::{Context, ContextOptions};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hcattn-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn readme() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vendor/llama.cpp/README.md")
}

fn calibrate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hcattn")).arg("calibrate").args(["-t", "2"]).args(args).output().unwrap()
}

fn hc(opts: &str) -> ContextOptions {
    ContextOptions { n_ctx: 256, n_batch: 256, n_ubatch: 64, kv_backend: Some("hc".into()), kv_backend_opts: Some(opts.into()), ..Default::default() }
}

#[test]
fn calibrated_file_serves_its_model_and_is_refused_elsewhere() {
    register();
    let dir = tmp_dir("cal");
    let llama = generated("llama");
    let file = dir.join("llama.cb.gguf");
    let f = file.to_str().unwrap();
    let out = calibrate(&["-m", llama.to_str().unwrap(), "-f", readme().to_str().unwrap(), "--tokens", "256", "--centroids", "32", "-o", f]);
    assert!(out.status.success(), "calibrate failed: {}", String::from_utf8_lossy(&out.stderr));
    let read = hcattn::calibration::CodebookFile::load(&file).unwrap();
    assert_eq!((read.settings.pq_dim, read.settings.centroids, read.tokens), (2, 32, 256));
    assert_eq!(read.identity.arch, "llama");
    assert_eq!(read.model_sha256, hcattn::models::sha256_file(&llama).unwrap());

    // the file serves its model: no online fit, and the approximate logits stay close to exact
    let model = load(&llama);
    let prompt = tokens(150, model.n_vocab(), 9);
    let (_, exact) = greedy(&mut Context::new(&model, &hc("")).unwrap(), &prompt, 8);
    for opts in [format!("codebook={f}"), format!("codebook={f},tau=0.9,pq_dim=2,pq_centroids=32")] {
        let (_, approx) = greedy(&mut Context::new(&model, &hc(&opts)).unwrap(), &prompt, 8);
        let worst = exact.iter().zip(&approx).map(|(a, b)| nmse(a, b)).fold(0.0, f64::max);
        assert!(worst.is_finite() && worst < 0.05, "{opts}: logits NMSE {worst}");
    }

    // other settings than the file's
    let e = Context::new(&model, &hc(&format!("codebook={f},pq_centroids=64"))).err().unwrap().to_string();
    assert!(e.contains("fitted with") && e.contains("pq_centroids=32") && e.contains("pq_centroids=64"), "{e}");
    // another architecture and shape
    let qwen = load(&generated("qwen3"));
    let e = Context::new(&qwen, &hc(&format!("codebook={f}"))).err().unwrap().to_string();
    assert!(e.contains("another model") && e.contains("architecture 'llama'"), "{e}");
    // the same shapes, another file (one weight byte changed near the end)
    let other = dir.join("llama-edited.gguf");
    let mut bytes = std::fs::read(&llama).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(&other, bytes).unwrap();
    let edited = load(&other);
    let e = Context::new(&edited, &hc(&format!("codebook={f}"))).err().unwrap().to_string();
    assert!(e.contains("another model") && e.contains("fingerprint"), "{e}");
    // a damaged file
    let bad = dir.join("bad.gguf");
    let cb = std::fs::read(&file).unwrap();
    std::fs::write(&bad, &cb[..cb.len() / 2]).unwrap();
    let e = Context::new(&model, &hc(&format!("codebook={}", bad.display()))).err().unwrap().to_string();
    assert!(e.contains("bad.gguf") && e.contains("truncated"), "{e}");
    drop(edited);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn model_scope_file_is_one_codebook_for_every_layer() {
    register();
    let dir = tmp_dir("calmodel");
    let llama = generated("llama");
    let file = dir.join("m.gguf");
    let out = calibrate(&[
        "-m",
        llama.to_str().unwrap(),
        "-f",
        readme().to_str().unwrap(),
        "--tokens",
        "200",
        "--centroids",
        "16",
        "--pq-dim",
        "4",
        "--scope",
        "model",
        "-o",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = hcattn::calibration::CodebookFile::load(&file).unwrap();
    assert_eq!(read.books.len(), 1);
    assert_eq!(read.books[0].len(), 1);
    let model = load(&llama);
    let (toks, l) = greedy(&mut Context::new(&model, &hc(&format!("codebook={}", file.display()))).unwrap(), &tokens(60, 128, 2), 4);
    assert_eq!(toks.len(), 4);
    assert!(l.iter().flatten().all(|x| x.is_finite()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn calibrate_errors_name_what_is_wrong() {
    let llama = generated("llama");
    let m = llama.to_str().unwrap();
    let r = readme();
    let t = r.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["-m", m, "-f", "/nonexistent/text.txt", "-o", "/tmp/x.gguf"], "cannot read the text /nonexistent/text.txt"),
        (&["-m", "/nonexistent/m.gguf", "-f", t, "-o", "/tmp/x.gguf"], "model file /nonexistent/m.gguf does not exist"),
        (&["-m", m, "-f", t, "--tokens", "10000000", "-o", "/tmp/x.gguf"], "--tokens asks for 10000000"),
        (&["-m", m, "-f", t, "--pq-dim", "3", "-o", "/tmp/x.gguf"], "--pq-dim 3"),
        (&["-m", m, "-f", t, "--centroids", "8", "-o", "/tmp/x.gguf"], "--centroids 8"),
        (&["-m", m, "-f", t, "-o", "/nonexistent/dir/x.gguf"], "output folder /nonexistent/dir does not exist"),
    ];
    for (args, want) in cases {
        let out = calibrate(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: stderr lacks '{want}':\n{err}");
    }
}
