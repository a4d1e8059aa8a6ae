//! `hcattn compare` on a generated model: the table and the JSON, and its errors.

mod common;
use common::*;

use std::process::Command;

fn compare(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hcattn")).arg("compare").args(["-t", "2"]).args(args).output().unwrap()
}

fn readme() -> String {
    format!("{}/vendor/llama.cpp/README.md", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn compare_writes_sane_rows() {
    let m = generated("llama");
    let json = std::env::temp_dir().join(format!("hcattn-compare-{}.json", std::process::id()));
    let out = compare(&[
        "-m",
        m.to_str().unwrap(),
        "-f",
        &readme(),
        "--ctx",
        "160",
        "--score",
        "24",
        "--json",
        json.to_str().unwrap(),
        "--configs",
        "f16",
        "q4_0",
        "hc",
        "hc:preset=cpu12.5,fit_tokens=32",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| configuration | fast tier (% of f16) | total | mean KLD | p99 KLD | top-1 |"), "{stdout}");
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let get = |i: usize, k: &str| rows[i][k].as_f64().unwrap();
    assert_eq!(rows[0]["config"]["name"], "stock f16");
    assert_eq!((get(0, "kld_mean"), get(0, "top1")), (0.0, 1.0), "the reference against itself");
    assert!(get(2, "kld_mean") < 1e-4, "hc exact: {}", get(2, "kld_mean"));
    let share = |i: usize| rows[i]["memory"]["fast"].as_f64().unwrap() / rows[i]["memory"]["f16"].as_f64().unwrap();
    assert_eq!(share(0), 1.0);
    assert!((share(1) - 18.0 / 64.0).abs() < 0.01, "q4_0: {}", share(1));
    assert!((share(2) - 0.5).abs() < 1e-9, "hc exact: keys are half the f16 cache: {}", share(2));
    // cpu12.5: 12.5% codes plus the one exact row of the newest token, and the codebooks
    // (which dominate at this tiny context)
    let m = &rows[3]["memory"];
    let codes = (m["fast"].as_f64().unwrap() - m["codebooks"].as_f64().unwrap()) / m["f16"].as_f64().unwrap();
    assert!(codes > 0.125 && codes < 0.16, "cpu12.5 codes: {codes}");
    assert!(m["codebooks"].as_f64().unwrap() > 0.0);
    for (i, r) in rows.iter().enumerate() {
        for k in ["kld_mean", "kld_p99", "top1", "ppl", "prefill_ratio", "decode_ratio"] {
            let v = get(i, k);
            assert!(v.is_finite() && v >= 0.0, "row {i} {k} = {v}");
        }
        assert!(get(i, "kld_p99") >= get(i, "kld_mean") * 0.999 || get(i, "kld_mean") < 1e-9, "{r}");
        assert!(get(i, "top1") <= 1.0);
        let mem = |k: &str| r["memory"][k].as_f64().unwrap();
        assert!(mem("f16") > 0.0 && mem("fast") > 0.0 && mem("fast") <= mem("f16") + 1.0, "row {i}: {}", r["memory"]);
    }
    std::fs::remove_file(&json).unwrap();
}

#[test]
fn compare_errors_name_what_is_wrong() {
    let m = generated("llama");
    let m = m.to_str().unwrap();
    let r = readme();
    let cases: &[(&[&str], &str)] = &[
        (&["-m", m, "-f", &r, "--configs", "q5_9"], "unknown configuration 'q5_9'"),
        (&["-m", m, "-f", &r, "--configs", "hc:tau=2"], "option 'tau'"),
        (&["-m", m, "-f", "/nonexistent/t.txt"], "cannot read the text /nonexistent/t.txt"),
        (&["-m", m, "-f", &r, "--ctx", "100000000", "--configs", "f16"], "--ctx 100000000 needs that many"),
        (&["-m", m, "-f", &r, "--ctx", "20", "--score", "30", "--configs", "f16"], "leaves no prompt"),
        (&["-m", "/nonexistent/m.gguf", "-f", &r], "cannot load model"),
    ];
    for (args, want) in cases {
        let out = compare(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: stderr lacks '{want}':\n{}", &err[err.len().saturating_sub(600)..]);
    }
}
