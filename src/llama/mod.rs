//! A thin safe layer over the patched libllama (bindgen'd `llama.h`), for the `hcattn` tool
//! and the tests: load a model once, create contexts with or without a KV backend, decode
//! batches, read logits, edit sequences, save and restore state.

use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::sync::{Mutex, Once};

use anyhow::{anyhow, bail, Result};

use crate::sys;

pub mod generated;

static INIT: Once = Once::new();
static LAST_ERROR: Mutex<String> = Mutex::new(String::new());

/// llama.cpp's log goes to stderr only when HCATTN_LLAMA_LOG is set; error lines are kept so
/// that a failed call can say why.
unsafe extern "C" fn log_cb(level: sys::ggml_log_level, text: *const c_char, _ud: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated message.
    let msg = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy();
    if level == sys::GGML_LOG_LEVEL_ERROR {
        if let Ok(mut e) = LAST_ERROR.lock() {
            e.push_str(&msg);
        }
    }
    if std::env::var_os("HCATTN_LLAMA_LOG").is_some() {
        eprint!("{msg}");
    }
}

/// Initialise llama.cpp once per process (backends, logging).
pub fn init() {
    INIT.call_once(|| unsafe {
        // SAFETY: plain initialisation calls with no arguments to keep alive.
        sys::llama_log_set(Some(log_cb), std::ptr::null_mut());
        sys::llama_backend_init();
    });
}

fn take_error() -> String {
    LAST_ERROR.lock().map(|mut e| std::mem::take(&mut *e)).unwrap_or_default().trim().to_string()
}

/// Register the hc backend in this process (for apps that link hcattn statically), so that
/// contexts can use it without loading libhcattn.so.
pub fn register_hc() -> Result<()> {
    init();
    // SAFETY: the table is a static that lives for the whole process.
    let rc = unsafe { sys::llama_kv_backend_register(crate::abi::table()) };
    if rc != 0 {
        bail!("llama_kv_backend_register refused the hc table: {}", take_error());
    }
    Ok(())
}

pub struct Model {
    ptr: *mut sys::llama_model,
}

// SAFETY: llama.cpp models are immutable after loading and shared between contexts and threads.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    pub fn load(path: &Path) -> Result<Model> {
        Model::load_with(path, 0)
    }

    /// A model file with `n_gpu_layers` layers offloaded to the GPU (with a CUDA llama.cpp),
    /// or, for `gen:NAME`, a model of that shape generated in memory (see [`generated`]).
    pub fn load_with(path: &Path, n_gpu_layers: i32) -> Result<Model> {
        init();
        if let Some(name) = path.to_str().and_then(|p| p.strip_prefix("gen:")) {
            let ptr = generated::build(generated::shape(name)?, n_gpu_layers, 0)?;
            if ptr.is_null() {
                bail!("llama.cpp could not create the generated model gen:{name}: {}", take_error());
            }
            return Ok(Model { ptr });
        }
        let c = CString::new(path.to_string_lossy().as_bytes())?;
        // SAFETY: default params, a valid path string.
        let ptr = unsafe {
            let mut p = sys::llama_model_default_params();
            p.n_gpu_layers = n_gpu_layers;
            sys::llama_model_load_from_file(c.as_ptr(), p)
        };
        if ptr.is_null() {
            bail!("cannot load model {}: {}", path.display(), take_error());
        }
        Ok(Model { ptr })
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: valid model.
        unsafe { sys::llama_model_get_vocab(self.ptr) }
    }

    /// K and V elements one token adds to a stock cache: layers x KV heads x head size x 2
    /// (the head size taken as n_embd / n_head, as in llama-shaped models).
    pub fn kv_elements_per_token(&self) -> usize {
        // SAFETY: valid model pointer; plain getters.
        let (l, hkv, e, h) = unsafe {
            (sys::llama_model_n_layer(self.ptr), sys::llama_model_n_head_kv(self.ptr), sys::llama_model_n_embd(self.ptr), sys::llama_model_n_head(self.ptr))
        };
        (l.max(0) as usize) * (hkv.max(0) as usize) * (e.max(0) as usize / h.max(1) as usize) * 2
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) as usize }
    }

    pub fn n_ctx_train(&self) -> usize {
        // SAFETY: valid model.
        unsafe { sys::llama_model_n_ctx_train(self.ptr) as usize }
    }

    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<i32>> {
        let mut out = vec![0i32; text.len() + 16];
        // SAFETY: buffers sized as passed.
        let n = unsafe {
            sys::llama_tokenize(self.vocab(), text.as_ptr() as *const c_char, text.len() as i32, out.as_mut_ptr(), out.len() as i32, add_special, false)
        };
        if n < 0 {
            bail!("tokenization needs {} tokens, more than expected", -n);
        }
        out.truncate(n as usize);
        Ok(out)
    }

    pub fn token_to_piece(&self, token: i32) -> String {
        let mut buf = vec![0u8; 64];
        // SAFETY: buffer sized as passed.
        let n = unsafe { sys::llama_token_to_piece(self.vocab(), token, buf.as_mut_ptr() as *mut c_char, buf.len() as i32, 0, false) };
        buf.truncate(n.max(0) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: owned pointer, freed once; contexts borrow the model so they are gone.
        unsafe { sys::llama_model_free(self.ptr) }
    }
}

/// What a context is created with; `Default` is one sequence, 512 tokens, the stock cache.
#[derive(Debug, Clone)]
pub struct ContextOptions {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub n_seq_max: u32,
    pub n_threads: i32,
    pub kv_unified: bool,
    /// None = the stock KV cache
    pub kv_backend: Option<String>,
    pub kv_backend_opts: Option<String>,
    /// stock cache types (llama.cpp's ggml_type numbers); None = f16
    pub type_k: Option<u32>,
    pub type_v: Option<u32>,
    pub flash_attn: Option<bool>,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            n_ctx: 512,
            n_batch: 512,
            n_ubatch: 512,
            n_seq_max: 1,
            n_threads: 2,
            kv_unified: false,
            kv_backend: None,
            kv_backend_opts: None,
            type_k: None,
            type_v: None,
            flash_attn: None,
        }
    }
}

pub struct Context<'m> {
    ptr: *mut sys::llama_context,
    model: &'m Model,
    n_vocab: usize,
}

/// A batch of tokens to decode: (token, position, sequences, want logits).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tokens: Vec<i32>,
    pub pos: Vec<i32>,
    pub seqs: Vec<Vec<i32>>,
    pub logits: Vec<bool>,
}

impl Batch {
    pub fn add(&mut self, token: i32, pos: i32, seqs: &[i32], logits: bool) {
        self.tokens.push(token);
        self.pos.push(pos);
        self.seqs.push(seqs.to_vec());
        self.logits.push(logits);
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

impl<'m> Context<'m> {
    pub fn new(model: &'m Model, o: &ContextOptions) -> Result<Context<'m>> {
        init();
        let backend = o.kv_backend.as_deref().map(CString::new).transpose()?;
        let opts = o.kv_backend_opts.as_deref().map(CString::new).transpose()?;
        // SAFETY: default params filled in; the strings outlive the call (llama copies them).
        let ptr = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = o.n_ctx;
            p.n_batch = o.n_batch;
            p.n_ubatch = o.n_ubatch;
            p.n_seq_max = o.n_seq_max;
            p.n_threads = o.n_threads;
            p.n_threads_batch = o.n_threads;
            p.kv_unified = o.kv_unified;
            p.no_perf = true;
            if let Some(t) = o.type_k {
                p.type_k = t;
            }
            if let Some(t) = o.type_v {
                p.type_v = t;
            }
            if let Some(fa) = o.flash_attn {
                p.flash_attn_type = if fa { sys::LLAMA_FLASH_ATTN_TYPE_ENABLED } else { sys::LLAMA_FLASH_ATTN_TYPE_DISABLED };
            }
            p.kv_backend = backend.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
            p.kv_backend_opts = opts.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
            sys::llama_init_from_model(model.ptr, p)
        };
        if ptr.is_null() {
            bail!("cannot create the context: {}", take_error());
        }
        Ok(Context { ptr, model, n_vocab: model.n_vocab() })
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Decode a batch. Err carries llama.cpp's status and its error log.
    pub fn decode(&mut self, b: &Batch) -> Result<()> {
        let mut seq_ptrs: Vec<*mut i32> = Vec::with_capacity(b.len());
        let mut seqs: Vec<Vec<i32>> = b.seqs.clone();
        for s in seqs.iter_mut() {
            seq_ptrs.push(s.as_mut_ptr());
        }
        let mut tokens = b.tokens.clone();
        let mut pos = b.pos.clone();
        let mut n_seq: Vec<i32> = b.seqs.iter().map(|s| s.len() as i32).collect();
        let mut logits: Vec<i8> = b.logits.iter().map(|&l| l as i8).collect();
        let batch = sys::llama_batch {
            n_tokens: b.len() as i32,
            token: tokens.as_mut_ptr(),
            embd: std::ptr::null_mut(),
            pos: pos.as_mut_ptr(),
            n_seq_id: n_seq.as_mut_ptr(),
            seq_id: seq_ptrs.as_mut_ptr(),
            logits: logits.as_mut_ptr(),
            ..Default::default()
        };
        // SAFETY: every array has n_tokens entries and lives until the call returns.
        let rc = unsafe { sys::llama_decode(self.ptr, batch) };
        if rc != 0 {
            bail!("llama_decode returned {rc}: {}", take_error());
        }
        Ok(())
    }

    /// Logits of the i-th token of the last batch that asked for logits (-1 = the last one).
    pub fn logits(&self, i: i32) -> Result<&[f32]> {
        // SAFETY: llama returns a pointer to n_vocab floats owned by the context, or null.
        let p = unsafe { sys::llama_get_logits_ith(self.ptr, i) };
        if p.is_null() {
            bail!("no logits for batch index {i}: {}", take_error());
        }
        Ok(unsafe { std::slice::from_raw_parts(p, self.n_vocab) })
    }

    fn mem(&self) -> sys::llama_memory_t {
        // SAFETY: valid context.
        unsafe { sys::llama_get_memory(self.ptr) }
    }

    pub fn seq_rm(&mut self, seq: i32, p0: i32, p1: i32) -> bool {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_seq_rm(self.mem(), seq, p0, p1) }
    }
    pub fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) {
        unsafe { sys::llama_memory_seq_cp(self.mem(), src, dst, p0, p1) }
    }
    pub fn seq_keep(&mut self, seq: i32) {
        unsafe { sys::llama_memory_seq_keep(self.mem(), seq) }
    }
    pub fn seq_add(&mut self, seq: i32, p0: i32, p1: i32, delta: i32) {
        unsafe { sys::llama_memory_seq_add(self.mem(), seq, p0, p1, delta) }
    }
    pub fn seq_pos_min(&self, seq: i32) -> i32 {
        unsafe { sys::llama_memory_seq_pos_min(self.mem(), seq) }
    }
    pub fn seq_pos_max(&self, seq: i32) -> i32 {
        unsafe { sys::llama_memory_seq_pos_max(self.mem(), seq) }
    }
    pub fn can_shift(&self) -> bool {
        unsafe { sys::llama_memory_can_shift(self.mem()) }
    }
    pub fn clear(&mut self, data: bool) {
        unsafe { sys::llama_memory_clear(self.mem(), data) }
    }

    /// The whole context state (llama_state_get_data).
    pub fn save_state(&mut self) -> Result<Vec<u8>> {
        // SAFETY: buffer sized by llama_state_get_size.
        let n = unsafe { sys::llama_state_get_size(self.ptr) };
        let mut buf = vec![0u8; n];
        let w = unsafe { sys::llama_state_get_data(self.ptr, buf.as_mut_ptr(), n) };
        if w == 0 {
            bail!("saving the state failed: {}", take_error());
        }
        buf.truncate(w);
        Ok(buf)
    }

    pub fn load_state(&mut self, data: &[u8]) -> Result<()> {
        // SAFETY: llama reads at most data.len() bytes.
        let r = unsafe { sys::llama_state_set_data(self.ptr, data.as_ptr(), data.len()) };
        if r == 0 {
            bail!("restoring the state failed: {}", take_error());
        }
        Ok(())
    }

    pub fn save_seq_state(&mut self, seq: i32) -> Result<Vec<u8>> {
        // SAFETY: as above.
        let n = unsafe { sys::llama_state_seq_get_size(self.ptr, seq) };
        let mut buf = vec![0u8; n];
        let w = unsafe { sys::llama_state_seq_get_data(self.ptr, buf.as_mut_ptr(), n, seq) };
        if w == 0 {
            bail!("saving sequence {seq} failed: {}", take_error());
        }
        buf.truncate(w);
        Ok(buf)
    }

    pub fn load_seq_state(&mut self, data: &[u8], seq: i32) -> Result<()> {
        // SAFETY: as above.
        let r = unsafe { sys::llama_state_seq_set_data(self.ptr, data.as_ptr(), data.len(), seq) };
        if r == 0 {
            bail!("restoring into sequence {seq} failed: {}", take_error());
        }
        Ok(())
    }

    /// Greedy next token from logits.
    pub fn argmax(logits: &[f32]) -> i32 {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as i32
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: owned pointer, freed once.
        unsafe { sys::llama_free(self.ptr) }
    }
}

/// Load a KV-backend plugin by name or path (what `--kv-backend NAME` does).
pub fn load_backend(name: &str) -> Result<()> {
    init();
    let c = CString::new(name)?;
    let mut err = vec![0u8; 4096];
    // SAFETY: buffer sized as passed.
    let rc = unsafe { sys::llama_kv_backend_load(c.as_ptr(), err.as_mut_ptr() as *mut c_char, err.len()) };
    if rc != 0 {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        return Err(anyhow!("{}", String::from_utf8_lossy(&err[..end])));
    }
    Ok(())
}
