//! One context's KV backend: the cells, per-layer key and value stores, the ubatch being
//! processed, and the attention over them.
//!
//! llama.cpp drives it in this order for each ubatch: `prepare` (dry run) once per batch, then
//! per ubatch `apply` (take cells for the new tokens), then per layer `store` and `attend` on
//! every graph thread. Sequence operations and state I/O happen between batches.

use std::cell::{RefCell, UnsafeCell};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::approx::{self, Approx, ApproxScratch};
use crate::attention::{self, BlockScratch, Scale, Scratch, Window};
use crate::barrier::SpinBarrier;
use crate::cells::{Cells, SeqSet, Seqs};
use crate::error::{Error, Result};
use crate::keys::KeyStore;
use crate::levels::HeadLevels;
use crate::calibration::{CodebookFile, Identity};
use crate::options::{CodebookSource, KeyCodec, Options, Prefill, Select, Values};
use crate::rows::Rows;
use crate::select::Cut;

/// One attention layer as llama.cpp describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerDesc {
    pub il: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub dk: usize,
    pub dv: usize,
    pub window: Window,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: String,
    pub n_ctx: usize,
    pub n_ctx_seq: usize,
    pub n_seq_max: usize,
    pub n_ubatch: usize,
    pub kv_unified: bool,
    pub no_alloc: bool,
    /// the model file, when llama.cpp knows it (codebook files are checked against it)
    pub model_path: Option<String>,
    pub layers: Vec<LayerDesc>,
    pub options: Options,
}

/// A token of a ubatch: its position and the sequences it belongs to (the first one decides
/// what it may attend to).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Token {
    pub pos: i32,
    pub seq0: usize,
    pub seqs: SeqSet,
}

/// Bytes held: where (host, device, file) and what (the fast key tier, codebooks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub host: usize,
    pub device: usize,
    pub file: usize,
    /// keys and codebooks (part of host on a CPU-only build)
    pub fast: usize,
    pub codebooks: usize,
}

/// Strided read access to one of the op's input tensors: `[len, heads, tokens]` F32.
pub trait Input {
    /// The `len` values of head `h` of token `t`.
    fn row(&self, t: usize, h: usize) -> &[f32];
}

/// Write access to the op's output, `[dv * n_head, n_tokens]` F32.
pub trait Output {
    /// The `len` values starting at head `h` of token `t`; callers on different threads ask
    /// for disjoint ranges.
    #[allow(clippy::mut_from_ref)]
    fn span(&self, t: usize, h: usize, len: usize) -> &mut [f32];
}

/// One (layer, ubatch) attention call.
pub struct Call<'a> {
    pub il: usize,
    pub n_tokens: usize,
    pub causal: bool,
    pub scale: Scale,
    pub q: Option<&'a dyn Input>,
    pub k: &'a dyn Input,
    pub v: &'a dyn Input,
    pub sinks: Option<&'a [f32]>,
    pub out: Option<&'a dyn Output>,
}

struct Layer {
    desc: LayerDesc,
    /// The fast tier: the keys of every cell, all KV heads ([n_head_kv][dk] per cell).
    keys: KeyStore,
    /// The host tier: row c = the values of cell c, [n_head_kv][dv].
    vals: Rows,
}

/// The ubatch committed by the last `apply`.
#[derive(Default)]
struct Plan {
    /// (position, cell, index into lists) per token
    tokens: Vec<(i32, u32, u32)>,
    /// per distinct first sequence of the ubatch: its cells as (position, cell), by position
    lists: Vec<Vec<(i32, u32)>>,
}

pub struct Backend {
    cfg: Config,
    cells: Cells,
    layers: Vec<Layer>,
    /// model layer index -> index into `layers`
    layer_of: Vec<Option<usize>>,
    plan: Plan,
    /// the peak of prefill=exact was logged
    prompt_noted: bool,
    /// what the threads of a one-token decode op share
    shared: Shared,
    /// the GPU fast tier (device=cuda), mirroring the layers' codes
    gpu: Option<crate::gpu::Tier>,
}

/// The one-token decode path (see `Backend::attend_one`) splits each step across the op's
/// threads. Step 1 writes logits (or levels) here, one region per (KV head, chunk of cells)
/// work item: g rows of the chunk's length, back to back, in the order of the items. Step 2
/// reads them (after the barrier) and writes each head's k, probabilities (with levels: its
/// distribution over them) and cut; step 3 reads those and writes partial value sums (with
/// levels, from the item's probabilities, which it writes into its thread's scratch), which
/// step 4 adds up.
#[derive(Default)]
struct Shared {
    logits: UnsafeCell<Vec<f32>>,
    /// stores with levels (`KeyStore::has_levels`): the levels, in the regions of `logits`,
    /// which then holds only the raw scores of exact cells; and each query head's (bias, step)
    /// as the bits of two f32
    levels: UnsafeCell<Vec<u16>>,
    bias_step: Vec<AtomicU64>,
    /// with levels: each item's counts per level (`levels::count_chunk`), in the regions of
    /// `logits`; the indices of its exact cells, from `kvh * n + (its first cell)`; and each
    /// query head's distribution, written by the thread that owns the head in step 2
    pairs: UnsafeCell<Vec<u64>>,
    exact_at: UnsafeCell<Vec<u32>>,
    heads: UnsafeCell<Vec<HeadLevels>>,
    /// each query head's probabilities (n a head; stores without levels only) and cut,
    /// written by the thread that owns the head in step 2 and read by every thread in step 3;
    /// the partial value sums (g * dv) and masses (g) of each (KV head, chunk) item of step 3,
    /// read in step 4
    probs: UnsafeCell<Vec<f32>>,
    cuts: UnsafeCell<Vec<Cut>>,
    parts: UnsafeCell<Vec<f32>>,
    part_mass: UnsafeCell<Vec<f64>>,
    ks: Vec<AtomicUsize>,
    barrier: SpinBarrier,
    /// GPU decode: thread 0 writes the selection (or the error) before the barrier, every
    /// thread reads it after
    selection: UnsafeCell<crate::gpu::select::Selection>,
    gpu_error: UnsafeCell<Option<Error>>,
}

// SAFETY: the buffers are resized only by `apply` (&mut self); during an op, threads write disjoint
// regions before the barrier and only read after it. `selection` and `gpu_error` are written
// by thread 0 only, before the barrier, and read by all only after it.
unsafe impl Sync for Shared {}

/// Exact cells (summed over the layers) above which `settle` encodes the layers in parallel.
const PARALLEL_SETTLE_CELLS: usize = 4096;

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Query tokens per block of the prompt kernel (see [`attention::exact_block`]).
const BLOCK_TOKENS: usize = 32;

/// GPU decode, thread 0: the queries, the exact logits, a key row.
type GpuStepScratch = (Vec<f32>, Vec<(u32, f32)>, Vec<f32>);

thread_local! {
    static SCRATCH: RefCell<(Scratch, Vec<f32>)> = RefCell::new((Scratch::default(), Vec::new()));
    static BLOCK: RefCell<(BlockScratch, Vec<f32>, Vec<(usize, usize)>)> = RefCell::new(Default::default());
    static APPROX: RefCell<ApproxScratch> = RefCell::new(ApproxScratch::default());
    static GPU_STEP: RefCell<GpuStepScratch> = RefCell::new(Default::default());
    static GPU_SUM: RefCell<crate::gpu::select::SumScratch> = RefCell::new(Default::default());
}

/// With `codebook=FILE`: read the file, check it against the model and the options, and settle
/// the key codec to the file's PQ settings.
fn load_codebook_file(cfg: &mut Config) -> Result<Option<CodebookFile>> {
    let CodebookSource::File { path, pq_given } = cfg.options.codebook.clone() else {
        return Ok(None);
    };
    let f = CodebookFile::load(std::path::Path::new(&path)).map_err(Error::Config)?;
    let model = Identity::of(cfg).map_err(|e| Error::Config(format!("codebook file {path}: {e}")))?;
    f.check_model(&model, &path).map_err(Error::Config)?;
    let s = &f.settings;
    let file_codec = KeyCodec::Pq { dim: s.pq_dim, centroids: s.centroids, scope: s.scope };
    if pq_given && cfg.options.keys != file_codec {
        let asked = match cfg.options.keys {
            KeyCodec::Pq { dim, centroids, scope } => format!("pq_dim={dim}, pq_centroids={centroids}, codebook_scope={}", scope.name()),
            other => format!("{other:?}"),
        };
        return Err(Error::Config(format!(
            "codebook file {path} was fitted with {}, but the options ask for {asked}; calibrate with those settings or drop them from the options",
            s.describe()
        )));
    }
    cfg.options.keys = file_codec;
    eprintln!(
        "hc: codebooks from {path} ({}; fitted on {} tokens of {})",
        s.describe(),
        f.tokens,
        if f.text.is_empty() { "an unnamed text" } else { &f.text }
    );
    Ok(Some(f))
}

impl Backend {
    pub fn new(cfg: Config) -> Result<Backend> {
        if cfg.n_ctx == 0 || cfg.n_seq_max == 0 || cfg.n_seq_max > crate::cells::MAX_SEQ {
            return Err(Error::Config(format!(
                "bad context shape: {} cells, {} sequences (at most {})",
                cfg.n_ctx,
                cfg.n_seq_max,
                crate::cells::MAX_SEQ
            )));
        }
        if cfg.layers.is_empty() {
            return Err(Error::Config("the model has no attention layers to serve".into()));
        }
        if crate::capture::active() {
            crate::capture::record_model(crate::calibration::Identity::of(&cfg));
        }
        let mut cfg = cfg;
        let file = load_codebook_file(&mut cfg)?;
        let mut layer_of = Vec::new();
        let mut layers = Vec::with_capacity(cfg.layers.len());
        for (i, d) in cfg.layers.iter().enumerate() {
            if d.n_head == 0 || d.n_head_kv == 0 || d.n_head % d.n_head_kv != 0 || d.dk == 0 || d.dv == 0 {
                return Err(Error::Config(format!(
                    "layer {}: unsupported head shape ({} query heads, {} KV heads, dims {}/{})",
                    d.il, d.n_head, d.n_head_kv, d.dk, d.dv
                )));
            }
            if layer_of.len() <= d.il {
                layer_of.resize(d.il + 1, None);
            }
            if layer_of[d.il].is_some() {
                return Err(Error::Config(format!("layer {} is described twice", d.il)));
            }
            layer_of[d.il] = Some(i);
            let alloc = !cfg.no_alloc;
            let o = &cfg.options;
            let mut keys = KeyStore::new(o.keys, cfg.n_ctx, d.n_head_kv, d.dk, o.fit_tokens, o.seed)
                .map_err(|e| Error::Config(format!("layer {}: {e}", d.il)))?;
            if let Some(f) = &file {
                let books = f.books_for(d.il).ok_or_else(|| Error::Config(format!("the codebook file has no codebooks for layer {}", d.il)))?;
                keys.set_codebooks(books).map_err(|e| Error::Config(format!("layer {}: codebook file: {e}", d.il)))?;
            }
            let vals = match &o.values {
                Values::File(dir) if alloc => Rows::in_file(cfg.n_ctx, d.n_head_kv * d.dv, std::path::Path::new(dir))?,
                _ => Rows::new(cfg.n_ctx, d.n_head_kv * d.dv, alloc)?,
            };
            layers.push(Layer { desc: d.clone(), keys, vals });
        }
        // a unified cache accepts any sequence id llama.cpp does, whatever n_seq_max says
        let seq_limit = if cfg.kv_unified { crate::cells::MAX_SEQ } else { cfg.n_seq_max };
        let cells = Cells::new(cfg.n_ctx, seq_limit)?;
        let gpu = if cfg.no_alloc { None } else { crate::gpu::open(&cfg.options, &crate::gpu::shapes(&cfg.options, &cfg.layers, cfg.n_ctx))? };
        if gpu.is_some() {
            for l in &mut layers {
                l.keys.track_fresh(true);
            }
        }
        Ok(Backend { cells, layers, layer_of, plan: Plan::default(), prompt_noted: false, shared: Shared::default(), gpu, cfg })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn cells(&self) -> &Cells {
        &self.cells
    }

    pub fn usage(&self) -> Usage {
        // a model-scope codebook is shared by every layer: count each book once
        let mut seen = std::collections::HashSet::new();
        let codebooks: usize = self
            .layers
            .iter()
            .flat_map(|l| l.keys.codebooks())
            .filter(|b| seen.insert(std::sync::Arc::as_ptr(b)))
            .map(|b| b.bytes())
            .sum();
        let fast: usize = self.layers.iter().map(|l| l.keys.bytes(self.cfg.n_ctx)).sum::<usize>() + codebooks;
        let values: usize = self.layers.iter().map(|l| l.vals.bytes()).sum();
        let in_file = self.cfg.options.values != Values::Host;
        let (host, file) = if in_file { (fast, values) } else { (fast + values, 0) };
        let device = self.gpu.as_ref().map_or(0, |g| g.bytes());
        Usage { host, device, file, fast, codebooks }
    }

    /// Bytes stock llama.cpp's f16 cache takes for the same context and layers.
    pub fn f16_cache_bytes(&self) -> usize {
        self.cfg.layers.iter().map(|d| self.cfg.n_ctx * d.n_head_kv * (d.dk + d.dv) * 2).sum()
    }

    /// Drop the stored rows of cells whose sequences are all gone.
    fn sweep(&mut self) {
        let freed = self.cells.take_freed();
        if freed.is_empty() {
            return;
        }
        for l in &mut self.layers {
            for &c in &freed {
                l.keys.forget(c as usize);
            }
        }
    }

    /// Encode the keys that need not stay exact any more (the previous ubatch's, and the
    /// online codebooks' first keys once there are enough). With prefill=exact nothing is
    /// encoded while a prompt is being processed (`prompt`: the next ubatch holds several
    /// tokens of one sequence), so a prompt attends to itself exactly and an online codebook
    /// is fitted on the whole first prompt. Returns how many layers fitted a codebook now.
    fn settle(&mut self, prompt: bool) -> Result<usize> {
        if self.layers.iter().all(|l| l.keys.is_exact_codec()) {
            return Ok(0);
        }
        if prompt && self.cfg.options.prefill == Prefill::Exact {
            return Ok(0);
        }
        let (sink, recent) = (self.cfg.options.sink as i32, self.cfg.options.recent as i32);
        // anchor tokens stay exact while a prompt attends to them
        let anchor = match self.cfg.options.prefill {
            Prefill::Anchor(n) if prompt => n.min(i32::MAX as usize) as i32,
            _ => 0,
        };
        // the newest position of each sequence, for the recent window (apply runs this per
        // ubatch, so skip the scan of every cell when there is no window)
        let mut newest = vec![-1i32; if recent > 0 { self.cells.seq_limit() } else { 0 }];
        for c in 0..if recent > 0 { self.cells.len() } else { 0 } {
            if self.cells.is_used(c) {
                for s in self.cells.seqs(c).iter() {
                    newest[s] = newest[s].max(self.cells.pos(c));
                }
            }
        }
        let cells = &self.cells;
        let keep = |c: usize| {
            let p = cells.pos(c);
            p < sink || p < anchor || (recent > 0 && cells.seqs(c).iter().any(|s| p > newest[s] - recent))
        };
        let mut fitted = 0;
        let mut note = String::new();
        let t0 = std::time::Instant::now();
        // a prompt's worth of keys (the first generation step after prefill=exact, or an
        // online fit) is encoded one layer per worker: it stalls that step by up to a second at
        // 8192 tokens on one thread. A step's token or two stay on this thread, where waking
        // workers would cost more than the work.
        let notes: Vec<Result<Option<String>>> = if self.layers.iter().map(|l| l.keys.exact_cells()).sum::<usize>() > PARALLEL_SETTLE_CELLS {
            use rayon::prelude::*;
            self.layers.par_iter_mut().map(|l| l.keys.settle(keep)).collect()
        } else {
            self.layers.iter_mut().map(|l| l.keys.settle(keep)).collect()
        };
        for n in notes {
            if let Some(n) = n? {
                fitted += 1;
                note = n;
            }
        }
        if fitted > 0 {
            eprintln!("hc: {fitted} layers: {note} (the last layer; all layers took {:.2} s)", t0.elapsed().as_secs_f64());
        }
        if !self.prompt_noted && self.cfg.options.prefill == Prefill::Exact && !prompt {
            // the first generation step after a prompt: say what keeping it exact cost
            let peak: usize = self.layers.iter().map(|l| l.keys.peak_exact_bytes()).sum();
            if peak > 0 {
                self.prompt_noted = true;
                eprintln!(
                    "hc: prefill=exact held up to {:.1} MiB of exact keys ({:.1}% of the f16 cache) until the prompt was encoded",
                    peak as f64 / (1 << 20) as f64,
                    100.0 * peak as f64 / self.f16_cache_bytes().max(1) as f64
                );
            }
        }
        Ok(fitted)
    }

    fn check_token(&self, t: &Token) -> Result<()> {
        let limit = self.cells.seq_limit();
        if t.seq0 >= limit || !t.seqs.contains(t.seq0) || t.seqs.iter().any(|s| s >= limit) {
            return Err(Error::Request(format!("token at position {} names a sequence outside [0, {limit})", t.pos)));
        }
        if t.pos < 0 {
            return Err(Error::Request(format!("negative position {}", t.pos)));
        }
        Ok(())
    }

    /// Would these ubatches fit, applied in order? Changes nothing.
    pub fn prepare(&self, ubatches: &[Vec<Token>]) -> Result<bool> {
        if self.cfg.no_alloc {
            return Err(Error::Request("this backend was created to measure sizes only (no_alloc)".into()));
        }
        let mut need = 0usize;
        let mut per_seq = vec![0usize; self.cells.seq_limit()];
        for t in ubatches.iter().flatten() {
            self.check_token(t)?;
            need += 1;
            for s in t.seqs.iter() {
                per_seq[s] += 1;
            }
        }
        if need > self.cells.n_free() {
            return Ok(false);
        }
        if !self.cfg.kv_unified {
            for (s, &n) in per_seq.iter().enumerate() {
                if n > 0 && self.cells.count_seq(s) + n > self.cfg.n_ctx_seq {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Take cells for the ubatch's tokens; the store and attention calls that follow use them.
    pub fn apply(&mut self, tokens: &[Token]) -> Result<()> {
        if self.cfg.no_alloc {
            return Err(Error::Request("this backend was created to measure sizes only (no_alloc)".into()));
        }
        for t in tokens {
            self.check_token(t)?;
        }
        if tokens.len() > self.cells.n_free() {
            return Err(Error::Request(format!("{} tokens do not fit in {} free cells", tokens.len(), self.cells.n_free())));
        }
        self.sweep();
        let mut seen = SeqSet::default();
        let prompt = tokens.iter().any(|t| {
            let again = seen.contains(t.seq0);
            seen.insert(t.seq0);
            again
        });
        self.settle(prompt)?;
        if let Some(gpu) = &mut self.gpu {
            for (i, l) in self.layers.iter_mut().enumerate() {
                gpu.sync_layer(i, &mut l.keys)?;
            }
        }
        let mut plan = Plan::default();
        let mut list_of_seq: Vec<Option<u32>> = vec![None; self.cells.seq_limit()];
        for t in tokens {
            let cell = self.cells.alloc(t.pos, t.seqs).expect("free cells were counted above");
            let list = *list_of_seq[t.seq0].get_or_insert_with(|| {
                plan.lists.push(Vec::new());
                (plan.lists.len() - 1) as u32
            });
            plan.tokens.push((t.pos, cell as u32, list));
        }
        for (s, l) in list_of_seq.iter().enumerate() {
            if let Some(l) = l {
                let mut list = self.cells.sorted_seq(s);
                if let (Prefill::Anchor(n), true) = (self.cfg.options.prefill, prompt) {
                    // the anchors, then this ubatch's own tokens of the sequence
                    let start = tokens.iter().filter(|t| t.seq0 == s).map(|t| t.pos).min().unwrap_or(0);
                    let n = n.min(i32::MAX as usize) as i32;
                    list.retain(|e| e.0 < n || e.0 >= start);
                }
                plan.lists[*l as usize] = list;
            }
        }
        for l in &mut self.layers {
            l.keys.reserve(plan.tokens.iter().map(|t| t.1 as usize));
        }
        if plan.tokens.len() == 1 {
            let n_head = self.layers.iter().map(|l| l.desc.n_head).max().unwrap_or(0);
            let need = n_head * plan.lists[0].len();
            let logits = self.shared.logits.get_mut();
            if logits.len() < need {
                logits.resize(need, 0.0);
            }
            let levels = self.shared.levels.get_mut();
            if levels.len() < need {
                levels.resize(need, 0);
            }
            if self.layers.iter().any(|l| l.keys.has_levels()) {
                let (pairs, exact_at) = (self.shared.pairs.get_mut(), self.shared.exact_at.get_mut());
                if pairs.len() < need {
                    pairs.resize(need, 0);
                }
                if exact_at.len() < need {
                    exact_at.resize(need, 0);
                }
                let heads = self.shared.heads.get_mut();
                if heads.len() < n_head {
                    heads.resize_with(n_head, HeadLevels::default);
                }
            }
            let probs = self.shared.probs.get_mut();
            if probs.len() < need {
                probs.resize(need, 0.0);
            }
            let cuts = self.shared.cuts.get_mut();
            if cuts.len() < n_head {
                cuts.resize(n_head, Cut::NONE);
            }
            let dv = self.layers.iter().map(|l| l.desc.dv).max().unwrap_or(0);
            let chunks = approx::value_chunks(plan.lists[0].len());
            let (parts, part_mass) = (self.shared.parts.get_mut(), self.shared.part_mass.get_mut());
            if parts.len() < n_head * chunks * dv {
                parts.resize(n_head * chunks * dv, 0.0);
            }
            if part_mass.len() < n_head * chunks {
                part_mass.resize(n_head * chunks, 0.0);
            }
            self.shared.ks.resize_with(n_head.max(self.shared.ks.len()), AtomicUsize::default);
            self.shared.bias_step.resize_with(n_head.max(self.shared.bias_step.len()), AtomicU64::default);
        }
        self.plan = plan;
        Ok(())
    }

    /// The description of model layer `il`, when this backend serves it.
    pub fn layer_desc(&self, il: usize) -> Option<&LayerDesc> {
        self.layer(il).ok().map(|l| &l.desc)
    }

    fn layer(&self, il: usize) -> Result<&Layer> {
        self.layer_of
            .get(il)
            .copied()
            .flatten()
            .map(|i| &self.layers[i])
            .ok_or_else(|| Error::Request(format!("layer {il} is not served by this backend")))
    }

    fn check_call(&self, call: &Call) -> Result<&Layer> {
        let layer = self.layer(call.il)?;
        if call.n_tokens != self.plan.tokens.len() {
            return Err(Error::Request(format!(
                "layer {}: the op has {} tokens but the applied ubatch has {}",
                call.il,
                call.n_tokens,
                self.plan.tokens.len()
            )));
        }
        if !layer.vals.is_allocated() {
            return Err(Error::Request("this backend was created to measure sizes only (no_alloc)".into()));
        }
        Ok(layer)
    }

    /// Store the ubatch's keys and values of one layer: thread `ith` of `nth` takes every
    /// nth token.
    pub fn store(&self, call: &Call, ith: usize, nth: usize) -> Result<()> {
        let layer = self.check_call(call)?;
        let d = &layer.desc;
        SCRATCH.with(|s| {
            let buf = &mut s.borrow_mut().1;
            for t in (ith..call.n_tokens).step_by(nth.max(1)) {
                let cell = self.plan.tokens[t].1 as usize;
                for (is_key, input, dim) in [(true, call.k, d.dk), (false, call.v, d.dv)] {
                    buf.clear();
                    for h in 0..d.n_head_kv {
                        buf.extend_from_slice(&input.row(t, h)[..dim]);
                    }
                    // SAFETY: each cell belongs to one token of this ubatch and each token to one
                    // thread, so no two threads write the same row; `apply` reserved the key
                    // rows; nothing reads this layer's rows until the attention op, which ggml
                    // runs after a barrier.
                    unsafe {
                        if is_key {
                            if crate::capture::active() {
                                crate::capture::record(d.il, self.plan.tokens[t].0, buf);
                            }
                            layer.keys.write_exact(cell, buf);
                        } else {
                            layer.vals.write_row(cell, buf);
                        }
                    }
                }
            }
        });
        Ok(())
    }

    /// Attention of the ubatch's queries in one layer: the (token, KV head) pairs are split
    /// into `nth` contiguous shares and thread `ith` computes its own.
    pub fn attend(&self, call: &Call, ith: usize, nth: usize) -> Result<()> {
        let layer = self.check_call(call)?;
        let d = &layer.desc;
        let q = call.q.ok_or_else(|| Error::Request("attention call without queries".into()))?;
        let out = call.out.ok_or_else(|| Error::Request("attention call without output".into()))?;
        let g = d.n_head / d.n_head_kv;
        let nth = nth.max(1);
        let o = &self.cfg.options;
        // several tokens whose visible keys are all exact (a prompt under prefill=exact or
        // anchor, or the exact mode): exact attention, a block of tokens at a time
        if call.n_tokens > 1 && (o.is_exact() || self.plan.lists.iter().flatten().all(|&(_, c)| layer.keys.is_exact(c as usize))) {
            self.attend_blocks(call, layer, q, out, ith, nth);
            return Ok(());
        }
        if !o.is_exact() {
            let layer_k = o.select == Select::Layer;
            let a = Approx { tau: o.tau, renorm: o.renorm, layer_k };
            if call.n_tokens == 1 {
                if let Some(gpu) = self.gpu.as_ref().filter(|g| g.ready(self.layer_of[call.il].unwrap_or(usize::MAX))) {
                    return self.attend_gpu(gpu, call, layer, q, out, a, ith, nth);
                }
                if nth > 1 {
                    return self.attend_one(call, layer, q, out, a, ith, nth);
                }
            }
            // one k per layer needs every head of a token in one work item
            let per_item = if layer_k { d.n_head_kv } else { 1 };
            let items = call.n_tokens * d.n_head_kv / per_item;
            let (start, end) = (items * ith / nth, items * (ith + 1) / nth);
            APPROX.with(|s| {
                let s = &mut *s.borrow_mut();
                for item in start..end {
                    let (t, kv0) = ((item * per_item) / d.n_head_kv, (item * per_item) % d.n_head_kv);
                    let (pos, _, list) = self.plan.tokens[t];
                    let cells = attention::visible(&self.plan.lists[list as usize], pos, call.causal, d.window);
                    // SAFETY: values were stored before this op (ggml barrier) and are not written now.
                    let val = |c: u32, kvh: usize| unsafe { &layer.vals.row(c as usize)[kvh * d.dv..(kvh + 1) * d.dv] };
                    // SAFETY: keys too.
                    unsafe {
                        approx::approximate(
                            &layer.keys,
                            kv0..kv0 + per_item,
                            g,
                            d.dk,
                            d.dv,
                            cells,
                            |h| q.row(t, h),
                            val,
                            call.scale,
                            call.sinks,
                            a,
                            s,
                            |kvh| out.span(t, kvh * g, g * d.dv),
                        )
                    };
                }
            });
            return Ok(());
        }
        let items = call.n_tokens * d.n_head_kv;
        let (start, end) = (items * ith / nth, items * (ith + 1) / nth);
        SCRATCH.with(|s| {
            let (scratch, qbuf) = &mut *s.borrow_mut();
            for item in start..end {
                let (t, kvh) = (item / d.n_head_kv, item % d.n_head_kv);
                let (pos, _, list) = self.plan.tokens[t];
                let cells = attention::visible(&self.plan.lists[list as usize], pos, call.causal, d.window);
                qbuf.clear();
                for h in kvh * g..(kvh + 1) * g {
                    // stock llama.cpp rounds queries to f16 before the K dot product (both its
                    // flash-attention and its mul_mat path); doing the same keeps exact mode close
                    qbuf.extend(q.row(t, h)[..d.dk].iter().map(|&x| half::f16::from_f32(x).to_f32()));
                }
                let sinks = call.sinks.map(|s| &s[kvh * g..(kvh + 1) * g]);
                let vo = kvh * d.dv;
                // SAFETY: the store op of this layer finished before this op started (ggml's
                // barrier between nodes), and nothing writes rows during attention.
                let key = |c: u32| unsafe { layer.keys.exact_row(c as usize, kvh) };
                let val = |c: u32| unsafe { &layer.vals.row(c as usize)[vo..vo + d.dv] };
                let o = out.span(t, kvh * g, g * d.dv);
                attention::exact(qbuf, g, d.dk, d.dv, cells, key, val, call.scale, sinks, scratch, o);
            }
        });
        Ok(())
    }

    /// The decode path of `attend` for one token, each step split across the threads:
    /// 1. logits (for 4-bit codes, the scan's levels and their counts per level: see
    ///    `crate::levels`), by (KV head, chunk of cells): as many chunks per KV head as make the
    ///    item count a multiple of the thread count;
    /// 2. by query head: softmax, the histogram and the cut; with levels, the head's counts
    ///    added up, one exp per level and the cut from the counts, so that no pass over the
    ///    head's cells is left to this step but the one that finds the boundary cell (with one
    ///    k per layer, a barrier for the layer's k first);
    /// 3. the value sums, by (KV head, chunk of `approx::VALUE_CHUNK` cells), into partial
    ///    sums: the threads share the value reads evenly whatever the head count; with levels,
    ///    each item first looks its cells' probabilities up into its thread's scratch, where
    ///    its sums read them back from the cache (no barrier, no shared rows of n);
    /// 4. each head's output, its partial sums added in chunk order (the same bits on any
    ///    thread count), by query head.
    #[allow(clippy::too_many_arguments)]
    fn attend_one(&self, call: &Call, layer: &Layer, q: &dyn Input, out: &dyn Output, a: Approx, ith: usize, nth: usize) -> Result<()> {
        let d = &layer.desc;
        let g = d.n_head / d.n_head_kv;
        let (pos, _, list) = self.plan.tokens[0];
        let cells = attention::visible(&self.plan.lists[list as usize], pos, call.causal, d.window);
        let n = cells.len();
        let sh = &self.shared;
        let level = crate::simd::level();
        // SAFETY: apply sized it for n_head * (the whole list) and nothing resizes it during the
        // op; the pointer is only used for the disjoint regions described at `Shared`.
        let base = unsafe { (*sh.logits.get()).as_mut_ptr() };
        debug_assert!(unsafe { (*sh.logits.get()).len() } >= d.n_head * n);
        let chunks = nth / gcd(nth, d.n_head_kv);
        let items = d.n_head_kv * chunks;
        // item i covers KV head i / chunks, cells [lo, hi) of the chunk i % chunks; its region
        // starts at g * (everything before it)
        let range = |i: usize| {
            let (kvh, c) = (i / chunks, i % chunks);
            (kvh, n * c / chunks, n * (c + 1) / chunks)
        };
        let region = |i: usize| {
            let (kvh, lo, _) = range(i);
            g * (kvh * n + lo)
        };
        let heads = (d.n_head * ith / nth)..(d.n_head * (ith + 1) / nth);
        let with_levels = layer.keys.has_levels();
        // SAFETY: as `base` (apply sizes them as `logits`, and `heads` for n_head, when a layer
        // has levels).
        let (lv_base, pairs_base, exact_base, heads_base) =
            unsafe { ((*sh.levels.get()).as_mut_ptr(), (*sh.pairs.get()).as_mut_ptr(), (*sh.exact_at.get()).as_mut_ptr(), (*sh.heads.get()).as_mut_ptr()) };
        debug_assert!(!with_levels || unsafe { (*sh.levels.get()).len().min((*sh.pairs.get()).len()).min((*sh.exact_at.get()).len()) >= d.n_head * n && (*sh.heads.get()).len() >= d.n_head });
        // where head h's cells lo..hi lie in the regions: (offset, lo, hi) per chunk
        let spans = |h: usize| {
            let (kvh, hg) = (h / g, h % g);
            (0..chunks).map(move |c| {
                let (_, lo, hi) = range(kvh * chunks + c);
                (region(kvh * chunks + c) + hg * (hi - lo), lo, hi)
            })
        };
        APPROX.with(|s| -> Result<()> {
            let s = &mut *s.borrow_mut();
            for i in items * ith / nth..items * (ith + 1) / nth {
                let (kvh, lo, hi) = range(i);
                // SAFETY: this item's region, written by this thread only (see `Shared`).
                let dst = unsafe { std::slice::from_raw_parts_mut(base.add(region(i)), g * (hi - lo)) };
                let q = |h| q.row(0, kvh * g + h);
                if with_levels {
                    // SAFETY: as `dst`, in the levels, the pairs and the exact cells (this item's
                    // cells of its KV head).
                    let (lv, pairs, exact) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(lv_base.add(region(i)), g * (hi - lo)),
                            std::slice::from_raw_parts_mut(pairs_base.add(region(i)), g * (hi - lo)),
                            std::slice::from_raw_parts_mut(exact_base.add(kvh * n + lo), hi - lo),
                        )
                    };
                    let mut bs = std::mem::take(&mut s.bias_step);
                    bs.resize(g, (0.0, 0.0));
                    // SAFETY: the keys were stored before this op and are not written during it.
                    unsafe { approx::levels(&layer.keys, kvh, g, d.dk, &cells[lo..hi], q, s, lv, dst, hi - lo, &mut bs) };
                    // every chunk of a KV head finds the same (bias, step): one query, one store
                    for (h, &(b, st)) in bs.iter().enumerate() {
                        sh.bias_step[kvh * g + h].store((b.to_bits() as u64) << 32 | st.to_bits() as u64, Ordering::Relaxed);
                    }
                    s.bias_step = bs;
                    let mut exact = Some(exact);
                    // (a chunk may be empty: more threads than cells)
                    for (l, p) in lv.chunks_exact((hi - lo).max(1)).zip(pairs.chunks_exact_mut((hi - lo).max(1))) {
                        // the exact cells are the same for every head of the KV head
                        crate::levels::count_chunk(level, l, lo, p, exact.take(), &mut s.count_scratch);
                    }
                } else {
                    // SAFETY: the keys were stored before this op and are not written during it.
                    unsafe { approx::logits(&layer.keys, kvh, g, d.dk, &cells[lo..hi], q, call.scale, s, dst, hi - lo) };
                }
            }
            sh.barrier.wait(nth)?;
            // SAFETY: step 1 is over on every thread; from here the logits, levels, pairs and
            // exact cells are only read.
            let all = unsafe { std::slice::from_raw_parts(base as *const f32, d.n_head * n) };
            let (lv_all, pairs_all, exact_all) = if with_levels {
                // SAFETY: as `all`.
                unsafe {
                    (
                        std::slice::from_raw_parts(lv_base as *const u16, d.n_head * n),
                        std::slice::from_raw_parts(pairs_base as *const u64, d.n_head * n),
                        std::slice::from_raw_parts(exact_base as *const u32, d.n_head * n),
                    )
                }
            } else {
                (&[][..], &[][..], &[][..])
            };
            // head h's levels chunk by chunk, each with its first cell
            let levels_of = |h: usize| spans(h).map(|(at, lo, hi)| (lo, &lv_all[at..at + hi - lo]));
            // SAFETY: apply sized it for n_head * n; this thread writes its heads' rows only.
            let probs_base = unsafe { (*sh.probs.get()).as_mut_ptr() };
            debug_assert!(unsafe { (*sh.probs.get()).len() } >= d.n_head * n);
            if s.hists.len() < heads.len() {
                s.hists.resize_with(heads.len(), Default::default);
            }
            for (k, h) in heads.clone().enumerate() {
                let sink = call.sinks.map(|x| x[h]);
                if with_levels {
                    let kvh = h / g;
                    let chunk_counts = spans(h).map(|(at, lo, hi)| crate::levels::ChunkCounts {
                        first: lo,
                        pairs: &pairs_all[at..at + hi - lo],
                        exact: &exact_all[kvh * n + lo..kvh * n + hi],
                        raw: &all[at..at + hi - lo],
                    });
                    // SAFETY: head h's distribution, written by this thread only until the
                    // barrier after the cuts.
                    let head = unsafe { &mut *heads_base.add(h) };
                    head.merge(chunk_counts, call.scale);
                    let bs = sh.bias_step[h].load(Ordering::Relaxed);
                    head.softmax(level, f32::from_bits((bs >> 32) as u32), f32::from_bits(bs as u32), call.scale, sink);
                    if a.layer_k {
                        sh.ks[h].store(head.count_top_p(a.tau), Ordering::Relaxed);
                    }
                    continue;
                }
                // SAFETY: head h's row, written by this thread only (see `Shared`).
                let p = unsafe { std::slice::from_raw_parts_mut(probs_base.add(h * n), n) };
                for (at, lo, hi) in spans(h) {
                    p[lo..hi].copy_from_slice(&all[at..at + hi - lo]);
                }
                approx::softmax(p, sink);
                s.hists[k].build(p);
                if a.layer_k {
                    sh.ks[h].store(s.top.count_with(p, &s.hists[k], a.tau), Ordering::Relaxed);
                }
            }
            let k_layer = if a.layer_k {
                sh.barrier.wait(nth)?;
                let kmax = sh.ks[..d.n_head].iter().map(|k| k.load(Ordering::Relaxed)).max().unwrap_or(0);
                Some(crate::select::layer_k(&[kmax], n))
            } else {
                None
            };
            // SAFETY: apply sized it for n_head; this thread writes its heads' cuts only.
            let cuts_base = unsafe { (*sh.cuts.get()).as_mut_ptr() };
            for (k, h) in heads.clone().enumerate() {
                let cut = if with_levels {
                    // SAFETY: written above by this thread.
                    let head = unsafe { &*heads_base.add(h) };
                    match k_layer {
                        Some(k) => head.cut_top_k(k, levels_of(h)),
                        None => head.cut_top_p(a.tau, levels_of(h)),
                    }
                } else {
                    // SAFETY: written above by this thread.
                    let p = unsafe { std::slice::from_raw_parts(probs_base.add(h * n), n) };
                    approx::cut(p, &s.hists[k], a, k_layer, &mut s.top)
                };
                // SAFETY: head h's cut, written by this thread only.
                unsafe { *cuts_base.add(h) = cut };
            }
            sh.barrier.wait(nth)?;
            // 3. the value sums by (KV head, chunk of cells), into each item's partial sums
            let value_chunks = approx::value_chunks(n);
            let value_items = d.n_head_kv * value_chunks;
            // SAFETY (the three): step 2 is over on every thread, so every cut is written, and
            // every distribution (with levels) or probability (without); from here they are
            // only read.
            let cuts = unsafe { std::slice::from_raw_parts(cuts_base as *const Cut, d.n_head) };
            let probs = if with_levels { &[][..] } else { unsafe { std::slice::from_raw_parts(probs_base as *const f32, d.n_head * n) } };
            let head_of = |h: usize| unsafe { &*heads_base.add(h) };
            // SAFETY: apply sized them for n_head * value_chunks (* dv); item i writes its own
            // g (* dv) entries only.
            let (parts_base, mass_base) = unsafe { ((*sh.parts.get()).as_mut_ptr(), (*sh.part_mass.get()).as_mut_ptr()) };
            debug_assert!(unsafe { (*sh.parts.get()).len() >= d.n_head * value_chunks * d.dv && (*sh.part_mass.get()).len() >= d.n_head * value_chunks });
            for i in value_items * ith / nth..value_items * (ith + 1) / nth {
                let (kvh, chunk) = (i / value_chunks, i % value_chunks);
                let rows = if with_levels {
                    // the chunk's probabilities from the levels, into this thread's scratch: they
                    // are read back at once, from the cache, and by this item only
                    let (from, to) = ((chunk * approx::VALUE_CHUNK).min(n), ((chunk + 1) * approx::VALUE_CHUNK).min(n));
                    let len = to - from;
                    s.chunk_probs.resize(g * len, 0.0);
                    for hg in 0..g {
                        let h = kvh * g + hg;
                        for (at, lo, hi) in spans(h) {
                            let (x0, x1) = (from.max(lo), to.min(hi));
                            if x0 < x1 {
                                let p = &mut s.chunk_probs[hg * len + x0 - from..hg * len + x1 - from];
                                head_of(h).lookup(level, &lv_all[at + x0 - lo..at + x1 - lo], x0, p);
                            }
                        }
                    }
                    approx::HeadRows { p: &s.chunk_probs, stride: len, first: from }
                } else {
                    approx::HeadRows { p: &probs[kvh * g * n..(kvh + 1) * g * n], stride: n, first: 0 }
                };
                // SAFETY: values were stored before this op and are not written during it.
                let val = |c: u32| unsafe { &layer.vals.row(c as usize)[kvh * d.dv..(kvh + 1) * d.dv] };
                // SAFETY: item i's partial sums and masses, written by this thread only.
                let (o, m) = unsafe { (std::slice::from_raw_parts_mut(parts_base.add(i * g * d.dv), g * d.dv), std::slice::from_raw_parts_mut(mass_base.add(i * g), g)) };
                approx::chunk_sums(level, rows, &cuts[kvh * g..(kvh + 1) * g], cells, chunk, val, o, m, &mut s.sel);
            }
            sh.barrier.wait(nth)?;
            // 4. each head's output from its KV head's chunks, in chunk order
            // SAFETY: step 3 is over on every thread; the partial sums are only read now.
            let (parts, masses) = unsafe { (std::slice::from_raw_parts(parts_base as *const f32, d.n_head * value_chunks * d.dv), std::slice::from_raw_parts(mass_base as *const f64, d.n_head * value_chunks)) };
            for h in heads {
                let (kvh, hg) = (h / g, h % g);
                let part = |chunk: usize| {
                    let i = kvh * value_chunks + chunk;
                    (&parts[(i * g + hg) * d.dv..(i * g + hg + 1) * d.dv], masses[i * g + hg])
                };
                approx::finish_sums((0..value_chunks).map(part), a.renorm, out.span(0, h, d.dv));
            }
            Ok(())
        })
    }

    /// The decode path of `attend` with a GPU tier: thread 0 has the GPU score and select
    /// (the logits of cells whose keys are still exact computed here and sent along), then
    /// every thread sums the values of its share of the heads.
    #[allow(clippy::too_many_arguments)]
    fn attend_gpu(&self, gpu: &crate::gpu::Tier, call: &Call, layer: &Layer, q: &dyn Input, out: &dyn Output, a: Approx, ith: usize, nth: usize) -> Result<()> {
        let d = &layer.desc;
        let g = d.n_head / d.n_head_kv;
        let (pos, _, list) = self.plan.tokens[0];
        let cells = attention::visible(&self.plan.lists[list as usize], pos, call.causal, d.window);
        let sh = &self.shared;
        if ith == 0 {
            let r = GPU_STEP.with(|s| {
                let (qbuf, over, row) = &mut *s.borrow_mut();
                qbuf.clear();
                for h in 0..d.n_head {
                    // rounded to f16 as the CPU tier's scoring has them
                    qbuf.extend(q.row(0, h)[..d.dk].iter().map(|&x| half::f16::from_f32(x).to_f32()));
                }
                over.clear();
                if layer.keys.exact_cells() > 0 {
                    row.resize(d.dk, 0.0);
                    let n = cells.len();
                    for (j, &(_, c)) in cells.iter().enumerate() {
                        if layer.keys.is_exact(c as usize) {
                            for h in 0..d.n_head {
                                // SAFETY: keys are stored before this op and not written during it.
                                unsafe { layer.keys.exact_row(c as usize, h / g) }.iter().zip(row.iter_mut()).for_each(|(k, r)| *r = k.to_f32());
                                let dot: f32 = qbuf[h * d.dk..(h + 1) * d.dk].iter().zip(row.iter()).map(|(x, y)| x * y).sum();
                                over.push(((h * n + j) as u32, call.scale.logit(dot)));
                            }
                        }
                    }
                }
                let step = crate::gpu::Step { q: qbuf, cells, overrides: over, sinks: call.sinks, scale: call.scale, tau: a.tau, layer_k: a.layer_k };
                // SAFETY: only thread 0 writes, before the barrier (see `Shared`).
                gpu.decode(self.layer_of[call.il].unwrap_or(usize::MAX), &step, unsafe { &mut *sh.selection.get() })
            });
            // SAFETY: as above.
            unsafe { *sh.gpu_error.get() = r.err() };
        }
        sh.barrier.wait(nth)?;
        // SAFETY: thread 0 wrote these before the barrier; from here they are only read.
        if let Some(e) = unsafe { &*sh.gpu_error.get() } {
            return Err(e.clone());
        }
        // SAFETY: the same.
        let sel = unsafe { &*sh.selection.get() };
        GPU_SUM.with(|s| {
            let s = &mut *s.borrow_mut();
            for h in (d.n_head * ith / nth)..(d.n_head * (ith + 1) / nth) {
                let kvh = h / g;
                // SAFETY: values were stored before this op and are not written during it.
                let val = |c: u32| unsafe { &layer.vals.row(c as usize)[kvh * d.dv..(kvh + 1) * d.dv] };
                sel.sum_head(h, cells, a.renorm, val, s, out.span(0, h, d.dv));
            }
        });
        Ok(())
    }

    /// Cells of layer `il`'s dense view for the applied ubatch (see `dense_fill`), or 0 when hc
    /// attends itself: the view serves the exact mode with `exact_attn=ggml`, on full-attention
    /// layers (a window's view would not be stock's SWA cache) and ubatches of one sequence (a
    /// stock view of several is a stream per sequence, which one dense list is not).
    pub fn dense_cells(&self, il: usize) -> usize {
        let o = &self.cfg.options;
        if !o.is_exact() || o.exact_attn != crate::options::ExactAttn::Ggml || self.plan.tokens.is_empty() || self.plan.lists.len() != 1 {
            return 0;
        }
        match self.layer(il) {
            Ok(l) if l.desc.window == Window::None && l.vals.is_allocated() => self.plan.lists[0].len(),
            _ => 0,
        }
    }

    /// Thread `ith` of `nth`'s share of layer `il`'s dense view: llama.cpp's flash attention
    /// then attends over it exactly as over a stock cache's stream, which holds one sequence's
    /// cells in position order from cell 0 (`n_kv`: that view's padded length). K and V rows of
    /// the view's cells (zero past the sequence), and the mask of the ubatch's tokens: 0 where
    /// a token sees a cell, -inf elsewhere.
    ///
    /// # Safety
    /// `k`, `v` and `mask` hold n_kv rows of n_head_kv * dk and n_head_kv * dv, and n_tokens
    /// rows of n_kv, f16s; other threads write only their own shares; the layer's keys and
    /// values were stored before this op and are not written during it.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dense_fill(
        &self,
        il: usize,
        causal: bool,
        n_tokens: usize,
        n_kv: usize,
        k: *mut half::f16,
        v: *mut half::f16,
        mask: *mut half::f16,
        ith: usize,
        nth: usize,
    ) -> Result<()> {
        let n = self.dense_cells(il);
        if n == 0 || n > n_kv || n_tokens != self.plan.tokens.len() {
            return Err(Error::Request(format!(
                "layer {il}: a dense view of {n_kv} cells for {n_tokens} tokens was asked; the applied ubatch has {} tokens and {n} dense cells",
                self.plan.tokens.len()
            )));
        }
        let layer = self.layer(il)?;
        let d = &layer.desc;
        let list = &self.plan.lists[0];
        let (rk, rv) = (d.n_head_kv * d.dk, d.n_head_kv * d.dv);
        let nth = nth.max(1);
        for j in n_kv * ith / nth..n_kv * (ith + 1) / nth {
            // SAFETY: row j of each, this thread's (caller's contract).
            let (kr, vr) = unsafe { (std::slice::from_raw_parts_mut(k.add(j * rk), rk), std::slice::from_raw_parts_mut(v.add(j * rv), rv)) };
            match list.get(j) {
                Some(&(_, c)) => {
                    for h in 0..d.n_head_kv {
                        // SAFETY: stored before this op, not written during it.
                        kr[h * d.dk..(h + 1) * d.dk].copy_from_slice(unsafe { layer.keys.exact_row(c as usize, h) });
                    }
                    // SAFETY: the same.
                    vr.copy_from_slice(unsafe { &layer.vals.row(c as usize)[..rv] });
                }
                None => {
                    kr.fill(half::f16::ZERO);
                    vr.fill(half::f16::ZERO);
                }
            }
        }
        for t in n_tokens * ith / nth..n_tokens * (ith + 1) / nth {
            let pos = self.plan.tokens[t].0;
            // SAFETY: token t's mask row, this thread's.
            let row = unsafe { std::slice::from_raw_parts_mut(mask.add(t * n_kv), n_kv) };
            for (j, m) in row.iter_mut().enumerate() {
                let seen = list.get(j).is_some_and(|&(p, _)| !causal || p <= pos);
                *m = if seen { half::f16::ZERO } else { half::f16::NEG_INFINITY };
            }
        }
        Ok(())
    }

    /// The prompt path of `attend`: runs of up to BLOCK_TOKENS consecutive tokens of one
    /// sequence list form a block; work items are (block, KV head), dealt out round-robin so
    /// that the threads share the long causal rows of the last blocks.
    fn attend_blocks(&self, call: &Call, layer: &Layer, q: &dyn Input, out: &dyn Output, ith: usize, nth: usize) {
        let d = &layer.desc;
        let g = d.n_head / d.n_head_kv;
        let mut blocks = Vec::new();
        let mut t0 = 0;
        for t in 1..=call.n_tokens {
            if t == call.n_tokens || t - t0 == BLOCK_TOKENS || self.plan.tokens[t].2 != self.plan.tokens[t0].2 {
                blocks.push((t0, t));
                t0 = t;
            }
        }
        let items = blocks.len() * d.n_head_kv;
        BLOCK.with(|s| {
            let (scratch, qbuf, ranges) = &mut *s.borrow_mut();
            for item in (ith..items).step_by(nth) {
                let ((b0, b1), kvh) = (blocks[item / d.n_head_kv], item % d.n_head_kv);
                let list = &self.plan.lists[self.plan.tokens[b0].2 as usize];
                qbuf.clear();
                ranges.clear();
                for t in b0..b1 {
                    let pos = self.plan.tokens[t].0;
                    let (lo, hi) = d.window.bounds(pos, call.causal);
                    let (a, b) = (list.partition_point(|e| e.0 < lo), list.partition_point(|e| e.0 <= hi));
                    ranges.push((a, b.max(a)));
                    for h in kvh * g..(kvh + 1) * g {
                        // f32 queries, as stock's tiled prompt kernel has them (its one-token
                        // kernel rounds them to f16, and so does the per-token path here)
                        qbuf.extend_from_slice(&q.row(t, h)[..d.dk]);
                    }
                }
                let sinks = call.sinks.map(|s| &s[kvh * g..(kvh + 1) * g]);
                let vo = kvh * d.dv;
                // SAFETY: as in the per-token path: stored before this op, not written during it.
                let key = |c: u32| unsafe { layer.keys.exact_row(c as usize, kvh) };
                let val = |c: u32| unsafe { &layer.vals.row(c as usize)[vo..vo + d.dv] };
                attention::exact_block(qbuf, g, d.dk, d.dv, list, ranges, key, val, call.scale, sinks, scratch, |i, o| {
                    out.span(b0 + i, kvh * g, g * d.dv).copy_from_slice(o)
                });
            }
        });
    }

    pub fn clear(&mut self, data: bool) {
        self.cells.clear();
        self.plan = Plan::default();
        for l in &mut self.layers {
            l.keys.forget_all();
            if data && l.vals.is_allocated() {
                l.vals.zero();
            }
        }
    }

    pub fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> Result<bool> {
        let seqs = self.cells.seq(seq)?;
        self.cells.seq_rm(seqs, p0, p1);
        Ok(true)
    }

    pub fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) -> Result<()> {
        match (self.cells.seq(src)?, self.cells.seq(dst)?) {
            (Seqs::One(a), Seqs::One(b)) => {
                self.cells.seq_cp(a, b, p0, p1);
                Ok(())
            }
            _ => Err(Error::Request(format!("seq_cp({src}, {dst}) needs two sequence ids"))),
        }
    }

    pub fn seq_keep(&mut self, seq: i32) -> Result<()> {
        match self.cells.seq(seq)? {
            Seqs::One(s) => {
                self.cells.seq_keep(s);
                Ok(())
            }
            Seqs::All => Err(Error::Request(format!("seq_keep({seq}) needs a sequence id"))),
        }
    }

    /// Position shifts would need the stored keys re-rotated; refused while can_shift is false.
    pub fn can_shift(&self) -> bool {
        false
    }

    pub fn seq_shift_refusal(&self, what: &str) -> Error {
        Error::Request(format!(
            "{what}: shifting positions would need the stored (already rotated) keys re-rotated, which this backend does not do (can_shift=false)"
        ))
    }

    pub fn seq_pos_min_max(&self, seq: i32) -> Result<(i32, i32)> {
        Ok(self.cells.pos_min_max(self.cells.seq(seq)?))
    }

    // State I/O needs the stores; see state.rs.
    pub(crate) fn parts_mut(&mut self) -> (&Config, &mut Cells, Vec<(&LayerDesc, &mut KeyStore, &mut Rows)>) {
        self.sweep();
        self.plan = Plan::default();
        let layers = self.layers.iter_mut().map(|l| (&l.desc, &mut l.keys, &mut l.vals)).collect();
        (&self.cfg, &mut self.cells, layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(opts: &str) -> Config {
        let layer = LayerDesc { il: 0, n_head: 4, n_head_kv: 2, dk: 64, dv: 64, window: Window::None };
        Config {
            arch: "test".into(),
            n_ctx: 1024,
            n_ctx_seq: 1024,
            n_seq_max: 1,
            n_ubatch: 32,
            kv_unified: false,
            no_alloc: false,
            model_path: None,
            layers: vec![layer],
            options: Options::parse(opts).unwrap(),
        }
    }

    #[test]
    fn model_scope_codebook_is_shared_and_counted_once() {
        use crate::calibration::{CodebookFile, Identity, Settings};
        use crate::options::Scope;
        let dir = std::env::temp_dir().join(format!("hcattn-be-cb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("model.bin");
        std::fs::write(&model, b"not really a model").unwrap();
        let mut cfg = config("");
        cfg.layers.push(LayerDesc { il: 3, ..cfg.layers[0].clone() });
        cfg.model_path = Some(model.to_string_lossy().into_owned());
        let book = crate::codebook::Codebook::new(2, (0..32).map(|i| i as f32).collect()).unwrap();
        let file = CodebookFile {
            identity: Identity::of(&cfg).unwrap(),
            settings: Settings { pq_dim: 2, centroids: 16, scope: Scope::Model, seed: 0 },
            model_sha256: String::new(),
            text: String::new(),
            text_sha256: String::new(),
            tokens: 0,
            books: vec![vec![std::sync::Arc::new(book.clone())]],
        };
        let path = dir.join("cb.gguf");
        file.save(&path).unwrap();
        cfg.options = Options::parse(&format!("codebook={}", path.display())).unwrap();
        let be = Backend::new(cfg.clone()).unwrap();
        let (a, b) = (&be.layers[0].keys.codebooks()[0], &be.layers[1].keys.codebooks()[0]);
        assert!(std::sync::Arc::ptr_eq(a, b), "one book for both layers");
        assert_eq!(be.usage().codebooks, book.bytes());
        // the model file changes: refused
        std::fs::write(&model, b"another model entirely").unwrap();
        let e = Backend::new(cfg).err().unwrap().to_string();
        assert!(e.contains("fingerprint"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn usage_reports_the_fast_tier_share_of_the_f16_cache() {
        let stock = 1024 * 2 * (64 + 64) * 2;
        let u = Backend::new(config("")).unwrap().usage();
        assert_eq!((u.fast * 2, u.host, u.codebooks), (stock, stock, 0));
        for (preset, share) in [("cpu25", 4), ("cpu12.5", 8)] {
            // codes only: no exact rows are held before the first ubatch
            let u = Backend::new(config(&format!("preset={preset}"))).unwrap().usage();
            assert_eq!(u.fast * share, stock, "{preset}");
            assert_eq!(u.host, u.fast + stock / 2, "{preset}: values stay f16 in the host tier");
        }
    }

    /// Keys and values of a ubatch, as the store op sees them.
    struct Rowz(Vec<f32>, usize, usize);
    impl Input for Rowz {
        fn row(&self, t: usize, h: usize) -> &[f32] {
            let (heads, d) = (self.1, self.2);
            &self.0[(t * heads + h) * d..(t * heads + h + 1) * d]
        }
    }

    fn feed(be: &mut Backend, from: i32, n: usize) {
        let toks: Vec<Token> = (0..n).map(|i| Token { pos: from + i as i32, seq0: 0, seqs: SeqSet::one(0) }).collect();
        be.apply(&toks).unwrap();
        let data: Vec<f32> = (0..n * 2 * 64).map(|i| ((i * 7919 + from as usize * 31) % 1000) as f32 / 500.0 - 1.0).collect();
        let kv = Rowz(data, 2, 64);
        let call = Call {
            il: 0,
            n_tokens: n,
            causal: true,
            scale: Scale { kq_scale: 0.125, softcap: 0.0 },
            q: None,
            k: &kv,
            v: &kv,
            sinks: None,
            out: None,
        };
        be.store(&call, 0, 1).unwrap();
    }

    #[test]
    fn prefill_exact_encodes_only_when_generation_starts() {
        let opts = "keys=pq,pq_dim=2,pq_centroids=16,fit_tokens=16";
        let mut be = Backend::new(config(&format!("{opts},prefill=exact"))).unwrap();
        feed(&mut be, 0, 20);
        feed(&mut be, 20, 20);
        assert!(be.layers[0].keys.codebooks().is_empty(), "no fit while the prompt is processed");
        assert_eq!(be.layers[0].keys.exact_cells(), 40);
        feed(&mut be, 40, 1);
        assert_eq!(be.layers[0].keys.codebooks().len(), 1, "fitted on the whole prompt");
        assert_eq!(be.layers[0].keys.exact_cells(), 1, "only the new token is exact");

        // a longer prompt: its exact rows are given back once it is encoded, the peak is kept
        let mut be = Backend::new(config(&format!("{opts},prefill=exact"))).unwrap();
        feed(&mut be, 0, 300);
        feed(&mut be, 300, 1);
        let row = 2 * 64 * 2;
        assert!(be.layers[0].keys.peak_exact_bytes() >= 300 * row, "the prompt's peak is remembered");
        let u = be.usage();
        let codes = 1024 * 2 * 64 / 2 / 2; // 4-bit codes of 2 dims
        assert!(u.fast - u.codebooks - codes <= 66 * row, "exact rows left: {}", (u.fast - u.codebooks - codes) / row);

        let mut be = Backend::new(config(&format!("{opts},prefill=coded"))).unwrap();
        feed(&mut be, 0, 20);
        feed(&mut be, 20, 20);
        assert_eq!(be.layers[0].keys.codebooks().len(), 1, "fitted after the first ubatch");
        assert_eq!(be.layers[0].keys.exact_cells(), 20, "only the newest ubatch is exact");
    }

    #[test]
    fn anchor_prefill_sees_the_anchors_and_its_own_ubatch() {
        let opts = "keys=pq,pq_dim=2,pq_centroids=16,fit_tokens=16,prefill=anchor:8";
        let mut be = Backend::new(config(opts)).unwrap();
        feed(&mut be, 0, 20);
        assert_eq!(be.plan.lists[0].len(), 20, "the first ubatch sees itself");
        feed(&mut be, 20, 20);
        let seen: Vec<i32> = be.plan.lists[0].iter().map(|e| e.0).collect();
        let want: Vec<i32> = (0..8).chain(20..40).collect();
        assert_eq!(seen, want, "anchors 0..8, then the ubatch");
        // anchors stay exact through the prompt, the rest is coded after its ubatch
        assert_eq!(be.layers[0].keys.exact_cells(), 8 + 20);
        feed(&mut be, 40, 1);
        assert_eq!(be.plan.lists[0].len(), 41, "a generation step sees every token");
        assert_eq!(be.layers[0].keys.exact_cells(), 1, "anchors are coded once generation starts");
    }

    #[test]
    fn values_in_a_file_are_counted_as_the_file_tier() {
        let dir = std::env::temp_dir().join(format!("hcattn-be-vals-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let host = Backend::new(config("")).unwrap().usage();
        let be = Backend::new(config(&format!("values=file:{}", dir.display()))).unwrap();
        let u = be.usage();
        assert_eq!((u.file, u.host, u.fast), (host.host - host.fast, host.fast, host.fast));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no file is visible");
        drop(be);
        let e = Backend::new(config("values=file:/nonexistent/hc")).err().unwrap().to_string();
        assert!(e.contains("/nonexistent/hc") && e.contains("no such folder"), "{e}");
        let e = Backend::new(config("values=file:/proc")).err().unwrap().to_string();
        assert!(e.contains("cannot create a file there"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn layers_must_have_a_valid_head_shape() {
        let mut c = config("");
        c.layers[0].n_head = 3;
        assert!(Backend::new(c).err().unwrap().to_string().contains("unsupported head shape"));
        let c = config("keys=pq,pq_dim=8,int_group=24");
        assert!(Backend::new(c).is_ok());
        let c = config("keys=int8,int_group=24");
        assert!(Backend::new(c).err().unwrap().to_string().contains("int_group=24"));
    }

    #[test]
    fn a_cache_larger_than_memory_is_an_error_not_an_abort() {
        for opts in ["keys=f16", "preset=cpu12.5", "keys=int4"] {
            let mut cfg = config(opts);
            cfg.n_ctx = 1 << 38;
            cfg.n_ctx_seq = cfg.n_ctx;
            let e = Backend::new(cfg).err().expect("2^38 cells cannot be allocated").to_string();
            assert!(e.contains("cannot allocate") && e.contains("MiB for"), "{opts}: {e}");
        }
    }

    /// Fuzzing the state reader: every truncation, thousands of bit flips and byte
    /// overwrites, and foreign blobs give a clean error or a valid state, never a panic; after
    /// an error the backend is empty and still works.
    #[test]
    fn state_reader_survives_truncation_bit_flips_and_garbage() {
        for opts in ["keys=f16", "keys=pq,pq_dim=1,pq_centroids=16,fit_tokens=16,recent=4", "keys=int4,tau=0.9"] {
            let mut be = Backend::new(config(opts)).unwrap();
            feed(&mut be, 0, 40);
            feed(&mut be, 40, 1);
            let mut blob = Vec::new();
            crate::state::write(&mut be, -1, &mut |b| blob.extend_from_slice(b)).unwrap();
            let mut target = Backend::new(config(opts)).unwrap();
            let load = |bytes: &[u8], target: &mut Backend| {
                let mut at = 0;
                let r = crate::state::read(target, -1, &mut |buf: &mut [u8]| {
                    if at + buf.len() > bytes.len() {
                        return false;
                    }
                    buf.copy_from_slice(&bytes[at..at + buf.len()]);
                    at += buf.len();
                    true
                });
                if r.is_err() {
                    assert_eq!(target.cells().n_free(), target.cfg.n_ctx, "{opts}: a failed read leaves the cache empty");
                }
                // whatever happened, the backend takes new tokens
                target.clear(true);
                feed(target, 0, 2);
                target.clear(true);
                r
            };
            load(&blob, &mut target).unwrap_or_else(|e| panic!("{opts}: the intact blob: {e}"));
            // every truncation
            let step = (blob.len() / 3000).max(1);
            for len in (0..blob.len()).step_by(step) {
                assert!(load(&blob[..len], &mut target).is_err(), "{opts}: truncated to {len} of {} bytes", blob.len());
            }
            // bit flips and random bytes anywhere, more of them in the header and cell table
            let mut seed = 0x5851_f42d_4c95_7f2du64;
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for k in 0..3000 {
                let mut b = blob.clone();
                let span = if k % 2 == 0 { blob.len().min(600) } else { blob.len() };
                for _ in 0..1 + k % 3 {
                    let at = (next() as usize) % span;
                    if k % 5 == 0 {
                        b[at] = next() as u8;
                    } else {
                        b[at] ^= 1 << (next() % 8);
                    }
                }
                let _ = load(&b, &mut target);
            }
            // foreign blobs: another format, empty, random
            let random: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
            for junk in [&b"GGUF\x03\0\0\0"[..], &[][..], &random[..], &blob[4..]] {
                assert!(load(junk, &mut target).is_err(), "{opts}");
            }
        }
    }
}
