//! The GPU tier on CUDA, through cudarc: the driver and NVRTC are loaded when a tier opens
//! (`dynamic-loading`), so a build needs no CUDA and a machine without it falls back.
//!
//! Every launch goes to the tier's own stream. A decode step is: upload the queries, build the
//! tables, score, write the exact cells' logits, softmax, cut (twice with one k per layer),
//! compact; then two downloads (the cuts, then the packed selections) and one synchronisation.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use super::layout::Layout;
use super::select::{Cut, Selection};
use super::{LayerShape, Step, KERNELS};
use crate::error::{Error, Result};
use crate::keys::KeyStore;

type Fallible<T> = std::result::Result<T, String>;

fn driver(what: &str) -> impl Fn(DriverError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

struct Funcs {
    pack: CudaFunction,
    encode: CudaFunction,
    tables: CudaFunction,
    score: CudaFunction,
    overwrite: CudaFunction,
    softmax: CudaFunction,
    cut: CudaFunction,
    layer_k: CudaFunction,
    compact: CudaFunction,
}

struct LayerBuf {
    shape: LayerShape,
    codes: CudaSlice<u8>,
    books: Option<CudaSlice<f32>>,
    /// which host codebook was uploaded (its address), so that a refit is uploaded again
    books_from: usize,
}

/// Decode scratch, sized for the whole context at open.
struct Scratch {
    q: CudaSlice<f32>,
    tables: CudaSlice<f32>,
    cells: CudaSlice<u32>,
    logits: CudaSlice<f32>,
    sinks: CudaSlice<f32>,
    over_at: CudaSlice<u32>,
    over_val: CudaSlice<f32>,
    cut: CudaSlice<u32>,
    mass: CudaSlice<f64>,
    k: CudaSlice<u32>,
    sel: CudaSlice<u32>,
    sel_p: CudaSlice<f32>,
    host_cut: Vec<u32>,
    host_mass: Vec<f64>,
    at: Vec<u32>,
    val: Vec<f32>,
    ids: Vec<u32>,
}

pub struct Tier {
    stream: Arc<CudaStream>,
    f: Funcs,
    layers: Vec<Option<LayerBuf>>,
    scratch: Mutex<Scratch>,
    name: String,
    bytes: usize,
}

/// NVRTC's name for a compute capability it can target (None: its default).
fn arch(cc: (i32, i32)) -> Option<&'static str> {
    Some(match cc {
        (7, 0) => "compute_70",
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        _ => return None,
    })
}

fn grid(n: usize, block: u32) -> u32 {
    (n.div_ceil(block as usize)).max(1) as u32
}

fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// Threads of the one-block-per-head kernels (SELECT_THREADS in hc.cu).
const SELECT_THREADS: u32 = 1024;

/// Exact logits the scratch holds at first.
const EXACT_LOGITS: usize = 4096;

/// A null device pointer, for the kernels' optional arguments.
const NULL: u64 = 0;

struct Opened {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    f: Funcs,
    name: String,
}

/// The context, stream and compiled kernels of device `ordinal`, or why not.
fn start(ordinal: usize) -> Fallible<Opened> {
    // SAFETY: these only try to load the libraries by name.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so) was found".into());
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC (libnvrtc.so) was not found; add the CUDA toolkit's lib64 to LD_LIBRARY_PATH".into());
    }
    let count = CudaContext::device_count().map_err(driver("counting CUDA devices"))?;
    if ordinal >= count.max(0) as usize {
        return Err(format!("there is no CUDA device {ordinal} ({count} found)"));
    }
    let ctx = CudaContext::new(ordinal).map_err(driver("creating the CUDA context"))?;
    let name = ctx.name().unwrap_or_else(|_| "?".into());
    let cc = ctx.compute_capability().map_err(driver("reading the compute capability"))?;
    let stream = ctx.new_stream().map_err(driver("creating the stream"))?;
    let opts = CompileOptions { arch: arch(cc), ..Default::default() };
    let ptx = compile_ptx_with_opts(KERNELS, opts).map_err(|e| format!("NVRTC could not compile kernels/hc.cu: {e}"))?;
    let module = ctx.load_module(ptx).map_err(driver("loading the kernels"))?;
    let load = |n: &str| module.load_function(n).map_err(|e| format!("kernel {n}: {e}"));
    let f = Funcs {
        pack: load("hc_pack")?,
        encode: load("hc_encode")?,
        tables: load("hc_tables")?,
        score: load("hc_score")?,
        overwrite: load("hc_override")?,
        softmax: load("hc_softmax")?,
        cut: load("hc_cut")?,
        layer_k: load("hc_layer_k")?,
        compact: load("hc_compact")?,
    };
    Ok(Opened { ctx, stream, f, name: format!("cuda:{ordinal} ({name}, compute {}.{})", cc.0, cc.1) })
}

/// Catches a panic of the dynamically loaded CUDA layer (a symbol the driver lacks, say) and
/// turns it into a reason.
fn guarded<T>(what: &str, f: impl FnOnce() -> Fallible<T>) -> Fallible<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            Err(format!("{what}: the CUDA layer failed: {msg}"))
        }
    }
}

fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl Tier {
    /// Ok(Ok(tier)); Ok(Err(why)) when there is no usable GPU (the caller falls back); Err when
    /// the GPU is there but the tier does not fit in its memory.
    pub fn open(ordinal: usize, shapes: &[Option<LayerShape>]) -> Result<Fallible<Tier>> {
        let o = match guarded("opening the GPU", || start(ordinal)) {
            Ok(o) => o,
            Err(why) => return Ok(Err(why)),
        };
        let n_cells = shapes.iter().flatten().map(|s| s.layout.n_cells).max().unwrap_or(0);
        let n_head = shapes.iter().flatten().map(|s| s.n_head).max().unwrap_or(0);
        let dk = shapes.iter().flatten().map(|s| s.dk).max().unwrap_or(0);
        let table = shapes.iter().flatten().map(|s| s.n_head * s.layout.per_head * s.centroids).max().unwrap_or(0);
        let codes: usize = shapes.iter().flatten().map(|s| s.layout.bytes()).sum();
        let books: usize = shapes.iter().flatten().map(|s| s.books * s.centroids * s.pq_dim * 4).sum();
        // logits, selections and their probabilities for every head and cell; tables; cells;
        // exact logits; queries, sinks, cuts
        let scratch = n_head * n_cells * 12 + table * 4 + n_cells * 4 + EXACT_LOGITS * 8 + n_head * (dk + 32);
        let need = codes + books + scratch;
        let (free, _) = o.ctx.mem_get_info().map_err(|e| Error::Config(format!("GPU {}: {e}", o.name)))?;
        if need > free {
            return Err(Error::Config(format!(
                "the GPU tier needs {:.1} MiB on {} (codes {:.1}, codebooks {:.1}, decode scratch {:.1}) and {:.1} MiB are free: \
                 use a smaller context or preset, or device=cpu",
                mib(need),
                o.name,
                mib(codes),
                mib(books),
                mib(scratch),
                mib(free)
            )));
        }
        let alloc_err = |what: &str| {
            let name = o.name.clone();
            let what = what.to_string();
            move |e: DriverError| Error::Config(format!("GPU {name}: cannot allocate {what}: {e}"))
        };
        let s = &o.stream;
        let mut layers = Vec::with_capacity(shapes.len());
        for sh in shapes {
            layers.push(match sh {
                Some(sh) => Some(LayerBuf { shape: *sh, codes: s.alloc_zeros::<u8>(sh.layout.bytes().max(1)).map_err(alloc_err("key codes"))?, books: None, books_from: 0 }),
                None => None,
            });
        }
        let a = |n: usize| n.max(1);
        let scratch_bufs = Scratch {
            q: s.alloc_zeros(a(n_head * dk)).map_err(alloc_err("queries"))?,
            tables: s.alloc_zeros(a(table)).map_err(alloc_err("query tables"))?,
            cells: s.alloc_zeros(a(n_cells)).map_err(alloc_err("cell lists"))?,
            logits: s.alloc_zeros(a(n_head * n_cells)).map_err(alloc_err("logits"))?,
            sinks: s.alloc_zeros(a(n_head)).map_err(alloc_err("sinks"))?,
            // exact keys are few in decode (sink, recent); grown when a step has more
            over_at: s.alloc_zeros(EXACT_LOGITS).map_err(alloc_err("exact logits"))?,
            over_val: s.alloc_zeros(EXACT_LOGITS).map_err(alloc_err("exact logits"))?,
            cut: s.alloc_zeros(a(4 * n_head)).map_err(alloc_err("cuts"))?,
            mass: s.alloc_zeros(a(n_head)).map_err(alloc_err("masses"))?,
            k: s.alloc_zeros(1).map_err(alloc_err("k"))?,
            sel: s.alloc_zeros(a(n_head * n_cells)).map_err(alloc_err("selections"))?,
            sel_p: s.alloc_zeros(a(n_head * n_cells)).map_err(alloc_err("selections"))?,
            host_cut: Vec::new(),
            host_mass: Vec::new(),
            at: Vec::new(),
            val: Vec::new(),
            ids: Vec::new(),
        };
        let bytes = need;
        Ok(Ok(Tier { stream: o.stream, f: o.f, layers, scratch: Mutex::new(scratch_bufs), name: o.name, bytes }))
    }

    pub fn describe(&self) -> String {
        format!("{}: {:.1} MiB of device memory", self.name, mib(self.bytes))
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn ready(&self, layer: usize) -> bool {
        self.layers.get(layer).and_then(|l| l.as_ref()).is_some_and(|l| l.books.is_some())
    }

    pub fn sync_layer(&mut self, layer: usize, keys: &mut KeyStore) -> Fallible<()> {
        let Some(Some(lb)) = self.layers.get_mut(layer) else {
            keys.take_fresh();
            return Ok(());
        };
        let s = &self.stream;
        let sh = lb.shape;
        let books = keys.codebooks();
        if let Some(first) = books.first() {
            let from = Arc::as_ptr(first) as usize;
            if from != lb.books_from {
                if books.len() != sh.books || books.iter().any(|b| b.len() != sh.centroids || b.dim() != sh.pq_dim) {
                    return Err(format!("the codebooks ({} of {} x {}) do not match the tier's shape", books.len(), books[0].len(), books[0].dim()));
                }
                let flat: Vec<f32> = books.iter().flat_map(|b| b.centroids().iter().copied()).collect();
                lb.books = Some(s.clone_htod(&flat).map_err(driver("uploading the codebooks"))?);
                lb.books_from = from;
            }
        }
        let mut fresh = keys.take_fresh();
        if fresh.is_empty() {
            return Ok(());
        }
        fresh.sort_unstable();
        fresh.dedup();
        let l = sh.layout;
        let per = l.n_kvh * l.per_head;
        // in chunks, so that a whole prompt's codes need no large staging buffer
        let mut staged: Vec<u16> = Vec::new();
        // the device copies live until the stream is done with them (below)
        let mut in_flight = Vec::new();
        for cells in fresh.chunks(1 << 16) {
            staged.clear();
            for &c in cells {
                keys.code_row(c as usize, &mut staged);
            }
            if staged.len() != cells.len() * per {
                return Err("the host store returned no codes to copy".into());
            }
            let staged_dev = s.clone_htod(&staged).map_err(driver("uploading codes"))?;
            let cells_dev = s.clone_htod(cells).map_err(driver("uploading cell ids"))?;
            let (bits, n_cells, n_kvh, per_head, m) = (l.bits as i32, l.n_cells as u32, l.n_kvh as u32, l.per_head as u32, cells.len() as u32);
            let threads = cells.len() * l.n_kvh * l.rows();
            let mut b = s.launch_builder(&self.f.pack);
            b.arg(&mut lb.codes).arg(&bits).arg(&n_cells).arg(&n_kvh).arg(&per_head).arg(&staged_dev).arg(&cells_dev).arg(&m);
            // SAFETY: the arguments match hc_pack's parameters in order and type; the buffers
            // hold what the layout says (codes: l.bytes(); staged: m * per; cells: m).
            unsafe { b.launch(cfg((grid(threads, 256), 1, 1), 256)) }.map_err(driver("hc_pack"))?;
            in_flight.push((staged_dev, cells_dev));
        }
        s.synchronize().map_err(driver("copying codes"))?;
        drop(in_flight);
        Ok(())
    }

    pub fn decode(&self, layer: usize, step: &Step, out: &mut Selection) -> Fallible<()> {
        let Some(Some(lb)) = self.layers.get(layer) else { return Err("this layer has no GPU tier".into()) };
        let Some(books) = &lb.books else { return Err("the codebooks are not on the GPU yet".into()) };
        let sh = lb.shape;
        let l = sh.layout;
        let n = step.cells.len();
        let (nh, dk) = (sh.n_head, sh.dk);
        let g = nh / l.n_kvh;
        if n == 0 || n > l.n_cells || step.q.len() < nh * dk {
            return Err(format!("bad step: {n} cells of {}, {} query values", l.n_cells, step.q.len()));
        }
        let s = &self.stream;
        let mut guard = self.scratch.lock().map_err(|_| "a previous decode failed midway".to_string())?;
        let sc = &mut *guard;
        s.memcpy_htod(&step.q[..nh * dk], &mut sc.q.slice_mut(0..nh * dk)).map_err(driver("uploading queries"))?;
        let (dk32, dim, nb, c) = (dk as u32, sh.pq_dim as u32, sh.books as u32, sh.centroids as u32);
        {
            let mut b = s.launch_builder(&self.f.tables);
            b.arg(&sc.q).arg(&dk32).arg(&dim).arg(books).arg(&nb).arg(&c).arg(&mut sc.tables);
            // SAFETY: hc_tables(q, dk, dim, books, n_books, centroids, tables); tables holds
            // n_head * per_head * centroids (sized at open for the largest layer).
            unsafe { b.launch(cfg((grid(sh.centroids, 256), l.per_head as u32, nh as u32), 256)) }.map_err(driver("hc_tables"))?;
        }
        // one sequence's cells in order need no list on the GPU
        let base = step.cells[0].1;
        let contiguous = step.cells.iter().enumerate().all(|(j, e)| e.1 == base + j as u32);
        if !contiguous {
            sc.ids.clear();
            sc.ids.extend(step.cells.iter().map(|e| e.1));
            s.memcpy_htod(&sc.ids, &mut sc.cells.slice_mut(0..n)).map_err(driver("uploading the visible cells"))?;
        }
        {
            let (bits, n_cells, per_head, g32, n32) = (l.bits as i32, l.n_cells as u32, l.per_head as u32, g as u32, n as u32);
            let (kq, cap) = (step.scale.kq_scale, step.scale.softcap);
            let mut b = s.launch_builder(&self.f.score);
            b.arg(&lb.codes).arg(&bits).arg(&n_cells).arg(&per_head).arg(&c).arg(&g32).arg(&sc.tables);
            if contiguous {
                b.arg(&NULL);
            } else {
                b.arg(&sc.cells);
            }
            b.arg(&base).arg(&n32).arg(&kq).arg(&cap).arg(&mut sc.logits);
            // SAFETY: hc_score(codes, bits, n_cells, per_head, centroids, g, tables, cells,
            // base, n, kq_scale, softcap, logits); logits holds n_head * n_cells.
            unsafe { b.launch(cfg((grid(n, 256), l.n_kvh as u32, g.div_ceil(8) as u32), 256)) }.map_err(driver("hc_score"))?;
        }
        if !step.overrides.is_empty() {
            let m = step.overrides.len();
            if m > nh * n {
                return Err("more exact logits than logits".into());
            }
            sc.at.clear();
            sc.val.clear();
            for &(at, v) in step.overrides {
                if at as usize >= nh * n {
                    return Err(format!("exact logit at {at}, outside {nh} x {n}"));
                }
                sc.at.push(at);
                sc.val.push(v);
            }
            if sc.over_at.len() < m {
                let cap = m.next_power_of_two();
                sc.over_at = s.alloc_zeros(cap).map_err(driver("growing the exact-logit buffer"))?;
                sc.over_val = s.alloc_zeros(cap).map_err(driver("growing the exact-logit buffer"))?;
            }
            s.memcpy_htod(&sc.at, &mut sc.over_at.slice_mut(0..m)).map_err(driver("uploading exact logits"))?;
            s.memcpy_htod(&sc.val, &mut sc.over_val.slice_mut(0..m)).map_err(driver("uploading exact logits"))?;
            let m32 = m as u32;
            let mut b = s.launch_builder(&self.f.overwrite);
            b.arg(&mut sc.logits).arg(&sc.over_at).arg(&sc.over_val).arg(&m32);
            // SAFETY: hc_override(logits, at, val, m); every at < n_head * n (checked above).
            unsafe { b.launch(cfg((grid(m, 256), 1, 1), 256)) }.map_err(driver("hc_override"))?;
        }
        let n32 = n as u32;
        {
            if let Some(sk) = step.sinks {
                if sk.len() < nh {
                    return Err("fewer sinks than heads".into());
                }
                s.memcpy_htod(&sk[..nh], &mut sc.sinks.slice_mut(0..nh)).map_err(driver("uploading sinks"))?;
            }
            let mut b = s.launch_builder(&self.f.softmax);
            b.arg(&mut sc.logits).arg(&n32);
            if step.sinks.is_some() {
                b.arg(&sc.sinks);
            } else {
                b.arg(&NULL);
            }
            // SAFETY: hc_softmax(logits, n, sinks): one block per head over n logits.
            unsafe { b.launch(cfg((nh as u32, 1, 1), SELECT_THREADS)) }.map_err(driver("hc_softmax"))?;
        }
        self.select(sc, n, nh, step.tau, step.layer_k, out)
    }

    /// Cut, compact and download the selections of `nh` heads whose n probabilities are in
    /// the scratch's logits buffer.
    fn select(&self, sc: &mut Scratch, n: usize, nh: usize, tau: f32, layer_k: bool, out: &mut Selection) -> Fallible<()> {
        let s = &self.stream;
        let n32 = n as u32;
        let cut = |with_k: bool, sc: &mut Scratch| -> Fallible<()> {
            let mut b = s.launch_builder(&self.f.cut);
            b.arg(&sc.logits).arg(&n32).arg(&tau);
            if with_k {
                b.arg(&sc.k);
            } else {
                b.arg(&NULL);
            }
            b.arg(&mut sc.cut).arg(&mut sc.mass);
            // SAFETY: hc_cut(probs, n, tau, k_in, cut, mass): cut holds 4 words a head, mass one.
            unsafe { b.launch(cfg((nh as u32, 1, 1), SELECT_THREADS)) }.map_err(driver("hc_cut"))?;
            Ok(())
        };
        cut(false, sc)?;
        if layer_k {
            let nh32 = nh as u32;
            let mut b = s.launch_builder(&self.f.layer_k);
            b.arg(&sc.cut).arg(&nh32).arg(&n32).arg(&mut sc.k);
            // SAFETY: hc_layer_k(cut, n_head, n, k_out): one thread.
            unsafe { b.launch(cfg((1, 1, 1), 1)) }.map_err(driver("hc_layer_k"))?;
            cut(true, sc)?;
        }
        {
            let mut b = s.launch_builder(&self.f.compact);
            b.arg(&sc.logits).arg(&n32).arg(&sc.cut).arg(&mut sc.sel).arg(&mut sc.sel_p);
            // SAFETY: hc_compact(probs, n, cut, sel, sel_p): at most n_head * n entries.
            unsafe { b.launch(cfg((nh as u32, 1, 1), SELECT_THREADS)) }.map_err(driver("hc_compact"))?;
        }
        sc.host_cut.resize(4 * nh, 0);
        sc.host_mass.resize(nh, 0.0);
        s.memcpy_dtoh(&sc.cut.slice(0..4 * nh), &mut sc.host_cut[..]).map_err(driver("downloading cuts"))?;
        s.memcpy_dtoh(&sc.mass.slice(0..nh), &mut sc.host_mass[..]).map_err(driver("downloading masses"))?;
        s.synchronize().map_err(driver("decode step"))?;
        out.cuts.clear();
        for h in 0..nh {
            let w = &sc.host_cut[4 * h..4 * h + 4];
            out.cuts.push(Cut { bits: w[0], above: w[1], ties: w[2], k: w[3], mass: sc.host_mass[h] });
        }
        let total: usize = out.cuts.iter().map(|c| c.k as usize).sum();
        if total > nh * n {
            return Err(format!("the GPU selected {total} tokens of {}", nh * n));
        }
        out.sel.resize(total, 0);
        out.p.resize(total, 0.0);
        if total > 0 {
            s.memcpy_dtoh(&sc.sel.slice(0..total), &mut out.sel[..]).map_err(driver("downloading selections"))?;
            s.memcpy_dtoh(&sc.sel_p.slice(0..total), &mut out.p[..]).map_err(driver("downloading selections"))?;
            s.synchronize().map_err(driver("decode step"))?;
        }
        out.check(n)
    }
}

/// Runs every kernel on generated inputs and compares with the host references; returns one
/// line per check, or the first failure.
pub fn self_check(ordinal: usize) -> Fallible<Vec<String>> {
    guarded("the GPU check", || check_kernels(ordinal))
}

fn check_kernels(ordinal: usize) -> Fallible<Vec<String>> {
    use crate::codebook::Codebook;
    let o = start(ordinal)?;
    let s = &o.stream;
    let mut report = vec![format!("device {}", o.name)];
    let mut seed = 0x5eed_u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    // 1. packing, every code width
    for (centroids, per_head) in [(16usize, 64usize), (16, 7), (256, 32), (8192, 16)] {
        let l = Layout::new(centroids, 1000, 3, per_head);
        let cells: Vec<u32> = (0..1000u32).filter(|c| c % 3 != 1).collect();
        let staged: Vec<u16> = (0..cells.len() * 3 * per_head).map(|i| ((i * 7919 + 11) % centroids) as u16).collect();
        let mut want = vec![0u8; l.bytes()];
        l.pack(&mut want, &staged, &cells);
        let mut dev = s.alloc_zeros::<u8>(l.bytes()).map_err(driver("alloc"))?;
        let (sd, cd) = (s.clone_htod(&staged).map_err(driver("upload"))?, s.clone_htod(&cells).map_err(driver("upload"))?);
        let (bits, nc, nk, ph, m) = (l.bits as i32, 1000u32, 3u32, per_head as u32, cells.len() as u32);
        let mut b = s.launch_builder(&o.f.pack);
        b.arg(&mut dev).arg(&bits).arg(&nc).arg(&nk).arg(&ph).arg(&sd).arg(&cd).arg(&m);
        // SAFETY: as in Tier::sync_layer.
        unsafe { b.launch(cfg((grid(cells.len() * 3 * l.rows(), 256), 1, 1), 256)) }.map_err(driver("hc_pack"))?;
        let got = s.clone_dtoh(&dev).map_err(driver("download"))?;
        if got != want {
            return Err(format!("hc_pack differs from Layout::pack for {centroids} centroids, {per_head} positions"));
        }
        report.push(format!("hc_pack: {}-bit codes equal the host layout", l.bits));
    }
    // 2. encoding: nearest centroid, or a centroid as near within f32 rounding
    for (dim, centroids) in [(1usize, 16usize), (2, 8192), (4, 256)] {
        let book = Codebook::new(dim, (0..centroids * dim).map(|_| rnd()).collect()).map_err(|e| e.to_string())?;
        let (m, n_sub, per_head) = (64usize, 3 * 64 / dim, 64 / dim);
        let keys: Vec<f32> = (0..m * n_sub * dim).map(|_| rnd()).collect();
        let (kd, bd) = (s.clone_htod(&keys).map_err(driver("upload"))?, s.clone_htod(book.centroids()).map_err(driver("upload"))?);
        let mut od = s.alloc_zeros::<u16>(m * n_sub).map_err(driver("alloc"))?;
        let (m32, ns, ph, d32, one, c32) = (m as u32, n_sub as u32, per_head as u32, dim as u32, 1u32, centroids as u32);
        let mut b = s.launch_builder(&o.f.encode);
        b.arg(&kd).arg(&m32).arg(&ns).arg(&ph).arg(&d32).arg(&bd).arg(&one).arg(&c32).arg(&mut od);
        // SAFETY: hc_encode(keys, m, n_sub, per_head, dim, books, n_books, centroids, out).
        unsafe { b.launch(cfg((grid(m * n_sub * 32, 256), 1, 1), 256)) }.map_err(driver("hc_encode"))?;
        let got = s.clone_dtoh(&od).map_err(driver("download"))?;
        let dist = |x: &[f32], c: usize| -> f32 { x.iter().zip(&book.centroids()[c * dim..(c + 1) * dim]).map(|(a, b)| (a - b) * (a - b)).sum() };
        let mut differ = 0;
        for (i, x) in keys.chunks_exact(dim).enumerate() {
            let want = book.nearest(x) as usize;
            if got[i] as usize != want {
                differ += 1;
                if (dist(x, got[i] as usize) - dist(x, want)).abs() > 1e-5 {
                    return Err(format!("hc_encode: sub-vector {i} coded {} instead of {want}, which is nearer", got[i]));
                }
            }
        }
        report.push(format!("hc_encode: {dim}-dim, {centroids} centroids: {} of {} codes equal the host's, the rest equally near", m * n_sub - differ, m * n_sub));
    }
    // 3. a whole decode step against the host: tables, scores, softmax, selection
    for (dim, centroids, books_n, layer) in [(1usize, 16usize, 64usize, false), (2, 8192, 1, true), (4, 256, 1, false)] {
        let (n_cells, n_kvh, g, dk) = (5000usize, 3usize, 3usize, 64usize);
        let nh = n_kvh * g;
        let per_head = dk / dim;
        let shape = LayerShape { layout: Layout::new(centroids, n_cells, n_kvh, per_head), dk, pq_dim: dim, centroids, books: books_n, n_head: nh };
        let mut tier = Tier::open(ordinal, &[Some(shape)]).map_err(|e| e.to_string())??;
        let books: Vec<Codebook> = (0..books_n).map(|_| Codebook::new(dim, (0..centroids * dim).map(|_| rnd()).collect()).unwrap()).collect();
        let flat: Vec<f32> = books.iter().flat_map(|b| b.centroids().iter().copied()).collect();
        let codes: Vec<u16> = (0..n_cells * n_kvh * per_head).map(|_| ((rnd() + 0.5) * centroids as f32) as u16 % centroids as u16).collect();
        {
            let lb = tier.layers[0].as_mut().unwrap();
            lb.books = Some(s.clone_htod(&flat).map_err(driver("upload"))?);
            let cells: Vec<u32> = (0..n_cells as u32).collect();
            let (sd, cd) = (tier.stream.clone_htod(&codes).map_err(driver("upload"))?, tier.stream.clone_htod(&cells).map_err(driver("upload"))?);
            let l = shape.layout;
            let (bits, nc, nk, ph, m) = (l.bits as i32, n_cells as u32, n_kvh as u32, per_head as u32, n_cells as u32);
            let mut b = tier.stream.launch_builder(&tier.f.pack);
            b.arg(&mut lb.codes).arg(&bits).arg(&nc).arg(&nk).arg(&ph).arg(&sd).arg(&cd).arg(&m);
            // SAFETY: as in Tier::sync_layer.
            unsafe { b.launch(cfg((grid(n_cells * n_kvh * l.rows(), 256), 1, 1), 256)) }.map_err(driver("hc_pack"))?;
            tier.stream.synchronize().map_err(driver("pack"))?;
        }
        let q: Vec<f32> = (0..nh * dk).map(|_| half::f16::from_f32(rnd() * 4.0).to_f32()).collect();
        // visible: every other cell, then a contiguous run (both cell-list forms)
        for cells in [(0..n_cells as u32).step_by(2).map(|c| (c as i32, c)).collect::<Vec<_>>(), (100..4100u32).map(|c| (c as i32, c)).collect()] {
            let n = cells.len();
            let scale = crate::attention::Scale { kq_scale: 0.125, softcap: 0.0 };
            let step = Step { q: &q, cells: &cells, overrides: &[(7, 3.0)], sinks: None, scale, tau: 0.9, layer_k: layer };
            let mut got = Selection::default();
            tier.decode(0, &step, &mut got)?;
            // the host: logits from decoded keys, the same softmax, the same cut
            let mut probs = vec![0f32; nh * n];
            for h in 0..nh {
                let kvh = h / g;
                for (j, &(_, cell)) in cells.iter().enumerate() {
                    let mut dot = 0.0f32;
                    for i in 0..per_head {
                        let code = codes[(cell as usize * n_kvh + kvh) * per_head + i] as usize;
                        let b = &books[if books_n == 1 { 0 } else { i }];
                        for d in 0..dim {
                            dot += q[h * dk + i * dim + d] * b.centroids()[code * dim + d];
                        }
                    }
                    probs[h * n + j] = dot * 0.125;
                }
            }
            probs[7] = 3.0;
            for h in 0..nh {
                crate::approx::softmax(&mut probs[h * n..(h + 1) * n], None);
            }
            let mut want = Selection::default();
            want.compute(&probs, n, 0.9, layer);
            let (ka, kb): (Vec<u32>, Vec<u32>) = (got.cuts.iter().map(|c| c.k).collect(), want.cuts.iter().map(|c| c.k).collect());
            // probabilities differ in the last bits (expf, summation order): the sets may
            // differ only at the boundary, so compare counts within 1% and the mass
            for h in 0..nh {
                let (a, b) = (ka[h] as f64, kb[h] as f64);
                if (a - b).abs() > 1.0 + 0.01 * b {
                    return Err(format!("decode ({dim}-dim, {centroids} centroids): head {h} selected {a} tokens, the host {b}"));
                }
                if (got.cuts[h].mass - want.cuts[h].mass).abs() > 1e-3 {
                    return Err(format!("decode: head {h} selected mass {} vs the host's {}", got.cuts[h].mass, want.cuts[h].mass));
                }
                let at = got.offset(h);
                for (&j, &p) in got.sel[at..at + ka[h] as usize].iter().zip(&got.p[at..]) {
                    let w = probs[h * n + j as usize];
                    if (p - w).abs() > 1e-5 + 1e-3 * w {
                        return Err(format!("decode: head {h} token {j}: probability {p}, host {w}"));
                    }
                }
            }
            // the selection kernels alone, on the host's probabilities: exactly the host's cut
            let mut exact = Selection::default();
            {
                let mut sc = tier.scratch.lock().map_err(|_| "scratch".to_string())?;
                tier.stream.memcpy_htod(&probs, &mut sc.logits.slice_mut(0..nh * n)).map_err(driver("upload"))?;
                tier.select(&mut sc, n, nh, 0.9, layer, &mut exact)?;
            }
            if exact.sel != want.sel || exact.p != want.p || exact.cuts.iter().zip(&want.cuts).any(|(a, b)| (a.bits, a.above, a.ties, a.k) != (b.bits, b.above, b.ties, b.k)) {
                return Err(format!("hc_cut/hc_compact ({dim}-dim, {centroids} centroids, {n} cells) differ from the host's selection"));
            }
            report.push(format!("decode step ({dim}-dim, {centroids} centroids, {} cells, select={}): counts {ka:?} vs host {kb:?}", n, if layer { "layer" } else { "head" }));
        }
    }
    Ok(report)
}

impl Drop for Tier {
    fn drop(&mut self) {
        // let queued work finish before the buffers go; an error here has nowhere to go
        let _ = self.stream.synchronize();
    }
}
