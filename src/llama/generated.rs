//! Models generated in memory with random weights (`-m gen:NAME`): the shapes of real models,
//! for speed and memory measurements where the real weights are not at hand (the GPU check
//! runs offline) or too large to download. llama.cpp builds them from GGUF metadata and fills
//! every tensor through a callback (`llama_model_init_from_user`); nothing is written to disk.
//! Its dummy "test" tokenizer maps text to token ids deterministically.

use std::ffi::{c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::sys;

/// A llama-architecture shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub name: &'static str,
    pub n_vocab: u32,
    pub n_embd: u32,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_ff: u32,
    pub n_ctx_train: u32,
    pub rope_base: u32,
}

/// The shapes `gen:NAME` knows.
pub const SHAPES: &[Shape] = &[
    // SmolLM2-135M: 30 layers, 9 heads / 3 KV heads of 64
    Shape { name: "smollm2", n_vocab: 49152, n_embd: 576, n_layer: 30, n_head: 9, n_head_kv: 3, n_ff: 1536, n_ctx_train: 8192, rope_base: 100_000 },
    // Llama-3-8B: 32 layers, 32 heads / 8 KV heads of 128 (the trained length is set to 4M so
    // that llama.cpp accepts the long contexts the paper runs)
    Shape { name: "llama3-8b", n_vocab: 128_256, n_embd: 4096, n_layer: 32, n_head: 32, n_head_kv: 8, n_ff: 14336, n_ctx_train: 4 << 20, rope_base: 500_000 },
    // a tiny llama for the tests
    Shape { name: "tiny", n_vocab: 512, n_embd: 64, n_layer: 2, n_head: 4, n_head_kv: 2, n_ff: 128, n_ctx_train: 4096, rope_base: 10_000 },
];

pub fn shape(name: &str) -> Result<Shape> {
    SHAPES.iter().copied().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
        anyhow::anyhow!("unknown generated model 'gen:{name}'; known: {}", names.join(", "))
    })
}

struct Fill {
    seed: u64,
    failed: bool,
}

/// Weight init: norms 1, everything else uniform with standard deviation 0.02; each tensor's
/// values from a generator seeded by its name, so a model is the same in every run.
unsafe extern "C" fn fill(t: *mut sys::ggml_tensor, ud: *mut c_void) {
    // nothing may unwind into llama.cpp
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: llama.cpp passes a live tensor and the Fill given to llama_model_init_from_user.
        let (st, f) = unsafe { (&*t, &mut *(ud as *mut Fill)) };
        if st.type_ != sys::GGML_TYPE_F32 {
            f.failed = true;
            return;
        }
        // SAFETY: a live tensor; its name is NUL-terminated.
        let (n, name) = unsafe { (sys::ggml_nelements(t) as usize, CStr::from_ptr(sys::ggml_get_name(t)).to_string_lossy().into_owned()) };
        let mut data = vec![0f32; n];
        if name.ends_with("norm.weight") {
            data.fill(1.0);
        } else {
            let h = name.bytes().fold(f.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            let a = 0.02 * 3f32.sqrt();
            data.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
                let mut z = h ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for x in chunk {
                    z ^= z << 13;
                    z ^= z >> 7;
                    z ^= z << 17;
                    *x = a * ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0);
                }
            });
        }
        // SAFETY: `data` holds exactly the tensor's n F32 values.
        unsafe { sys::ggml_backend_tensor_set(t, data.as_ptr() as *const c_void, 0, n * 4) };
    }));
    if r.is_err() {
        // SAFETY: as above.
        unsafe { (*(ud as *mut Fill)).failed = true };
    }
}

/// Builds the model: metadata into a gguf context, then llama.cpp creates and fills it.
pub fn build(s: Shape, n_gpu_layers: i32, seed: u64) -> Result<*mut sys::llama_model> {
    let c = |x: &str| CString::new(x).expect("no NUL in metadata");
    // SAFETY: a fresh gguf context, filled with owned strings, freed below.
    unsafe {
        let g = sys::gguf_init_empty();
        if g.is_null() {
            bail!("gguf_init_empty failed");
        }
        let u = |k: &str, v: u32| sys::gguf_set_val_u32(g, c(k).as_ptr(), v);
        sys::gguf_set_val_str(g, c("general.architecture").as_ptr(), c("llama").as_ptr());
        sys::gguf_set_val_str(g, c("general.name").as_ptr(), c(&format!("generated {}", s.name)).as_ptr());
        u("llama.vocab_size", s.n_vocab);
        u("llama.context_length", s.n_ctx_train);
        u("llama.embedding_length", s.n_embd);
        u("llama.block_count", s.n_layer);
        u("llama.feed_forward_length", s.n_ff);
        u("llama.attention.head_count", s.n_head);
        u("llama.attention.head_count_kv", s.n_head_kv);
        sys::gguf_set_val_f32(g, c("llama.attention.layer_norm_rms_epsilon").as_ptr(), 1e-5);
        sys::gguf_set_val_f32(g, c("llama.rope.freq_base").as_ptr(), s.rope_base as f32);
        sys::gguf_set_val_str(g, c("tokenizer.ggml.model").as_ptr(), c("test").as_ptr());
        let toks: Vec<CString> = (0..s.n_vocab).map(|i| c(&format!("tok_{i}"))).collect();
        let ptrs: Vec<*const std::ffi::c_char> = toks.iter().map(|t| t.as_ptr()).collect();
        sys::gguf_set_arr_str(g, c("tokenizer.ggml.tokens").as_ptr(), ptrs.as_ptr() as *mut *const std::ffi::c_char, ptrs.len());
        let scores = vec![0f32; s.n_vocab as usize];
        sys::gguf_set_arr_data(g, c("tokenizer.ggml.scores").as_ptr(), sys::GGUF_TYPE_FLOAT32, scores.as_ptr() as *const c_void, scores.len());
        let mut p = sys::llama_model_default_params();
        p.n_gpu_layers = n_gpu_layers;
        let mut f = Fill { seed, failed: false };
        let m = sys::llama_model_init_from_user(g, Some(fill), &mut f as *mut Fill as *mut c_void, p);
        sys::gguf_free(g);
        if f.failed {
            if !m.is_null() {
                sys::llama_model_free(m);
            }
            bail!("gen:{}: a tensor could not be filled", s.name);
        }
        Ok(m)
    }
}
