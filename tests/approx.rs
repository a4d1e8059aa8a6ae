//! The approximate modes. Quality on the default model: a 1024-token prompt prefilled, then 64
//! steps teacher-forced on stock's greedy tokens, each step decoded through the compressed
//! cache the way generation uses it; KL divergence and top-1 agreement against stock f16
//! logits, next to stock's own q8_0 and q4_0 caches under the same protocol. The bounds are the
//! measured figures (README) with headroom; see the README for what is still missing.

mod common;
use common::*;

use hcattn::llama::{Context, ContextOptions};

fn kld(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lse = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    };
    let (a, b) = (lse(p_logits), lse(q_logits));
    p_logits
        .iter()
        .zip(q_logits)
        .map(|(&x, &y)| {
            let lp = x as f64 - a;
            lp.exp() * (lp - (y as f64 - b))
        })
        .sum()
}

/// llama.cpp's GGML_TYPE_Q8_0 and GGML_TYPE_Q4_0
const Q8_0: u32 = 8;
const Q4_0: u32 = 2;

#[test]
fn quality_of_each_mode_against_stock_f16() {
    register();
    let model = load(&smollm2());
    let mut prompt = model.tokenize(&text(), true).unwrap();
    prompt.truncate(1024);
    let base = ContextOptions { n_ctx: 1024 + 128, n_batch: 1024, n_ubatch: 512, ..Default::default() };
    let (t_stock, l_stock) = greedy(&mut Context::new(&model, &base).unwrap(), &prompt, 64);
    let measure = |o: &ContextOptions| {
        let l = forced(&mut Context::new(&model, o).unwrap(), &prompt, &t_stock);
        // the prompt's own logits come from prefill; score the 64 decode steps only
        let k: Vec<f64> = l_stock.iter().zip(&l).skip(1).map(|(a, b)| kld(a, b)).collect();
        let top1 = l_stock.iter().zip(&l).skip(1).filter(|(a, b)| Context::argmax(a) == Context::argmax(b)).count();
        (k.iter().sum::<f64>() / k.len() as f64, top1 as f64 / k.len() as f64)
    };
    let q8 = measure(&ContextOptions { type_k: Some(Q8_0), type_v: Some(Q8_0), ..base.clone() });
    let q4 = measure(&ContextOptions { type_k: Some(Q4_0), type_v: Some(Q4_0), ..base.clone() });
    eprintln!("{:28} mean KLD {:.4}  top-1 {:.3}", "stock q8_0", q8.0, q8.1);
    eprintln!("{:28} mean KLD {:.4}  top-1 {:.3}", "stock q4_0", q4.0, q4.1);
    // (options, mean KLD bound, top-1 bound); measured figures in the README
    let modes = [
        ("preset=50", 0.015, 0.95),
        ("keys=int8", 0.005, 0.95),
        ("keys=int4", 0.04, 0.95),
        ("preset=cpu25", 0.006, 0.95),
        ("preset=cpu12.5", 0.02, 0.95),
        ("preset=cpu12.5,sink=0,recent=0,renorm=0", 0.08, 0.95),
        ("preset=cpu12.5,prefill=coded", 0.05, 0.95),
    ];
    // codebooks calibrated on another text (the KJV Bible; this prompt is llama.cpp's README),
    // against the online ones fitted on this prompt itself
    let kjv = hcattn::texts::kjv().expect("the KJV text (apt-get install bible-kjv bible-kjv-text)");
    let cb = std::env::temp_dir().join(format!("hcattn-approx-cb-{}.gguf", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hcattn"))
        .args(["calibrate", "-t", "2", "--tokens", "2048", "--pq-dim", "1", "--centroids", "16", "--scope", "group", "-m"])
        .arg(smollm2())
        .arg("-f")
        .arg(&kjv)
        .arg("-o")
        .arg(&cb)
        .output()
        .unwrap();
    assert!(out.status.success(), "calibrate: {}", String::from_utf8_lossy(&out.stderr));
    let calibrated = format!("preset=cpu12.5,codebook={}", cb.display());
    // measured 0.0238 mean KLD, top-1 1.000 (2026-11-29; 0.0147 and 0.969 before the levels
    // softmax): fitted on 2048 tokens of another text, against 0.0061 for online books fitted
    // on this very prompt
    let modes: Vec<(&str, f64, f64)> = modes.into_iter().chain([(calibrated.as_str(), 0.03, 0.9)]).collect();
    for (opts, max_kld, min_top1) in modes {
        let o = ContextOptions { kv_backend: Some("hc".into()), kv_backend_opts: Some(opts.into()), ..base.clone() };
        let (k, t) = measure(&o);
        eprintln!("{opts:28} mean KLD {k:.4}  top-1 {t:.3}");
        assert!(k < max_kld, "{opts}: mean KLD {k} above {max_kld}");
        assert!(t >= min_top1, "{opts}: top-1 agreement {t} below {min_top1}");
    }
    let _ = std::fs::remove_file(&cb);
}

#[test]
fn compressed_state_round_trips_bit_for_bit() {
    register();
    let model = load(&generated("llama"));
    for opts in ["keys=pq,pq_dim=2,pq_centroids=64,fit_tokens=32,tau=0.9", "keys=int4,tau=0.8,select=head", "keys=f16,tau=0.9,recent=8,sink=4"] {
        let o = ContextOptions { n_ctx: 256, n_batch: 256, n_ubatch: 32, kv_backend: Some("hc".into()), kv_backend_opts: Some(opts.into()), ..Default::default() };
        let mut ctx = Context::new(&model, &o).unwrap();
        let prompt = tokens(100, model.n_vocab(), 4);
        let (_, first) = greedy(&mut ctx, &prompt, 1);
        let saved = ctx.save_state().unwrap();
        let cont = |ctx: &mut Context| {
            let mut l = first[1].clone();
            let mut rows = Vec::new();
            for k in 0..10 {
                let mut b = hcattn::llama::Batch::default();
                b.add(Context::argmax(&l), 101 + k, &[0], true);
                ctx.decode(&b).unwrap();
                l = ctx.logits(-1).unwrap().to_vec();
                rows.push(l.clone());
            }
            rows
        };
        let a = cont(&mut ctx);
        ctx.clear(true);
        ctx.load_state(&saved).unwrap();
        let b = cont(&mut ctx);
        assert_eq!(a, b, "{opts}: continuation after restore differs");
        assert!(a.iter().flatten().all(|x| x.is_finite()), "{opts}: non-finite logits");
    }
}

#[test]
fn compressed_state_is_refused_by_another_codec() {
    register();
    let model = load(&generated("llama"));
    let mk = |opts: &str| ContextOptions { n_ctx: 256, n_batch: 256, n_ubatch: 32, kv_backend: Some("hc".into()), kv_backend_opts: Some(opts.into()), ..Default::default() };
    let mut a = Context::new(&model, &mk("keys=int8")).unwrap();
    greedy(&mut a, &tokens(40, 128, 1), 1);
    let blob = a.save_state().unwrap();
    let mut b = Context::new(&model, &mk("keys=int4")).unwrap();
    let e = b.load_state(&blob).unwrap_err().to_string();
    assert!(e.contains("restor"), "{e}");
}
