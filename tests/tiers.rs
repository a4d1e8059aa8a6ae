//! The file tier (`values=file:DIR`) and anchored prefill (`prefill=anchor:N`) through
//! llama.cpp, on a generated llama model.

mod common;
use common::hc_small as hc;
use common::*;

use hcattn::llama::{Context, ContextOptions};

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

/// Values of `n_ctx` cells in the file tier, in `dir`.
fn in_file(dir: &std::path::Path, n_ctx: u32) -> ContextOptions {
    ContextOptions { n_ctx, ..hc(&format!("keys=f16,values=file:{}", dir.display())) }
}

/// No file of the file tier (`.hcattn-values-*`) is in `dir`.
fn no_values_file(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).map(|d| d.flatten().all(|e| !e.file_name().to_string_lossy().starts_with(".hcattn-values"))).unwrap_or(true)
}

/// A context whose file tier cannot be created fails at creation with a message naming the
/// folder and the cause, leaves nothing in the folder, and the process's other context goes on.
fn refused_cleanly(model: &hcattn::llama::Model, dir: &std::path::Path, n_ctx: u32, cause: &str) {
    let prompt = tokens(40, model.n_vocab(), 8);
    let mut other = Context::new(model, &hc("preset=cpu12.5,fit_tokens=16")).unwrap();
    let (before, _) = greedy(&mut other, &prompt, 4);
    let e = Context::new(model, &in_file(dir, n_ctx)).err().expect("the file tier cannot be made there").to_string();
    assert!(e.contains(&format!("values=file:{}", dir.display())) && e.contains(cause), "{e}");
    assert!(no_values_file(dir), "a failed creation left a file in {}", dir.display());
    other.clear(true);
    let (after, _) = greedy(&mut other, &prompt, 4);
    assert_eq!(before, after, "the other context is unharmed");
}

#[test]
fn a_full_folder_is_refused_at_creation() {
    register();
    let model = load(&generated("llama"));
    if std::env::var_os("HCATTN_FULL_FOLDER_CHILD").is_some() {
        // in a child process: files may grow to 1 MiB, and exceeding that is an error (EFBIG),
        // not the SIGXFSZ that would kill the process
        // SAFETY: plain libc calls on this process's own signal disposition and limits.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit { rlim_cur: 1 << 20, rlim_max: libc::RLIM_INFINITY };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
        let dir = std::env::temp_dir().join(format!("hcattn-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // 2 MiB of values a layer: over the limit; 256 cells: under it
        refused_cleanly(&model, &dir, 8192, "cannot allocate");
        let mut small = Context::new(&model, &in_file(&dir, 256)).unwrap();
        greedy(&mut small, &tokens(20, model.n_vocab(), 2), 2);
        drop(small);
        std::fs::remove_dir_all(&dir).unwrap();
        println!("full-folder child: ok");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "a_full_folder_is_refused_at_creation", "--nocapture", "--test-threads=1"])
        .env("HCATTN_FULL_FOLDER_CHILD", "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("full-folder child: ok"), "{text}");
    // a real full file system, where this machine lets the test mount one
    let mnt = std::env::temp_dir().join(format!("hcattn-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .output()
        .is_ok_and(|o| o.status.success());
    if mounted {
        refused_cleanly(&model, &mnt, 8192, "No space left");
        let _ = std::process::Command::new("umount").arg(&mnt).status();
    } else {
        eprintln!("no tmpfs mount here: the full-folder case ran on the file size limit only");
    }
    let _ = std::fs::remove_dir(&mnt);
}

#[test]
fn a_read_only_folder_is_refused_and_a_vanished_one_is_harmless() {
    register();
    let model = load(&generated("llama"));
    // a folder where no file can be created: permissions for a normal user; as root, which
    // ignores them, sysfs (which refuses new files to everyone)
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = std::env::temp_dir().join(format!("hcattn-ro-{}", std::process::id()));
    if root {
        refused_cleanly(&model, std::path::Path::new("/sys/kernel"), 256, "cannot create a file there");
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        refused_cleanly(&model, &dir, 256, "cannot create a file there");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // the folder vanishes while the context lives: the file was unlinked at creation and the
    // mapping holds the values, so decoding goes on and gives the host tier's logits
    std::fs::create_dir_all(&dir).unwrap();
    let prompt = tokens(100, model.n_vocab(), 3);
    let mut ctx = Context::new(&model, &in_file(&dir, 256)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let (t_file, l_file) = greedy(&mut ctx, &prompt, 8);
    let (t_host, l_host) = greedy(&mut Context::new(&model, &hc("keys=f16")).unwrap(), &prompt, 8);
    assert_eq!((t_file, l_file), (t_host, l_host));
}
