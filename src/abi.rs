//! The C boundary: the `llama_kv_backend_iface` table that llama.cpp calls
//! (include/llama-kv-backend.h in the patched tree).
//!
//! Every entry catches panics and turns errors into a status plus a message kept in the handle
//! (`last_error`); nothing unwinds into C++. Pointers from llama.cpp are trusted to follow the
//! header's contract (valid for the call, shapes as described by the layer descriptors).

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use crate::attention::{Scale, Window};
use crate::backend::{Backend, Call, Config, Input, LayerDesc, Output, Token};
use crate::cells::{SeqSet, MAX_SEQ};
use crate::error::{Error, Result};
use crate::options::Options;
use crate::sys;

/// What `be` points at.
struct Handle {
    be: Backend,
    error: Mutex<CString>,
}

/// Addresses of the live handles of this process, for [`live_backends`].
static LIVE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<usize>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `f` over the hc backends alive in this process, oldest first (the `hcattn` tool reads
/// their memory use and layer shapes this way).
///
/// # Safety
/// No context of this process may be decoding or changing its cache during the call: the
/// backends are read while llama.cpp owns them.
pub unsafe fn live_backends<R>(f: impl FnOnce(&[&Backend]) -> R) -> R {
    let handles = live();
    // SAFETY: addresses in LIVE belong to handles not yet destroyed (removed under the same
    // lock before they are freed); the caller guarantees nothing mutates them now.
    let bes: Vec<&Backend> = handles.iter().map(|&a| unsafe { &(*(a as *const Handle)).be }).collect();
    f(&bes)
}

impl Handle {
    fn set_error(&self, msg: impl Into<String>) {
        let msg = msg.into().replace('\0', " ");
        if let Ok(mut e) = self.error.lock() {
            *e = CString::new(msg).unwrap_or_default();
        }
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error in the hc backend: {what}")
}

/// Run `f` on the handle; an error or a panic becomes `fail` and a stored message.
fn guarded<T>(be: *mut c_void, fail: T, f: impl FnOnce(&mut Handle) -> Result<T>) -> T {
    if be.is_null() {
        return fail;
    }
    // SAFETY: `be` is the pointer `create` returned (Box<Handle>), not yet destroyed; llama.cpp
    // makes these calls from one thread and never during store/attend.
    let h = unsafe { &mut *(be as *mut Handle) };
    match catch_unwind(AssertUnwindSafe(|| f(h))) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            h.set_error(e.to_string());
            fail
        }
        Err(p) => {
            h.set_error(panic_message(p));
            fail
        }
    }
}

/// Shared (multi-thread) version for the graph ops.
fn guarded_shared(be: *mut c_void, f: impl FnOnce(&Handle) -> Result<()>) -> i32 {
    if be.is_null() {
        return sys::LLAMA_KV_ERROR;
    }
    // SAFETY: as in `guarded`; during store/attend every thread only takes a shared reference.
    let h = unsafe { &*(be as *const Handle) };
    let err = match catch_unwind(AssertUnwindSafe(|| f(h))) {
        Ok(Ok(())) => return sys::LLAMA_KV_OK,
        Ok(Err(e)) => e.to_string(),
        Err(p) => panic_message(p),
    };
    // llama.cpp fails the next batch with this message
    h.set_error(err);
    sys::LLAMA_KV_ERROR
}

/// One of the op's F32 inputs: `len` values per (token, head) row, at byte strides nb1/nb2.
struct Strided {
    base: *const u8,
    nb1: usize,
    nb2: usize,
    len: usize,
}

impl Input for Strided {
    fn row(&self, t: usize, h: usize) -> &[f32] {
        // SAFETY: llama.cpp passes tensors of [len, heads, n_tokens] F32 with these strides,
        // valid for the whole call (llama-kv-backend.h); t and h are within those shapes.
        unsafe { std::slice::from_raw_parts(self.base.add(t * self.nb2 + h * self.nb1) as *const f32, self.len) }
    }
}

/// The op's output, rows of `row` floats per token, `dv` floats per head.
struct OutRows {
    base: *mut f32,
    row: usize,
    dv: usize,
}

impl Output for OutRows {
    fn span(&self, t: usize, h: usize, len: usize) -> &mut [f32] {
        assert!(h * self.dv + len <= self.row, "output span outside the row");
        // SAFETY: the output tensor holds n_tokens rows of `row` floats; the attention splits
        // (token, head group) pairs between threads, so spans never overlap.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(t * self.row + h * self.dv), len) }
    }
}

unsafe fn cstr<'a>(p: *const c_char) -> &'a str {
    if p.is_null() {
        ""
    } else {
        CStr::from_ptr(p).to_str().unwrap_or("")
    }
}

fn config_from_c(cfg: &sys::llama_kv_backend_config) -> Result<Config> {
    if cfg.struct_size as usize != std::mem::size_of::<sys::llama_kv_backend_config>() {
        return Err(Error::Config(format!(
            "llama.cpp passed a {}-byte config, this backend expects {} (built against another header)",
            cfg.struct_size,
            std::mem::size_of::<sys::llama_kv_backend_config>()
        )));
    }
    // SAFETY: pointers in the config are valid during create (header contract).
    let (arch, opts) = unsafe { (cstr(cfg.arch).to_string(), cstr(cfg.opts)) };
    let options = Options::parse(opts)?;
    let descs: &[sys::llama_kv_layer_desc] = if cfg.n_layer_kv <= 0 || cfg.layers.is_null() {
        &[]
    } else {
        // SAFETY: `layers` has n_layer_kv entries (header contract).
        unsafe { std::slice::from_raw_parts(cfg.layers, cfg.n_layer_kv as usize) }
    };
    let mut layers = Vec::with_capacity(descs.len());
    for d in descs {
        let window = Window::from_c(d.swa_type, d.n_swa).ok_or_else(|| {
            Error::Config(format!("layer {}: unsupported sliding window (type {}, size {})", d.il, d.swa_type, d.n_swa))
        })?;
        if d.il < 0 || d.n_head <= 0 || d.n_head_kv <= 0 || d.n_embd_head_k <= 0 || d.n_embd_head_v <= 0 {
            return Err(Error::Config(format!("layer {}: bad shape", d.il)));
        }
        layers.push(LayerDesc {
            il: d.il as usize,
            n_head: d.n_head as usize,
            n_head_kv: d.n_head_kv as usize,
            dk: d.n_embd_head_k as usize,
            dv: d.n_embd_head_v as usize,
            window,
        });
    }
    Ok(Config {
        arch,
        n_ctx: cfg.n_ctx as usize,
        n_ctx_seq: cfg.n_ctx_seq as usize,
        n_seq_max: cfg.n_seq_max as usize,
        n_ubatch: cfg.n_ubatch as usize,
        kv_unified: cfg.kv_unified,
        no_alloc: cfg.no_alloc,
        // SAFETY: as above; NULL when llama.cpp does not know the file
        model_path: (!cfg.model_path.is_null()).then(|| unsafe { cstr(cfg.model_path) }.to_string()),
        layers,
        options,
    })
}

unsafe extern "C" fn create(cfg: *const sys::llama_kv_backend_config, err: *mut c_char, err_len: usize) -> *mut c_void {
    let res = catch_unwind(AssertUnwindSafe(|| -> Result<Backend> {
        // SAFETY: llama.cpp passes a valid config for the duration of the call.
        let cfg = unsafe { cfg.as_ref() }.ok_or_else(|| Error::Config("no configuration".into()))?;
        Backend::new(config_from_c(cfg)?)
    }));
    let msg = match res {
        Ok(Ok(be)) => {
            let h = Box::new(Handle { be, error: Mutex::new(CString::default()) });
            let p = Box::into_raw(h);
            live().push(p as usize);
            return p as *mut c_void;
        }
        Ok(Err(e)) => e.to_string(),
        Err(p) => panic_message(p),
    };
    if !err.is_null() && err_len > 0 {
        let bytes = msg.as_bytes();
        let n = bytes.len().min(err_len - 1);
        // SAFETY: err has err_len bytes (header contract); we write n + 1 <= err_len.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), err as *mut u8, n);
            *err.add(n) = 0;
        }
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn destroy(be: *mut c_void) {
    if !be.is_null() {
        // SAFETY: `be` came from Box::into_raw in `create` and llama.cpp destroys it once.
        live().retain(|&a| a != be as usize);
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(be as *mut Handle) })));
    }
}

unsafe extern "C" fn last_error(be: *mut c_void) -> *const c_char {
    if be.is_null() {
        return c"".as_ptr();
    }
    // SAFETY: see `guarded`.
    let h = unsafe { &*(be as *const Handle) };
    match h.error.lock() {
        // the pointer stays valid until the next error replaces the string
        Ok(e) => e.as_ptr(),
        Err(_) => c"error state unavailable".as_ptr(),
    }
}

/// Copy a ubatch view into tokens.
unsafe fn tokens_from_c(v: &sys::llama_kv_ubatch_view) -> Result<Vec<Token>> {
    let n = v.n_tokens as usize;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: the view's arrays have n_tokens entries, seq_id[i] has n_seq_id[i] (contract).
        let (pos, n_seq, seq_ids) = unsafe { (*v.pos.add(i), *v.n_seq_id.add(i), *v.seq_id.add(i)) };
        if n_seq <= 0 {
            return Err(Error::Request(format!("token {i} belongs to no sequence")));
        }
        let ids = unsafe { std::slice::from_raw_parts(seq_ids, n_seq as usize) };
        let mut seqs = SeqSet::default();
        for &s in ids {
            if s < 0 || s as usize >= MAX_SEQ {
                return Err(Error::Request(format!("token {i}: sequence id {s} is out of range")));
            }
            seqs.insert(s as usize);
        }
        out.push(Token { pos, seq0: ids[0] as usize, seqs });
    }
    Ok(out)
}

unsafe extern "C" fn prepare(be: *mut c_void, ubs: *const sys::llama_kv_ubatch_view, n: i32) -> i32 {
    guarded(be, sys::LLAMA_KV_ERROR, |h| {
        let views = if n <= 0 || ubs.is_null() { &[][..] } else { unsafe { std::slice::from_raw_parts(ubs, n as usize) } };
        let batches: Vec<Vec<Token>> = views.iter().map(|v| unsafe { tokens_from_c(v) }).collect::<Result<_>>()?;
        Ok(if h.be.prepare(&batches)? { sys::LLAMA_KV_OK } else { sys::LLAMA_KV_NO_SPACE })
    })
}

unsafe extern "C" fn apply(be: *mut c_void, ub: *const sys::llama_kv_ubatch_view) -> i32 {
    guarded(be, sys::LLAMA_KV_ERROR, |h| {
        let v = unsafe { ub.as_ref() }.ok_or_else(|| Error::Request("no ubatch".into()))?;
        let tokens = unsafe { tokens_from_c(v)? };
        h.be.apply(&tokens)?;
        Ok(sys::LLAMA_KV_OK)
    })
}

/// Build the Rust view of an attention call; `with_q` for attend (store has no q/out).
fn with_call(h: &Handle, c: &sys::llama_kv_attn_call, with_q: bool, f: impl FnOnce(&Call) -> Result<()>) -> Result<()> {
    let il = c.il.max(0) as usize;
    let d = h
        .be
        .layer_desc(il)
        .ok_or_else(|| Error::Request(format!("layer {} is not served by this backend", c.il)))?;
    let k = Strided { base: c.k as *const u8, nb1: c.k_nb1, nb2: c.k_nb2, len: d.dk };
    let v = Strided { base: c.v as *const u8, nb1: c.v_nb1, nb2: c.v_nb2, len: d.dv };
    let q = Strided { base: c.q as *const u8, nb1: c.q_nb1, nb2: c.q_nb2, len: d.dk };
    let out = OutRows { base: c.out, row: d.dv * d.n_head, dv: d.dv };
    let sinks = if c.sinks.is_null() {
        None
    } else {
        // SAFETY: sinks has n_head entries when present (contract).
        Some(unsafe { std::slice::from_raw_parts(c.sinks, d.n_head) })
    };
    if c.k.is_null() || c.v.is_null() || (with_q && (c.q.is_null() || c.out.is_null())) {
        return Err(Error::Request(format!("layer {il}: attention call with a null tensor")));
    }
    let call = Call {
        il,
        n_tokens: c.n_tokens as usize,
        causal: c.causal,
        scale: Scale { kq_scale: c.kq_scale, softcap: c.softcap },
        q: if with_q { Some(&q) } else { None },
        k: &k,
        v: &v,
        sinks,
        out: if with_q { Some(&out) } else { None },
    };
    f(&call)
}

unsafe extern "C" fn store(be: *mut c_void, call: *const sys::llama_kv_attn_call, ith: i32, nth: i32) -> i32 {
    guarded_shared(be, |h| {
        let c = unsafe { call.as_ref() }.ok_or_else(|| Error::Request("no call".into()))?;
        with_call(h, c, false, |call| h.be.store(call, ith.max(0) as usize, nth.max(1) as usize))
    })
}

unsafe extern "C" fn attend(be: *mut c_void, call: *const sys::llama_kv_attn_call, ith: i32, nth: i32) -> i32 {
    guarded_shared(be, |h| {
        let c = unsafe { call.as_ref() }.ok_or_else(|| Error::Request("no call".into()))?;
        with_call(h, c, true, |call| h.be.attend(call, ith.max(0) as usize, nth.max(1) as usize))
    })
}

unsafe extern "C" fn clear(be: *mut c_void, data: bool) {
    guarded(be, (), |h| {
        h.be.clear(data);
        Ok(())
    })
}

unsafe extern "C" fn seq_rm(be: *mut c_void, seq: i32, p0: i32, p1: i32) -> bool {
    guarded(be, false, |h| h.be.seq_rm(seq, p0, p1))
}

unsafe extern "C" fn seq_cp(be: *mut c_void, src: i32, dst: i32, p0: i32, p1: i32) {
    guarded(be, (), |h| h.be.seq_cp(src, dst, p0, p1))
}

unsafe extern "C" fn seq_keep(be: *mut c_void, seq: i32) {
    guarded(be, (), |h| h.be.seq_keep(seq))
}

unsafe extern "C" fn seq_add(be: *mut c_void, seq: i32, p0: i32, p1: i32, delta: i32) -> bool {
    guarded(be, false, |h| Err(h.be.seq_shift_refusal(&format!("seq_add({seq}, {p0}, {p1}, {delta})"))))
}

unsafe extern "C" fn seq_div(be: *mut c_void, seq: i32, p0: i32, p1: i32, d: i32) -> bool {
    guarded(be, false, |h| Err(h.be.seq_shift_refusal(&format!("seq_div({seq}, {p0}, {p1}, {d})"))))
}

unsafe extern "C" fn seq_pos_min(be: *mut c_void, seq: i32) -> i32 {
    guarded(be, -1, |h| Ok(h.be.seq_pos_min_max(seq)?.0))
}

unsafe extern "C" fn seq_pos_max(be: *mut c_void, seq: i32) -> i32 {
    guarded(be, -1, |h| Ok(h.be.seq_pos_min_max(seq)?.1))
}

unsafe extern "C" fn can_shift(be: *mut c_void) -> bool {
    guarded(be, false, |h| Ok(h.be.can_shift()))
}

unsafe extern "C" fn memory_usage(be: *mut c_void, usage: *mut sys::llama_kv_memory_usage) {
    guarded(be, (), |h| {
        let u = h.be.usage();
        // SAFETY: llama.cpp passes a writable struct (contract).
        if let Some(out) = unsafe { usage.as_mut() } {
            out.host_bytes = u.host;
            out.device_bytes = u.device;
            out.file_bytes = u.file;
            out.fast_bytes = u.fast;
            out.codebook_bytes = u.codebooks;
        }
        Ok(())
    })
}

unsafe extern "C" fn state_write(be: *mut c_void, seq: i32, _flags: u32, write: sys::llama_kv_write_fn, io: *mut c_void) -> bool {
    guarded(be, false, |h| {
        let write = write.ok_or_else(|| Error::State("no write callback".into()))?;
        // SAFETY: the callback and io are valid for this call (contract); it never unwinds.
        let mut w = |b: &[u8]| unsafe { write(io, b.as_ptr() as *const c_void, b.len()) };
        crate::state::write(&mut h.be, seq, &mut w)?;
        Ok(true)
    })
}

unsafe extern "C" fn state_read(be: *mut c_void, seq: i32, _flags: u32, read: sys::llama_kv_read_fn, io: *mut c_void) -> bool {
    guarded(be, false, |h| {
        let read = read.ok_or_else(|| Error::State("no read callback".into()))?;
        // SAFETY: as for state_write.
        let mut r = |b: &mut [u8]| unsafe { read(io, b.as_mut_ptr() as *mut c_void, b.len()) };
        crate::state::read(&mut h.be, seq, &mut r)?;
        Ok(true)
    })
}

unsafe extern "C" fn dense_cells(be: *mut c_void, il: i32) -> u32 {
    guarded(be, 0, |h| Ok(if il < 0 { 0 } else { h.be.dense_cells(il as usize) as u32 }))
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn dense_fill(
    be: *mut c_void,
    il: i32,
    causal: bool,
    n_tokens: u32,
    n_kv: u32,
    k: *mut u16,
    v: *mut u16,
    mask: *mut u16,
    ith: i32,
    nth: i32,
) -> i32 {
    guarded_shared(be, |h| {
        if il < 0 || k.is_null() || v.is_null() || mask.is_null() {
            return Err(Error::Request(format!("dense view of layer {il}: a null buffer or a negative layer")));
        }
        // SAFETY: llama.cpp sized the three buffers for n_kv and n_tokens (contract) and runs
        // this once per thread, each with its own ith; f16 and u16 have one layout.
        unsafe {
            h.be.dense_fill(
                il as usize,
                causal,
                n_tokens as usize,
                n_kv as usize,
                k as *mut half::f16,
                v as *mut half::f16,
                mask as *mut half::f16,
                ith.max(0) as usize,
                nth.max(1) as usize,
            )
        }
    })
}

struct Table(sys::llama_kv_backend_iface);
// SAFETY: the table is immutable; its only pointer is to a static string.
unsafe impl Sync for Table {}

static TABLE: Table = Table(sys::llama_kv_backend_iface {
    api_version: sys::LLAMA_KV_BACKEND_API_VERSION,
    struct_size: std::mem::size_of::<sys::llama_kv_backend_iface>() as u32,
    name: c"hc".as_ptr(),
    create: Some(create),
    destroy: Some(destroy),
    last_error: Some(last_error),
    prepare: Some(prepare),
    apply: Some(apply),
    store: Some(store),
    attend: Some(attend),
    clear: Some(clear),
    seq_rm: Some(seq_rm),
    seq_cp: Some(seq_cp),
    seq_keep: Some(seq_keep),
    seq_add: Some(seq_add),
    seq_div: Some(seq_div),
    seq_pos_min: Some(seq_pos_min),
    seq_pos_max: Some(seq_pos_max),
    can_shift: Some(can_shift),
    memory_usage: Some(memory_usage),
    state_write: Some(state_write),
    state_read: Some(state_read),
    dense_cells: Some(dense_cells),
    dense_fill: Some(dense_fill),
});

/// The function table (what `llama_kv_backend_init` returns).
pub fn table() -> *const sys::llama_kv_backend_iface {
    &TABLE.0
}

/// The plugin's one export: llama.cpp resolves it after dlopen("libhcattn.so").
#[no_mangle]
pub extern "C" fn llama_kv_backend_init() -> *const sys::llama_kv_backend_iface {
    table()
}
