//! Calibrated PQ codebooks: fitting them on captured keys, and the GGUF sidecar file that
//! carries them together with the identity of the model they were fitted for.
//!
//! A codebook file is only meaningful for the model whose keys it was fitted on, so it records
//! the model's architecture, its attention layers' shapes and a fingerprint of the model file,
//! and a backend refuses a file that disagrees with the model it serves, or with the PQ
//! settings its options ask for.
//!
//! Model fingerprint: sha256 over the file's length and its first and last 8 MiB. A full hash
//! of a multi-gigabyte model would make every context creation slow; the GGUF header (all
//! metadata and tensor shapes) and the first and last tensors' data are in those bytes, which
//! tells apart different models and different quantizations of one model. The full sha256 is
//! computed once, by `hcattn calibrate`, and written for information.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::backend::Config;
use crate::codebook::{Codebook, KMeans};
use crate::gguf::{self, Value};
use crate::options::Scope;

/// Version of the file layout below; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
const FINGERPRINT_SPAN: u64 = 8 << 20;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The fingerprint described in the module comment.
pub fn model_fingerprint(path: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; FINGERPRINT_SPAN.min(len) as usize];
    f.read_exact(&mut buf)?;
    h.update(&buf);
    if len > FINGERPRINT_SPAN {
        let tail = FINGERPRINT_SPAN.min(len - FINGERPRINT_SPAN);
        f.seek(SeekFrom::Start(len - tail))?;
        buf.resize(tail as usize, 0);
        f.read_exact(&mut buf)?;
        h.update(&buf);
    }
    Ok(hex(&h.finalize()))
}

/// One served attention layer's shape as far as keys are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    pub il: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub dk: usize,
}

/// What ties a codebook file to a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub arch: String,
    pub fingerprint: String,
    /// file name of the model (for messages only)
    pub file_name: String,
    pub layers: Vec<LayerShape>,
}

impl Identity {
    /// The identity of the model a backend is created for.
    pub fn of(cfg: &Config) -> Result<Identity, String> {
        let path = cfg.model_path.as_deref().ok_or_else(|| {
            "the model was not loaded from a file, so a codebook file cannot be checked against it".to_string()
        })?;
        let p = Path::new(path);
        let fingerprint = model_fingerprint(p).map_err(|e| format!("reading the model file {path} for its fingerprint: {e}"))?;
        Ok(Identity {
            arch: cfg.arch.clone(),
            fingerprint,
            file_name: p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            layers: cfg.layers.iter().map(|d| LayerShape { il: d.il, n_head: d.n_head, n_head_kv: d.n_head_kv, dk: d.dk }).collect(),
        })
    }
}

/// How the codebooks were fitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub pq_dim: usize,
    pub centroids: usize,
    pub scope: Scope,
    pub seed: u64,
}

impl Settings {
    pub fn describe(&self) -> String {
        format!("pq_dim={}, pq_centroids={}, codebook_scope={}", self.pq_dim, self.centroids, self.scope.name())
    }
}

#[derive(Debug, Clone)]
pub struct CodebookFile {
    pub identity: Identity,
    pub settings: Settings,
    /// full sha256 of the model file, when the writer computed it (information only)
    pub model_sha256: String,
    /// what the keys came from: text file name, its sha256, tokens
    pub text: String,
    pub text_sha256: String,
    pub tokens: u64,
    /// scope model: one entry; else one per `identity.layers` entry, each holding
    /// `scope.books_per_layer` books
    pub books: Vec<Vec<Arc<Codebook>>>,
}

fn tensor_name(scope: Scope, il: usize, g: usize) -> String {
    match scope {
        Scope::Model => format!("codebook.model.g{g}"),
        _ => format!("codebook.l{il}.g{g}"),
    }
}

impl CodebookFile {
    pub fn to_gguf(&self) -> gguf::File {
        let mut f = gguf::File::default();
        let mut kv = |k: &str, v: Value| {
            f.kv.insert(k.to_string(), v);
        };
        let id = &self.identity;
        kv("general.architecture", Value::Str("hcattn-codebook".into()));
        kv("hcattn.format_version", Value::U32(FORMAT_VERSION));
        kv("hcattn.model.architecture", Value::Str(id.arch.clone()));
        kv("hcattn.model.fingerprint", Value::Str(id.fingerprint.clone()));
        kv("hcattn.model.file_name", Value::Str(id.file_name.clone()));
        kv("hcattn.model.sha256", Value::Str(self.model_sha256.clone()));
        kv("hcattn.model.layers.il", Value::U32s(id.layers.iter().map(|l| l.il as u32).collect()));
        kv("hcattn.model.layers.n_head", Value::U32s(id.layers.iter().map(|l| l.n_head as u32).collect()));
        kv("hcattn.model.layers.n_head_kv", Value::U32s(id.layers.iter().map(|l| l.n_head_kv as u32).collect()));
        kv("hcattn.model.layers.head_dim", Value::U32s(id.layers.iter().map(|l| l.dk as u32).collect()));
        let s = &self.settings;
        kv("hcattn.pq.dim", Value::U32(s.pq_dim as u32));
        kv("hcattn.pq.centroids", Value::U32(s.centroids as u32));
        kv("hcattn.pq.scope", Value::Str(s.scope.name().into()));
        kv("hcattn.fit.seed", Value::U64(s.seed));
        kv("hcattn.fit.text", Value::Str(self.text.clone()));
        kv("hcattn.fit.text_sha256", Value::Str(self.text_sha256.clone()));
        kv("hcattn.fit.tokens", Value::U64(self.tokens));
        let owners: Vec<usize> = match s.scope {
            Scope::Model => vec![0],
            _ => id.layers.iter().map(|l| l.il).collect(),
        };
        for (il, books) in owners.iter().zip(&self.books) {
            for (g, b) in books.iter().enumerate() {
                let t = gguf::Tensor { dims: vec![b.dim() as u64, b.len() as u64], data: b.centroids().to_vec() };
                f.tensors.push((tensor_name(s.scope, *il, g), t));
            }
        }
        f
    }

    pub fn from_gguf(f: &gguf::File) -> Result<CodebookFile, String> {
        if f.str("general.architecture")? != "hcattn-codebook" {
            return Err("not an hcattn codebook file (general.architecture is not 'hcattn-codebook')".into());
        }
        let v = f.u32("hcattn.format_version")?;
        if v != FORMAT_VERSION {
            return Err(format!("codebook file format version {v}; this hcattn reads version {FORMAT_VERSION}"));
        }
        let cols = ["il", "n_head", "n_head_kv", "head_dim"].map(|c| f.u32s(&format!("hcattn.model.layers.{c}")));
        let [il, nh, nkv, dk] = cols;
        let (il, nh, nkv, dk) = (il?, nh?, nkv?, dk?);
        if nh.len() != il.len() || nkv.len() != il.len() || dk.len() != il.len() {
            return Err("the layer tables have different lengths".into());
        }
        let layers: Vec<LayerShape> = (0..il.len())
            .map(|i| LayerShape { il: il[i] as usize, n_head: nh[i] as usize, n_head_kv: nkv[i] as usize, dk: dk[i] as usize })
            .collect();
        let scope_name = f.str("hcattn.pq.scope")?;
        let settings = Settings {
            pq_dim: f.u32("hcattn.pq.dim")? as usize,
            centroids: f.u32("hcattn.pq.centroids")? as usize,
            scope: Scope::parse(scope_name).ok_or_else(|| format!("unknown codebook scope '{scope_name}'"))?,
            seed: f.u64("hcattn.fit.seed")?,
        };
        if ![1, 2, 4, 8].contains(&settings.pq_dim) || !(16..=65536).contains(&settings.centroids) {
            return Err(format!("unsupported settings in the file: {}", settings.describe()));
        }
        let owners: Vec<usize> = match settings.scope {
            Scope::Model => vec![0],
            _ => layers.iter().map(|l| l.il).collect(),
        };
        let mut books = Vec::with_capacity(owners.len());
        for (i, il) in owners.iter().enumerate() {
            let n = match settings.scope {
                Scope::Model => 1,
                s => {
                    if !layers[i].dk.is_multiple_of(settings.pq_dim) {
                        return Err(format!("pq_dim {} does not divide layer {il}'s head dimension {}", settings.pq_dim, layers[i].dk));
                    }
                    s.books_per_layer(layers[i].dk, settings.pq_dim)
                }
            };
            let mut set = Vec::with_capacity(n);
            for g in 0..n {
                let name = tensor_name(settings.scope, *il, g);
                let t = f.tensor(&name).ok_or_else(|| format!("tensor '{name}' is missing"))?;
                if t.dims != [settings.pq_dim as u64, settings.centroids as u64] {
                    return Err(format!("tensor '{name}' has shape {:?}, expected [{}, {}]", t.dims, settings.pq_dim, settings.centroids));
                }
                set.push(Arc::new(Codebook::new(settings.pq_dim, t.data.clone()).map_err(|e| format!("tensor '{name}': {e}"))?));
            }
            books.push(set);
        }
        Ok(CodebookFile {
            identity: Identity {
                arch: f.str("hcattn.model.architecture")?.to_string(),
                fingerprint: f.str("hcattn.model.fingerprint")?.to_string(),
                file_name: f.str("hcattn.model.file_name")?.to_string(),
                layers,
            },
            settings,
            model_sha256: f.str("hcattn.model.sha256")?.to_string(),
            text: f.str("hcattn.fit.text")?.to_string(),
            text_sha256: f.str("hcattn.fit.text_sha256")?.to_string(),
            tokens: f.u64("hcattn.fit.tokens")?,
            books,
        })
    }

    /// Read and validate a file; errors name the file.
    pub fn load(path: &Path) -> Result<CodebookFile, String> {
        let bytes = fs::read(path).map_err(|e| format!("codebook file {}: {e}", path.display()))?;
        gguf::File::parse(&bytes)
            .and_then(|f| CodebookFile::from_gguf(&f))
            .map_err(|e| format!("codebook file {}: {e}", path.display()))
    }

    /// Write through a temporary file in the same folder and rename it into place, so that
    /// an interrupted write never leaves a file that a later run would trust.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = self.to_gguf().to_bytes();
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "codebook".into());
        let tmp = dir.join(format!(".{name}.{}.partial", std::process::id()));
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Refuse a file made for another model: the message says which property differs.
    pub fn check_model(&self, model: &Identity, path: &str) -> Result<(), String> {
        let mine = &self.identity;
        let head = format!("codebook file {path} was made for another model");
        if mine.arch != model.arch {
            return Err(format!("{head}: architecture '{}', this model is '{}'", mine.arch, model.arch));
        }
        if mine.layers != model.layers {
            let show = |l: &[LayerShape]| {
                let first = l.first().map(|x| format!(", first {} heads / {} KV heads of dim {}", x.n_head, x.n_head_kv, x.dk));
                format!("{} attention layers{}", l.len(), first.unwrap_or_default())
            };
            return Err(format!("{head}: {}; this model serves {}", show(&mine.layers), show(&model.layers)));
        }
        if mine.fingerprint != model.fingerprint {
            return Err(format!(
                "{head}: model file {} (fingerprint {}); this is {} (fingerprint {})",
                mine.file_name,
                &mine.fingerprint[..mine.fingerprint.len().min(16)],
                model.file_name,
                &model.fingerprint[..model.fingerprint.len().min(16)]
            ));
        }
        Ok(())
    }

    /// The books of model layer `il` (shared across layers for scope model).
    pub fn books_for(&self, il: usize) -> Option<Vec<Arc<Codebook>>> {
        match self.settings.scope {
            Scope::Model => self.books.first().cloned(),
            _ => self.identity.layers.iter().position(|l| l.il == il).map(|i| self.books[i].clone()),
        }
    }
}

/// Fit codebooks on captured keys: `keys[il]` = rows of `n_head_kv * dk` post-RoPE keys of
/// layer `il`, for every layer in `layers`. `progress(what, done, total)` reports each fit.
pub fn fit(
    keys: &BTreeMap<usize, Vec<Vec<f32>>>,
    layers: &[LayerShape],
    settings: &Settings,
    progress: &(dyn Fn(&str, usize, usize) + Sync),
) -> Result<Vec<Vec<Arc<Codebook>>>, String> {
    let dim = settings.pq_dim;
    for l in layers {
        if l.dk % dim != 0 {
            return Err(format!("pq_dim={dim} does not divide layer {}'s head dimension {}", l.il, l.dk));
        }
        if keys.get(&l.il).is_none_or(|r| r.is_empty()) {
            return Err(format!("no keys were captured for layer {}", l.il));
        }
    }
    // the data of each codebook to fit: sub-vectors pooled by scope
    let mut jobs: Vec<(String, Vec<f32>)> = Vec::new();
    let gather = |l: &LayerShape, group: Option<usize>, out: &mut Vec<f32>| {
        for row in &keys[&l.il] {
            for (i, x) in row.chunks_exact(dim).enumerate() {
                if group.is_none_or(|g| (i * dim % l.dk) / dim == g) {
                    out.extend_from_slice(x);
                }
            }
        }
    };
    match settings.scope {
        Scope::Model => {
            let mut all = Vec::new();
            layers.iter().for_each(|l| gather(l, None, &mut all));
            jobs.push(("model".into(), all));
        }
        Scope::Layer => {
            for l in layers {
                let mut d = Vec::new();
                gather(l, None, &mut d);
                jobs.push((format!("layer {}", l.il), d));
            }
        }
        Scope::Group => {
            for l in layers {
                for g in 0..l.dk / dim {
                    let mut d = Vec::new();
                    gather(l, Some(g), &mut d);
                    jobs.push((format!("layer {} group {g}", l.il), d));
                }
            }
        }
    }
    let total = jobs.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    // books in parallel when there are many (each fit is itself parallel, and bit-identical
    // for any thread count, so the result does not depend on the split)
    let fitted: Vec<Result<Codebook, String>> = jobs
        .par_iter()
        .map(|(name, data)| {
            let km = KMeans { seed: settings.seed, ..KMeans::new(settings.centroids, dim) };
            let r = km.fit(data, &mut |_, _| {}).map_err(|e| format!("fitting the codebook of {name}: {e}"));
            let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            progress(name, n, total);
            r
        })
        .collect();
    let mut fitted = fitted.into_iter();
    let per_layer = |l: &LayerShape| settings.scope.books_per_layer(l.dk, dim);
    let mut out = Vec::new();
    match settings.scope {
        Scope::Model => out.push(vec![Arc::new(fitted.next().ok_or("no codebook was fitted")??)]),
        _ => {
            for l in layers {
                let mut set = Vec::new();
                for _ in 0..per_layer(l) {
                    set.push(Arc::new(fitted.next().ok_or("fewer codebooks than layers")??));
                }
                out.push(set);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(scope: Scope) -> CodebookFile {
        let layers = vec![
            LayerShape { il: 0, n_head: 4, n_head_kv: 2, dk: 8 },
            LayerShape { il: 2, n_head: 4, n_head_kv: 2, dk: 8 },
        ];
        let settings = Settings { pq_dim: 2, centroids: 16, scope, seed: 3 };
        let mut keys = BTreeMap::new();
        let mut s = 1u64;
        for l in &layers {
            let rows = (0..40)
                .map(|_| {
                    (0..16)
                        .map(|_| {
                            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                        })
                        .collect()
                })
                .collect();
            keys.insert(l.il, rows);
        }
        let books = fit(&keys, &layers, &settings, &|_, _, _| {}).unwrap();
        CodebookFile {
            identity: Identity { arch: "llama".into(), fingerprint: "ab".repeat(32), file_name: "m.gguf".into(), layers },
            settings,
            model_sha256: "cd".repeat(32),
            text: "t.txt".into(),
            text_sha256: "ef".repeat(32),
            tokens: 40,
            books,
        }
    }

    #[test]
    fn file_round_trip_for_every_scope() {
        for scope in [Scope::Layer, Scope::Group, Scope::Model] {
            let f = sample(scope);
            let expect = match scope {
                Scope::Model => vec![1],
                Scope::Layer => vec![1, 1],
                Scope::Group => vec![4, 4],
            };
            assert_eq!(f.books.iter().map(|b| b.len()).collect::<Vec<_>>(), expect);
            let back = CodebookFile::from_gguf(&gguf::File::parse(&f.to_gguf().to_bytes()).unwrap()).unwrap();
            assert_eq!(back.identity, f.identity);
            assert_eq!(back.settings, f.settings);
            assert_eq!((back.tokens, &back.text, &back.model_sha256), (40, &f.text, &f.model_sha256));
            for (a, b) in back.books.iter().flatten().zip(f.books.iter().flatten()) {
                assert_eq!(a.centroids(), b.centroids());
            }
            assert!(back.books_for(2).is_some());
            assert_eq!(back.books_for(1).is_some(), scope == Scope::Model, "layer 1 is not served");
        }
    }

    #[test]
    fn another_model_is_refused_with_the_reason() {
        let f = sample(Scope::Layer);
        let mut other = f.identity.clone();
        assert!(f.check_model(&other, "x").is_ok());
        other.fingerprint = "00".repeat(32);
        assert!(f.check_model(&other, "x").unwrap_err().contains("fingerprint"));
        other = f.identity.clone();
        other.arch = "qwen3".into();
        assert!(f.check_model(&other, "x").unwrap_err().contains("architecture 'llama'"));
        other = f.identity.clone();
        other.layers.pop();
        assert!(f.check_model(&other, "x").unwrap_err().contains("2 attention layers"));
    }

    #[test]
    fn damaged_files_are_refused() {
        let f = sample(Scope::Group);
        let mut g = f.to_gguf();
        g.tensors.pop();
        assert!(CodebookFile::from_gguf(&g).unwrap_err().contains("missing"));
        let mut g = f.to_gguf();
        g.kv.insert("hcattn.format_version".into(), Value::U32(9));
        assert!(CodebookFile::from_gguf(&g).unwrap_err().contains("version 9"));
        let mut g = f.to_gguf();
        g.tensors[0].1.data[3] = f32::NAN;
        assert!(CodebookFile::from_gguf(&g).is_err());
        let mut g = f.to_gguf();
        g.kv.insert("general.architecture".into(), Value::Str("llama".into()));
        assert!(CodebookFile::from_gguf(&g).unwrap_err().contains("not an hcattn codebook"));
    }

    #[test]
    fn save_is_atomic_and_load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("hcattn-cal-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("cb.gguf");
        sample(Scope::Layer).save(&p).unwrap();
        assert!(CodebookFile::load(&p).is_ok());
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        let bytes = fs::read(&p).unwrap();
        fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let e = CodebookFile::load(&p).unwrap_err();
        assert!(e.contains("cb.gguf") && e.contains("truncated"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fingerprint_depends_on_head_and_tail_and_length() {
        let dir = std::env::temp_dir().join(format!("hcattn-fp-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m");
        let mut data = vec![7u8; (FINGERPRINT_SPAN * 3) as usize];
        fs::write(&p, &data).unwrap();
        let a = model_fingerprint(&p).unwrap();
        let n = data.len();
        data[n - 1] = 8;
        fs::write(&p, &data).unwrap();
        let b = model_fingerprint(&p).unwrap();
        data.push(0);
        fs::write(&p, &data).unwrap();
        let c = model_fingerprint(&p).unwrap();
        fs::write(&p, b"tiny").unwrap();
        let d = model_fingerprint(&p).unwrap();
        assert!(a != b && b != c && c != d && a.len() == 64);
        fs::remove_dir_all(&dir).unwrap();
    }
}
