//! Pinned public-domain text for quality measurements: the King James Bible from Debian's
//! `bible-kjv-text` package, read through its `bible` program (package `bible-kjv`), with the
//! verse references stripped and each chapter joined into one paragraph. Cached in the user's
//! cache folder and checked by sha256, so every run scores the same tokens.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// sha256 of the prose made from bible-kjv-text 4.38 (Debian bookworm).
pub const KJV_SHA256: &str = "58e4107f8a7a8f3d1201f5e4d71102ff1818bf9e8a3a7ce4e7c506b4e243489a";
pub const KJV_FILE: &str = "kjv.txt";
/// Where the New Testament starts in the prose (the first chapter of Matthew), for
/// experiments that fit on one part and evaluate on another.
pub const KJV_NEW_TESTAMENT: &str = "The book of the generation of Jesus Christ";

/// Turn `bible -f` output ("Ge1:1 In the beginning ...", one verse per line) into prose: one
/// paragraph per chapter, chapters separated by a blank line.
pub fn prose_from_verses(raw: &str) -> Result<String> {
    let mut out = String::with_capacity(raw.len());
    let mut chapter = "";
    for (n, line) in raw.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (reference, verse) = line.split_once(' ').with_context(|| format!("line {}: no verse reference: {line:.60}", n + 1))?;
        let (ch, _) = reference.rsplit_once(':').with_context(|| format!("line {}: bad verse reference '{reference}'", n + 1))?;
        if ch != chapter {
            if !chapter.is_empty() {
                out.push_str("\n\n");
            }
            chapter = ch;
        } else {
            out.push(' ');
        }
        out.push_str(verse.trim());
    }
    out.push('\n');
    Ok(out)
}

/// Path of the cached KJV prose, made from the installed Debian packages when missing.
pub fn kjv() -> Result<PathBuf> {
    let dir = crate::models::cache_dir().join("texts");
    let dest = dir.join(KJV_FILE);
    let digest = |b: &[u8]| Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect::<String>();
    if let Ok(b) = fs::read(&dest) {
        if digest(&b) == KJV_SHA256 {
            return Ok(dest);
        }
    }
    let out = Command::new("bible").args(["-f", "Gen1:1-Rev22:21"]).output().map_err(|e| {
        anyhow::anyhow!("cannot run `bible` ({e}); install the text with: apt-get install -y bible-kjv bible-kjv-text")
    })?;
    if !out.status.success() {
        bail!("`bible -f Gen1:1-Rev22:21` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let prose = prose_from_verses(&String::from_utf8_lossy(&out.stdout))?;
    let got = digest(prose.as_bytes());
    if got != KJV_SHA256 {
        bail!("the KJV text from the installed bible-kjv-text has sha256 {got}, not the pinned {KJV_SHA256} (another package version?)");
    }
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!(".{KJV_FILE}.{}.partial", std::process::id()));
    fs::write(&tmp, prose.as_bytes()).and_then(|_| fs::rename(&tmp, &dest)).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verses_become_chapter_paragraphs() {
        let raw = "Ge1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\n1Sm1:1 Now there was.\n";
        assert_eq!(prose_from_verses(raw).unwrap(), "In the beginning. And the earth.\n\nThus the heavens.\n\nNow there was.\n");
        assert!(prose_from_verses("Ge1 no colon\n").unwrap_err().to_string().contains("line 1"));
        assert!(prose_from_verses("nospace\n").is_err());
    }
}
