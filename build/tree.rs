//! The patched copy of llama.cpp: pristine tree + new files + numbered diffs, synced into a
//! stable folder so that only files whose content changed get new mtimes (and get rebuilt).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Build `stage` = pristine + patches, then sync it into `src`.
pub fn materialize_patched(pristine: &Path, patches: &Path, stage: &Path, src: &Path) -> Result<(), String> {
    let _ = fs::remove_dir_all(stage);
    copy_tree(pristine, stage)?;

    // new files are plain files under patches/new/, laid out as in the tree
    let new_files = patches.join("new");
    if new_files.is_dir() {
        copy_tree(&new_files, stage)?;
    }

    // edits to upstream files: numbered unified diffs, applied in order
    let mut diffs: Vec<PathBuf> = fs::read_dir(patches)
        .map_err(|e| format!("{}: {e}", patches.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "diff"))
        .collect();
    diffs.sort();
    for diff in &diffs {
        let out = Command::new("patch")
            .args(["-p1", "--forward", "--batch", "--fuzz=0", "--no-backup-if-mismatch", "-d"])
            .arg(stage)
            .arg("-i")
            .arg(diff)
            .output()
            .map_err(|e| format!("cannot run patch (Debian: apt-get install patch): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "patch {} does not apply to the pinned llama.cpp:\n{}{}",
                diff.file_name().unwrap().to_string_lossy(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    sync_tree(stage, src)?;
    let _ = fs::remove_dir_all(stage);
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for entry in fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?.flatten() {
        let name = entry.file_name();
        if name == ".git" || name == ".hcattn-pin" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let ft = entry.file_type().map_err(|e| e.to_string())?;
        if ft.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ft.is_symlink() {
            let link = fs::read_link(&src).map_err(|e| e.to_string())?;
            let _ = fs::remove_file(&dst);
            std::os::unix::fs::symlink(link, &dst).map_err(|e| format!("{}: {e}", dst.display()))?;
        } else {
            fs::copy(&src, &dst).map_err(|e| format!("copy {}: {e}", src.display()))?;
        }
    }
    Ok(())
}

/// True when `b` is missing or its bytes differ from `a`'s.
pub fn differs(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(ma), Ok(mb)) if ma.len() == mb.len() => fs::read(a).ok() != fs::read(b).ok(),
        _ => true,
    }
}

/// Make `dst` hold exactly what `src` holds, touching only what differs.
fn sync_tree(src: &Path, dst: &Path) -> Result<(), String> {
    fs::create_dir_all(dst).map_err(|e| format!("{}: {e}", dst.display()))?;
    for entry in fs::read_dir(dst).map_err(|e| e.to_string())?.flatten() {
        if !src.join(entry.file_name()).exists() {
            let p = entry.path();
            let _ = if p.is_dir() && !p.is_symlink() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        }
    }
    for entry in fs::read_dir(src).map_err(|e| e.to_string())?.flatten() {
        let (s, d) = (entry.path(), dst.join(entry.file_name()));
        let ft = entry.file_type().map_err(|e| e.to_string())?;
        if ft.is_dir() {
            if d.is_symlink() || d.is_file() {
                let _ = fs::remove_file(&d);
            }
            sync_tree(&s, &d)?;
        } else if ft.is_symlink() {
            let link = fs::read_link(&s).map_err(|e| e.to_string())?;
            if fs::read_link(&d).ok().as_ref() != Some(&link) {
                let _ = fs::remove_file(&d);
                std::os::unix::fs::symlink(link, &d).map_err(|e| format!("{}: {e}", d.display()))?;
            }
        } else if differs(&s, &d) {
            if d.is_dir() {
                let _ = fs::remove_dir_all(&d);
            }
            fs::copy(&s, &d).map_err(|e| format!("copy {} -> {}: {e}", s.display(), d.display()))?;
        }
    }
    Ok(())
}
