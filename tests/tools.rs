//! The `hcattn` tool: compare, needle and bench (the table, JSON and SVG outputs, and errors).

mod common;
use common::*;

use std::process::Command;

fn tool(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hcattn")).arg(cmd).args(["-t", "2"]).args(args).output().unwrap()
}

fn compare(args: &[&str]) -> std::process::Output {
    tool("compare", args)
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("hcattn-tools-{}-{name}", std::process::id()))
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
        "--svg",
        tmp("c.svg").to_str().unwrap(),
        "--configs",
        "f16",
        "q4_0",
        "hc",
        "hc:preset=cpu12.5,fit_tokens=32,sink=0,recent=0",
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
    // cpu12.5 (without its exact sink and recent rows): 12.5% codes plus the one exact row of
    // the newest token, and the codebooks (which dominate at this tiny context)
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
    let svg = std::fs::read_to_string(tmp("c.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<circle").count() == 4, "one point per configuration");
    std::fs::remove_file(tmp("c.svg")).unwrap();
}

#[test]
fn needle_is_found_by_stock_on_a_short_context() {
    // SmolLM2 finds a key in 256 tokens of KJV filler (measured: 4 of 4)
    let json = tmp("n.json");
    let svg = tmp("n.svg");
    let out = tool(
        "needle",
        &["--lengths", "256", "--depths", "0.5", "--trials", "4", "--configs", "f16", "--json", json.to_str().unwrap(), "--svg", svg.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cells: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let found = cells[0]["found"].as_u64().unwrap();
    assert!(found >= 3, "stock found {found} of 4 keys: {}", cells[0]["answers"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("| 256 |"));
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<rect"));
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&svg);
}

#[test]
fn bench_fill_cache_fills_once_then_restores() {
    let m = generated("llama");
    let dir = tmp("fills");
    let run = |reps: &str| {
        let args = ["-m", m.to_str().unwrap(), "--depths", "0", "64", "--n-prompt", "16", "--n-gen", "3", "--reps", reps, "--configs", "f16", "cpu12.5", "--fill-cache", dir.to_str().unwrap()];
        let out = tool("bench", &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let restored = |err: &str| err.lines().filter(|l| l.starts_with("bench: restored the fill of ")).count();
    let first = run("1");
    assert_eq!(restored(&first), 0, "{first}");
    // one file per configuration at depth 64; depth 0 has nothing to keep
    let files = || {
        let mut f: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        f.sort();
        f
    };
    let kept = files();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept.iter().all(|f| f.extension().is_some_and(|e| e == "state") && f.metadata().unwrap().len() > 0), "{kept:?}");
    // two reps take turns (stock, cpu12.5, stock, cpu12.5), each restoring its own fill
    let second = run("2");
    assert_eq!(restored(&second), 4, "{second}");
    assert!(second.contains("restored the fill of stock f16 at depth 64") && second.contains("restored the fill of hc preset=cpu12.5 at depth 64"), "{second}");
    let runs: Vec<&str> = second.lines().filter(|l| l.starts_with("bench: run ") && l.contains("at depth 64")).collect();
    assert!(runs.len() == 4 && runs[0].contains("stock f16") && runs[1].contains("cpu12.5") && runs[2].contains("stock f16"), "{runs:?}");
    assert_eq!(files(), kept, "nothing written when every fill is kept");
    // a damaged fill is an error that names the file, not a silent refill or a crash
    std::fs::write(&kept[0], b"not a state").unwrap();
    let out = tool("bench", &["-m", m.to_str().unwrap(), "--depths", "64", "--n-prompt", "16", "--n-gen", "3", "--configs", "f16", "cpu12.5", "--fill-cache", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("restoring the fill") && err.contains(kept[0].file_name().unwrap().to_str().unwrap()), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_reports_ratios_to_stock_at_each_depth() {
    let m = generated("llama");
    let json = tmp("b.json");
    let out = tool(
        "bench",
        &["-m", m.to_str().unwrap(), "--depths", "0", "64", "--n-prompt", "32", "--n-gen", "4", "--configs", "f16", "hc", "cpu12.5", "--json", json.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 6, "two depths x three configurations");
    // stderr is a pipe here, so instead of the bar: one line per run, f16 once per depth
    let err = String::from_utf8_lossy(&out.stderr);
    let runs: Vec<&str> = err.lines().filter(|l| l.starts_with("bench: run ")).collect();
    assert_eq!(runs.len(), 6, "{err}");
    assert!(runs[0].starts_with("bench: run 1 of 6: stock f16 at depth 0") && runs[5].starts_with("bench: run 6 of 6: hc preset=cpu12.5 at depth 64"), "{runs:?}");
    // fast-tier bytes per cell: hc exact holds f16 keys only (half of stock's K and V);
    // cpu12.5's 4-bit codes are an eighth of that, but in this 256-cell context its codebooks
    // and 20 exact rows weigh as much again
    let per = |c: &str, d: u64| rows.iter().find(|r| r["config"] == c && r["depth"] == d).unwrap()["fast_bytes_per_token"].as_f64().unwrap();
    for d in [0, 64] {
        let (stock, exact, small) = (per("stock f16", d), per("hc exact", d), per("hc preset=cpu12.5", d));
        assert!(stock > 0.0 && (exact - stock / 2.0).abs() < 1e-6 * stock, "depth {d}: stock {stock}, hc exact {exact}");
        assert!(small < exact, "depth {d}: cpu12.5 {small} B/token against {exact}");
    }
    for r in rows {
        for k in ["prefill_tps", "decode_tps", "prefill_ratio", "decode_ratio"] {
            let v = r[k].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{k} = {v} in {r}");
        }
        if r["config"] == "stock f16" {
            assert_eq!((r["prefill_ratio"].as_f64(), r["decode_ratio"].as_f64()), (Some(1.0), Some(1.0)));
        }
    }
    let _ = std::fs::remove_file(&json);
    let out = tool("bench", &["-m", m.to_str().unwrap(), "--n-gen", "1"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--n-gen >= 2"));
    let out = tool("needle", &["-m", m.to_str().unwrap(), "--depths", "1.5"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("depth 1.5 is outside [0, 1]"));
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
