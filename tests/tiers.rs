//! The file tier (`values=file:DIR`) and anchored prefill (`prefill=anchor:N`) through
//! llama.cpp, on a generated llama model.

mod common;
use common::*;

use hcattn::llama::{Context, ContextOptions};

fn hc(opts: &str) -> ContextOptions {
    ContextOptions { n_ctx: 256, n_batch: 256, n_ubatch: 32, kv_backend: Some("hc".into()), kv_backend_opts: Some(opts.into()), ..Default::default() }
}

#[test]
fn values_in_a_file_give_the_same_logits_and_leave_nothing_behind() {
    register();
    let model = load(&generated("llama"));
    let dir = std::env::temp_dir().join(format!("hcattn-tier-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompt = tokens(150, model.n_vocab(), 5);
    for base in ["keys=f16", "preset=cpu12.5,fit_tokens=64"] {
        let (t_host, l_host) = greedy(&mut Context::new(&model, &hc(base)).unwrap(), &prompt, 16);
        let mut ctx = Context::new(&model, &hc(&format!("{base},values=file:{}", dir.display()))).unwrap();
        let (t_file, l_file) = greedy(&mut ctx, &prompt, 16);
        assert_eq!(t_host, t_file, "{base}");
        assert_eq!(l_host, l_file, "{base}: the file tier holds the same f16 values");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no file is visible while the context lives");
    }
    let e = Context::new(&model, &hc("values=file:/nonexistent/tier")).err().unwrap().to_string();
    assert!(e.contains("values=file:/nonexistent/tier") && e.contains("no such folder"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn anchored_prefill_covering_the_prompt_is_exact_prefill() {
    register();
    let model = load(&generated("llama"));
    let prompt = tokens(150, model.n_vocab(), 6);
    let (t_exact, l_exact) = greedy(&mut Context::new(&model, &hc("keys=f16")).unwrap(), &prompt, 8);
    // every ubatch sees anchors 0..150 and itself: that is all of the prompt
    let (t_anchor, l_anchor) = greedy(&mut Context::new(&model, &hc("keys=f16,prefill=anchor:150")).unwrap(), &prompt, 8);
    assert_eq!((t_exact, &l_exact), (t_anchor, &l_anchor));
    // with 8 anchors, later ubatches see less of the prompt: different, still well-formed
    let (_, l_short) = greedy(&mut Context::new(&model, &hc("keys=f16,prefill=anchor:8")).unwrap(), &prompt, 8);
    assert!(l_short.iter().flatten().all(|x| x.is_finite()));
    assert!(nmse(&l_exact[0], &l_short[0]) > 1e-6, "the last prompt ubatch no longer sees the middle of the prompt");
    // coded keys with anchors
    let (_, l_pq) = greedy(&mut Context::new(&model, &hc("preset=cpu12.5,fit_tokens=32,prefill=anchor:16")).unwrap(), &prompt, 8);
    assert!(l_pq.iter().flatten().all(|x| x.is_finite()));
}
