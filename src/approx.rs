//! The HCAttention decode path: approximate logits from the key store (codes, or exact rows
//! where the store keeps them; for 4-bit codes the scan's integer levels, whose softmax and
//! selection [`crate::levels`] takes from their counts), softmax over every visible token, the
//! smallest top set whose mass reaches `tau` (per head, or one k for all heads of the layer),
//! and the probability-weighted sum of only those tokens' values.
//!
//! The steps are separate functions so that the backend can run them two ways: all steps of
//! one token in one work item ([`approximate`], for ubatches of several tokens), or each step
//! split across the op's threads with a barrier between steps (one token decoding: scoring by
//! (KV head, cell chunk), softmax and selection by query head, value sums by (KV head, cell
//! chunk)).

use half::f16;

use crate::attention::{exp, Scale};
use crate::keys::{KeyStore, Prep};
use crate::levels::{softmax_in_chunks, ChunkScratch, CountScratch, HeadLevels};
use crate::select::{layer_k, Cut, Histogram, TopP};
use crate::simd::Level;
#[cfg(target_arch = "x86_64")]
use crate::simd::f16x8_to_f32_sse41;

/// Settings of the approximate path.
#[derive(Debug, Clone, Copy)]
pub struct Approx {
    pub tau: f32,
    pub renorm: bool,
    /// one k for all heads of the layer (the paper's code) instead of one per head
    pub layer_k: bool,
}

/// Per-thread scratch, reused so that the decode loop does not allocate once warm.
#[derive(Default)]
pub struct ApproxScratch {
    prep: Prep,
    q: Vec<f32>,
    pub(crate) probs: Vec<f32>,
    ks: Vec<usize>,
    pub(crate) sel: Vec<u32>,
    pub(crate) top: TopP,
    /// one per head whose probabilities are held
    pub(crate) hists: Vec<Histogram>,
    /// the levels of 4-bit scans, the raw scores of their exact cells, each head's (bias, step),
    /// each head's distribution over its levels, and the scratch of their counts
    pub(crate) levels: Vec<u16>,
    pub(crate) raw: Vec<f32>,
    pub(crate) bias_step: Vec<(f32, f32)>,
    pub(crate) heads: Vec<HeadLevels>,
    pub(crate) chunk_scratch: ChunkScratch,
    pub(crate) count_scratch: CountScratch,
    /// each head's cut, and the value sums' partial sums and masses per chunk
    pub(crate) cuts: Vec<Cut>,
    pub(crate) parts: Vec<f32>,
    pub(crate) part_mass: Vec<f64>,
    /// the decode's 4-bit value items: one chunk's probabilities of a KV head's query heads
    pub(crate) chunk_probs: Vec<f32>,
}

/// The g query heads' scoring tables in `s.prep`. The queries are rounded to f16 as stock
/// rounds them, so that exact rows score as in stock.
fn prepare_queries<'a>(keys: &KeyStore, g: usize, dk: usize, q: impl Fn(usize) -> &'a [f32], s: &mut ApproxScratch) {
    s.q.clear();
    for h in 0..g {
        s.q.extend(q(h)[..dk].iter().map(|&x| f16::from_f32(x).to_f32()));
    }
    keys.prepare(&s.q, g, &mut s.prep);
}

/// Logits of the `g` query heads of KV head `kvh` against `cells`, written as
/// `out[h * stride + j]`. `q(h)` gives query head h of the group (f32, at least dk).
///
/// # Safety
/// No thread writes the keys of these cells during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn logits<'a>(
    keys: &KeyStore,
    kvh: usize,
    g: usize,
    dk: usize,
    cells: &[(i32, u32)],
    q: impl Fn(usize) -> &'a [f32],
    scale: Scale,
    s: &mut ApproxScratch,
    out: &mut [f32],
    stride: usize,
) {
    prepare_queries(keys, g, dk, q, s);
    keys.scores(kvh, &mut s.prep, g, cells, out, stride);
    let n = cells.len();
    for h in 0..g {
        let l = &mut out[h * stride..h * stride + n];
        if scale.softcap == 0.0 {
            let k = scale.kq_scale;
            l.iter_mut().for_each(|x| *x *= k);
        } else {
            l.iter_mut().for_each(|x| *x = scale.logit(*x));
        }
    }
}

/// [`logits`] for a store with levels ([`KeyStore::has_levels`]): the 4-bit scan's levels of
/// the g query heads as `lv[h * stride + j]`, the raw scores of exact cells in `raw` (see
/// [`KeyStore::levels`]), and each head's (bias, step) in `bias_step`.
///
/// # Safety
/// No thread writes the keys of these cells during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn levels<'a>(
    keys: &KeyStore,
    kvh: usize,
    g: usize,
    dk: usize,
    cells: &[(i32, u32)],
    q: impl Fn(usize) -> &'a [f32],
    s: &mut ApproxScratch,
    lv: &mut [u16],
    raw: &mut [f32],
    stride: usize,
    bias_step: &mut [(f32, f32)],
) {
    prepare_queries(keys, g, dk, q, s);
    keys.levels(kvh, &mut s.prep, g, cells, lv, raw, stride);
    for (h, bs) in bias_step.iter_mut().enumerate().take(g) {
        *bs = s.prep.bias_step(h);
    }
}

/// Softmax in place; `sink` is one more logit that takes mass but has no value.
#[inline]
pub fn softmax(l: &mut [f32], sink: Option<f32>) {
    softmax_with(crate::simd::level(), l, sink)
}

/// [`softmax`] at a chosen instruction-set level (lowered to what the CPU has).
pub fn softmax_with(level: Level, l: &mut [f32], sink: Option<f32>) {
    #[cfg(target_arch = "x86_64")]
    match level.usable() {
        // SAFETY: `usable` checked that the CPU has the level's features.
        Level::Avx512 => return unsafe { softmax_avx512(l, sink) },
        Level::Avx2 => return unsafe { softmax_avx2(l, sink) },
        Level::Portable | Level::Neon | Level::Sse41 => {}
    }
    let _ = level;
    softmax_lanes::<8>(l, sink)
}

/// The same code compiled for AVX2 and FMA: its loops (the exp's rounding included) vectorise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(l: &mut [f32], sink: Option<f32>) {
    softmax_lanes::<8>(l, sink)
}

/// The same code, 16 lanes wide, for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn softmax_avx512(l: &mut [f32], sink: Option<f32>) {
    softmax_lanes::<16>(l, sink)
}

/// `W` partial maxima and sums, so that the reductions vectorise without -ffast-math.
#[inline(always)]
fn softmax_lanes<const W: usize>(l: &mut [f32], sink: Option<f32>) {
    let mut mx = [f32::NEG_INFINITY; W];
    let mut chunks = l.chunks_exact(W);
    for c in &mut chunks {
        for k in 0..W {
            mx[k] = if c[k] > mx[k] { c[k] } else { mx[k] };
        }
    }
    let mut m = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m = mx.iter().copied().fold(m, f32::max);
    if let Some(sk) = sink {
        m = m.max(sk);
    }
    if !m.is_finite() {
        // nothing visible (or every logit -inf): no mass anywhere
        l.iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    let mut acc = [0.0f32; W];
    let mut chunks = l.chunks_exact_mut(W);
    for c in &mut chunks {
        for k in 0..W {
            c[k] = exp(c[k] - m);
            acc[k] += c[k];
        }
    }
    let mut sum: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = exp(*x - m);
        sum += *x;
    }
    sum += acc.iter().sum::<f32>();
    if let Some(sk) = sink {
        sum += exp(sk - m);
    }
    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    l.iter_mut().for_each(|x| *x *= inv);
}

/// `out = w * sum over j in sel of p[j] * val(cells[j])` (dv values, f16 rows).
#[inline]
pub fn weighted_sum<'a>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32]) {
    weighted_sum_with(crate::simd::level(), p, sel, w, cells, val, out)
}

/// [`weighted_sum`] at a chosen instruction-set level (lowered to what the CPU and dv allow).
pub fn weighted_sum_with<'a>(
    level: Level,
    p: &[f32],
    sel: &[u32],
    w: f32,
    cells: &[(i32, u32)],
    val: impl Fn(u32) -> &'a [f16],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let level = level.usable();
        let dv = out.len();
        if level >= Level::Avx512 && dv.is_multiple_of(16) && dv <= 256 {
            // SAFETY: AVX-512 F is present (`usable` checked it); dv fits the accumulators.
            return unsafe { weighted_sum_avx512(p, sel, w, cells, val, out) };
        }
        if level >= Level::Avx2 && dv.is_multiple_of(8) && dv <= 256 {
            // SAFETY: AVX2, FMA and F16C are present (`usable` checked them).
            return unsafe { weighted_sum_avx2(p, sel, w, cells, val, out) };
        }
        if level >= Level::Sse41 && dv.is_multiple_of(8) && dv <= 256 {
            // SAFETY: SSE4.1 is present (`usable` checked it); dv fits the accumulators.
            return unsafe { weighted_sum_sse41(p, sel, w, cells, val, out) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        let dv = out.len();
        if level.usable() == Level::Neon && dv.is_multiple_of(8) && dv <= 256 {
            // SAFETY: the CPU has NEON (`usable` checked it); dv fits the accumulators.
            return unsafe { weighted_sum_neon(p, sel, w, cells, val, out) };
        }
    }
    let _ = level;
    weighted_sum_portable(p, sel, w, cells, val, out)
}

/// The reference for [`weighted_sum`].
pub fn weighted_sum_portable<'a>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32]) {
    out.iter_mut().for_each(|x| *x = 0.0);
    let mut row = [0f32; ROW_PIECE];
    for &j in sel {
        add_row(p[j as usize] * w, val(cells[j as usize].1), out, &mut row);
    }
}

/// Values converted at a time by [`add_row`].
const ROW_PIECE: usize = 64;

/// `out[i] += pj * v[i]` over the shorter of the two, `v` converted to f32 a piece at a time
/// into `buf`: `half` converts a slice with the CPU's f16 instructions where it has them (F16C,
/// Arm's FP16), and the multiply-add loop then vectorises. The same bits as converting and
/// adding one value at a time (the conversion is exact), several times faster where there is
/// no SIMD kernel (the portable level, Arm's included).
#[inline]
fn add_row(pj: f32, v: &[f16], out: &mut [f32], buf: &mut [f32; ROW_PIECE]) {
    use half::slice::HalfFloatSliceExt;
    for (o, v) in out.chunks_mut(ROW_PIECE).zip(v.chunks(ROW_PIECE)) {
        let n = o.len().min(v.len());
        v[..n].convert_to_f32_slice(&mut buf[..n]);
        for (x, y) in o[..n].iter_mut().zip(&buf[..n]) {
            *x += pj * y;
        }
    }
}

/// Selected rows read ahead of the one being summed ([`prefetch_row`]), in the AVX2 kernels.
/// A chunk's selected rows are scattered over the value store, one cache miss each; without
/// reads ahead the sum waited on each in turn (about half of a 32768-deep 4-bit decode's time
/// on an AVX2-only Zen 3; with them and the union pass, decode there went 1.2 to 1.7 times
/// faster at 8192 and 32768 tokens). On the AVX-512 machine of earlier stops reads ahead
/// gave nothing, so its kernels have none. The SSE4.1 and NEON kernels read ahead as the AVX2
/// one does (the NEON one untimed: there is no Arm machine here).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const ROWS_AHEAD: usize = 16;

/// Ask for the cache lines of a row of `bytes` bytes from `at`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn prefetch_row(at: *const f16, bytes: usize) {
    let at = at as *const u8;
    let mut b = 0;
    while b < bytes {
        prefetch_line(at.wrapping_add(b));
        b += 64;
    }
    // the last line of a row that does not start on a line
    prefetch_line(at.wrapping_add(bytes.saturating_sub(1)));
}

/// Ask for the cache line that holds `p`. A prefetch is a hint and never faults; the rows'
/// addresses stay inside the row (or one past it for an empty one, which is not dereferenced
/// either).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_line(p: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: see above; SSE, which every x86-64 CPU has.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
}

/// [`prefetch_line`] for Arm: `prfm`, whose intrinsic is not stable in Rust.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn prefetch_line(p: *const u8) {
    // SAFETY: see the x86 version; it reads and writes no register but its address.
    unsafe { std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, preserves_flags, readonly)) }
}

/// Eight f16 values at `p` as two vectors of four f32. FCVTL and FCVTL2 (half to single) are
/// base Armv8 Advanced SIMD, but their intrinsic (`vcvt_f32_f16`) is not stable in Rust.
///
/// # Safety
/// Reads 16 bytes at `p`; NEON.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn f16x8_to_f32(p: *const f16) -> (std::arch::aarch64::float32x4_t, std::arch::aarch64::float32x4_t) {
    use std::arch::aarch64::*;
    let h = vld1q_u16(p as *const u16);
    let (lo, hi): (float32x4_t, float32x4_t);
    std::arch::asm!(
        "fcvtl {lo:v}.4s, {h:v}.4h",
        "fcvtl2 {hi:v}.4s, {h:v}.8h",
        h = in(vreg) h,
        lo = out(vreg) lo,
        hi = lateout(vreg) hi,
        options(pure, nomem, nostack, preserves_flags)
    );
    (lo, hi)
}

/// NEON: eight values a step (one 16-byte load, two conversions, two FMAs); rows read ahead as
/// in the AVX2 kernel. The same order of FMAs per value as the AVX2 kernel, so the same bits.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn weighted_sum_neon<'a>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32]) {
    // 64 values are 16 accumulators, which stay in the 32 registers
    match out.len() {
        64 => weighted_sum_neon_lanes::<8>(p, sel, w, cells, val, out, 8),
        dv => weighted_sum_neon_lanes::<32>(p, sel, w, cells, val, out, dv / 8),
    }
}

/// [`weighted_sum_neon`] with `pairs` (at most L) pairs of 4-value vectors a row.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_sum_neon_lanes<'a, const L: usize>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32], pairs: usize) {
    use std::arch::aarch64::*;
    assert!(pairs <= L && out.len() == pairs * 8);
    let mut acc = [[vdupq_n_f32(0.0); 2]; L];
    for (i, &j) in sel.iter().enumerate() {
        if let Some(&ahead) = sel.get(i + ROWS_AHEAD) {
            prefetch_row(val(cells[ahead as usize].1).as_ptr(), pairs * 16);
        }
        let pj = vdupq_n_f32(p[j as usize] * w);
        let row = val(cells[j as usize].1);
        assert!(row.len() >= pairs * 8);
        for (l, a) in acc.iter_mut().enumerate().take(pairs) {
            let (lo, hi) = f16x8_to_f32(row.as_ptr().add(l * 8));
            a[0] = vfmaq_f32(a[0], pj, lo);
            a[1] = vfmaq_f32(a[1], pj, hi);
        }
    }
    for (l, a) in acc.iter().enumerate().take(pairs) {
        vst1q_f32(out.as_mut_ptr().add(l * 8), a[0]);
        vst1q_f32(out.as_mut_ptr().add(l * 8 + 4), a[1]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_avx2<'a>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32]) {
    // the common row lengths get accumulators that stay in registers
    match out.len() {
        64 => weighted_sum_avx2_lanes::<8>(p, sel, w, cells, val, out, 8),
        128 => weighted_sum_avx2_lanes::<16>(p, sel, w, cells, val, out, 16),
        dv => weighted_sum_avx2_lanes::<32>(p, sel, w, cells, val, out, dv / 8),
    }
}

/// [`weighted_sum_avx2`] with `lanes` (at most L) vectors of 8 values a row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_sum_avx2_lanes<'a, const L: usize>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32], lanes: usize) {
    use std::arch::x86_64::*;
    assert!(lanes <= L && out.len() == lanes * 8);
    let mut acc = [_mm256_setzero_ps(); L];
    for (i, &j) in sel.iter().enumerate() {
        if let Some(&ahead) = sel.get(i + ROWS_AHEAD) {
            prefetch_row(val(cells[ahead as usize].1).as_ptr(), lanes * 16);
        }
        let pj = _mm256_set1_ps(p[j as usize] * w);
        let row = val(cells[j as usize].1);
        assert!(row.len() >= lanes * 8);
        let src = row.as_ptr() as *const __m128i;
        for (l, a) in acc.iter_mut().enumerate().take(lanes) {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(src.add(l)));
            *a = _mm256_fmadd_ps(pj, v, *a);
        }
    }
    for (l, a) in acc.iter().enumerate().take(lanes) {
        _mm256_storeu_ps(out.as_mut_ptr().add(l * 8), *a);
    }
}

/// 16 values a step: a 64-value row is four conversions and four FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn weighted_sum_avx512<'a>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let dv = out.len();
    let lanes = dv / 16;
    // up to 16 accumulators of 16 (dv <= 256, checked by the caller)
    let mut acc = [_mm512_setzero_ps(); 16];
    for &j in sel {
        let pj = _mm512_set1_ps(p[j as usize] * w);
        let row = val(cells[j as usize].1);
        assert!(row.len() >= dv);
        let src = row.as_ptr() as *const __m256i;
        for (l, a) in acc.iter_mut().enumerate().take(lanes) {
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(src.add(l)));
            *a = _mm512_fmadd_ps(pj, v, *a);
        }
    }
    for (l, a) in acc.iter().enumerate().take(lanes) {
        _mm512_storeu_ps(out.as_mut_ptr().add(l * 16), *a);
    }
}

/// SSE4.1: eight values a step (one 16-byte load, [`f16x8_to_f32_sse41`], a multiply and an
/// add per four: the portable sum's operations in its order, so its bits); rows read ahead as
/// in the AVX2 kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
unsafe fn weighted_sum_sse41<'a>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32]) {
    match out.len() {
        64 => weighted_sum_sse41_lanes::<8>(p, sel, w, cells, val, out, 8),
        dv => weighted_sum_sse41_lanes::<32>(p, sel, w, cells, val, out, dv / 8),
    }
}

/// [`weighted_sum_sse41`] with `pairs` (at most L) pairs of 4-value vectors a row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_sum_sse41_lanes<'a, const L: usize>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32], pairs: usize) {
    use std::arch::x86_64::*;
    assert!(pairs <= L && out.len() == pairs * 8);
    let mut acc = [[_mm_setzero_ps(); 2]; L];
    for (i, &j) in sel.iter().enumerate() {
        if let Some(&ahead) = sel.get(i + ROWS_AHEAD) {
            prefetch_row(val(cells[ahead as usize].1).as_ptr(), pairs * 16);
        }
        let pj = _mm_set1_ps(p[j as usize] * w);
        let row = val(cells[j as usize].1);
        assert!(row.len() >= pairs * 8);
        for (l, a) in acc.iter_mut().enumerate().take(pairs) {
            let (lo, hi) = f16x8_to_f32_sse41(row.as_ptr().add(l * 8));
            a[0] = _mm_add_ps(_mm_mul_ps(pj, lo), a[0]);
            a[1] = _mm_add_ps(_mm_mul_ps(pj, hi), a[1]);
        }
    }
    for (l, a) in acc.iter().enumerate().take(pairs) {
        _mm_storeu_ps(out.as_mut_ptr().add(l * 8), a[0]);
        _mm_storeu_ps(out.as_mut_ptr().add(l * 8 + 4), a[1]);
    }
}

/// The selection of one head and its value sum in one pass: the top-p set (`k_layer` None), or
/// the top `k_layer` tokens. `h` is the histogram of `p`. Writes dv outputs. The reference that
/// the decode's chunked sums ([`value_sums`]) and the GPU tier's are tested against.
#[allow(clippy::too_many_arguments)]
pub fn select_and_sum<'a>(
    p: &[f32],
    h: &Histogram,
    cells: &[(i32, u32)],
    a: Approx,
    k_layer: Option<usize>,
    top: &mut TopP,
    sel: &mut Vec<u32>,
    val: impl Fn(u32) -> &'a [f16],
    out: &mut [f32],
) {
    match k_layer {
        Some(k) => top.top_k_with(p, h, k, sel),
        None => {
            top.select_with(p, h, a.tau, sel);
        }
    }
    // as the union pass does it (`union_sum_with`): the plain weighted sum, then the mass
    // summed in index order scales it
    weighted_sum(p, sel, 1.0, cells, val, out);
    if a.renorm {
        let mass = sel.iter().map(|&j| p[j as usize] as f64).sum::<f64>();
        if mass > 0.0 {
            let w = (1.0 / mass) as f32;
            out.iter_mut().for_each(|x| *x *= w);
        }
    }
}

/// Most query heads whose value sums share one pass over their selections' union.
pub const UNION_HEADS: usize = 4;

/// Cells per chunk of the value sums. Each chunk's sum over the selected rows is one work item
/// of the decode's last step, so that the threads share the value reads evenly whatever the
/// head count; the chunks' partial sums are then added in chunk order, so the result has the
/// same bits on any number of threads.
pub const VALUE_CHUNK: usize = 1024;

/// Chunks of [`VALUE_CHUNK`] cells over n visible cells (at least one).
pub fn value_chunks(n: usize) -> usize {
    n.div_ceil(VALUE_CHUNK).max(1)
}

/// The cut of one head: its top-p set at `a.tau`, or its top `k_layer` tokens. `h` is the
/// histogram of `p`.
pub fn cut(p: &[f32], h: &Histogram, a: Approx, k_layer: Option<usize>, top: &mut TopP) -> Cut {
    match k_layer {
        Some(k) => top.cut_top_k_with(p, h, k),
        None => top.cut_with(p, h, a.tau).0,
    }
}

/// The probabilities of the query heads of one KV head over cells `first..` of their list:
/// head k's of cell j at `p[k * stride + j - first]`. The decode's value items pass only
/// their own chunk's (`first` its first cell), the other paths whole rows (`first` 0).
#[derive(Clone, Copy)]
pub struct HeadRows<'a> {
    pub p: &'a [f32],
    pub stride: usize,
    pub first: usize,
}

/// The partial value sums over chunk `c` (see [`VALUE_CHUNK`]) of the query heads of one KV
/// head, whose probabilities `rows` holds (at least over the chunk) and whose cuts are `cuts`:
/// `out[k * dv..]` = sum over the chunk's tokens j that head k's cut takes of
/// `p_k[j] * val(cells[j])`, `mass[k]` = sum of those p_k[j] (f64, in index order). With
/// AVX-512 and a row length of 64 or 128, or AVX2, SSE4.1 or NEON and 64, up to
/// [`UNION_HEADS`] (4, or 2 for 128) heads share one pass over their selections' union, which reads each value row once
/// for all of them: the rows are scattered over the value store and each read waits on
/// memory. Otherwise each head collects its tokens and sums them with [`weighted_sum`].
#[allow(clippy::too_many_arguments)]
pub fn chunk_sums<'a>(
    level: Level,
    rows: HeadRows,
    cuts: &[Cut],
    cells: &[(i32, u32)],
    c: usize,
    val: impl Fn(u32) -> &'a [f16],
    out: &mut [f32],
    mass: &mut [f64],
    sel: &mut Vec<u32>,
) {
    let (heads, n) = (cuts.len(), cells.len());
    let range = (c * VALUE_CHUNK).min(n)..((c + 1) * VALUE_CHUNK).min(n);
    assert!(heads > 0 && out.len().is_multiple_of(heads) && mass.len() == heads);
    assert!(range.start >= rows.first && range.end - rows.first <= rows.stride && (heads - 1) * rows.stride + range.end - rows.first <= rows.p.len());
    let dv = out.len() / heads;
    // from here the chunk's cells are numbered from 0, its probabilities and cuts with them
    let (at, len) = (range.start - rows.first, range.len());
    let p = |k: usize| &rows.p[k * rows.stride + at..k * rows.stride + at + len];
    let first = range.start;
    let cut = |k: usize| cuts[k].renumbered_from(first);
    let cells = &cells[range];
    let level = level.usable();
    let per = union_heads(level, dv);
    if per > 0 {
        let mut k0 = 0;
        while k0 < heads {
            let k1 = (k0 + per).min(heads);
            let mut picks = [Pick { p: &[], cut: Cut::NONE }; UNION_HEADS];
            for (k, pick) in (k0..k1).zip(picks.iter_mut()) {
                *pick = Pick { p: p(k), cut: cut(k) };
            }
            union_sum_range(level, &picks[..k1 - k0], cells, 0..len, &val, &mut out[k0 * dv..k1 * dv], &mut mass[k0..k1]);
            k0 = k1;
        }
        return;
    }
    for k in 0..heads {
        let pk = p(k);
        collect_cut(level, pk, cut(k), 0..len, sel);
        weighted_sum_with(level, pk, sel, 1.0, cells, &val, &mut out[k * dv..(k + 1) * dv]);
        mass[k] = sel.iter().map(|&j| pk[j as usize] as f64).sum();
    }
}

/// The tokens in `range` that `cut` takes, in order, into `sel`: 32 at a time as a bit mask
/// with SSE4.1, AVX2 or AVX-512, then one index per set bit.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_mut))]
fn collect_cut(level: Level, p: &[f32], cut: Cut, range: std::ops::Range<usize>, sel: &mut Vec<u32>) {
    assert!(range.end <= p.len());
    sel.clear();
    sel.reserve(range.len());
    let mut j = range.start;
    #[cfg(target_arch = "x86_64")]
    {
        let level = level.usable();
        while level >= Level::Sse41 && j + 32 <= range.end {
            // SAFETY: the CPU has the level's features (`usable`); j + 32 <= p.len().
            let mut m = unsafe {
                if level >= Level::Avx512 {
                    take_mask32(p, j, cut)
                } else if level >= Level::Avx2 {
                    take_mask32_avx2(p, j, cut)
                } else {
                    take_mask32_sse41(p, j, cut)
                }
            };
            while m != 0 {
                sel.push((j + m.trailing_zeros() as usize) as u32);
                m &= m - 1;
            }
            j += 32;
        }
    }
    sel.extend((j..range.end).filter(|&i| cut.takes_p(i, p[i])).map(|i| i as u32));
}

/// One query head's output from its partial sums (`parts`: each chunk's dv sums and mass, in
/// chunk order): their sum, divided by the selected mass with `renorm`.
pub fn finish_sums<'a>(parts: impl Iterator<Item = (&'a [f32], f64)>, renorm: bool, out: &mut [f32]) {
    out.iter_mut().for_each(|x| *x = 0.0);
    let mut mass = 0.0f64;
    for (o, m) in parts {
        out.iter_mut().zip(o).for_each(|(x, y)| *x += y);
        mass += m;
    }
    if renorm && mass > 0.0 {
        let w = (1.0 / mass) as f32;
        out.iter_mut().for_each(|x| *x *= w);
    }
}

/// The value sums of the query heads of one KV head (`probs` and `cuts` as [`chunk_sums`]
/// takes them), chunk by chunk and then finished ([`finish_sums`]) as the decode's split
/// steps do them, so that one thread gives the bits that several give. `parts` and
/// `part_mass` are scratch.
#[allow(clippy::too_many_arguments)]
pub fn value_sums<'a>(
    level: Level,
    probs: &[f32],
    cuts: &[Cut],
    cells: &[(i32, u32)],
    renorm: bool,
    val: impl Fn(u32) -> &'a [f16],
    out: &mut [f32],
    parts: &mut Vec<f32>,
    part_mass: &mut Vec<f64>,
    sel: &mut Vec<u32>,
) {
    let (heads, chunks) = (cuts.len(), value_chunks(cells.len()));
    let dv = out.len() / heads;
    parts.resize(chunks * heads * dv, 0.0);
    part_mass.resize(chunks * heads, 0.0);
    for c in 0..chunks {
        let (o, m) = (&mut parts[c * heads * dv..(c + 1) * heads * dv], &mut part_mass[c * heads..(c + 1) * heads]);
        chunk_sums(level, HeadRows { p: probs, stride: cells.len(), first: 0 }, cuts, cells, c, &val, o, m, sel);
    }
    for k in 0..heads {
        let parts = (0..chunks).map(|c| (&parts[(c * heads + k) * dv..(c * heads + k + 1) * dv], part_mass[c * heads + k]));
        finish_sums(parts, renorm, &mut out[k * dv..(k + 1) * dv]);
    }
}

/// One head's share of a union value sum: its probabilities and its cut.
#[derive(Clone, Copy)]
pub struct Pick<'a> {
    pub p: &'a [f32],
    pub cut: Cut,
}

/// For each pick k: `out[k * dv..]` = sum over the tokens j its cut takes of
/// `p[j] * val(cells[j])`, and `mass[k]` = sum of those p[j] (f64, in index order).
/// Each value row is read once however many picks take it.
pub fn union_sum_with<'a>(level: Level, picks: &[Pick], cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32], mass: &mut [f64]) {
    union_sum_range(level, picks, cells, 0..cells.len(), val, out, mass)
}

/// [`union_sum_with`] over the tokens in `range` only.
pub fn union_sum_range<'a>(
    level: Level,
    picks: &[Pick],
    cells: &[(i32, u32)],
    range: std::ops::Range<usize>,
    val: impl Fn(u32) -> &'a [f16],
    out: &mut [f32],
    mass: &mut [f64],
) {
    let (heads, n) = (picks.len(), cells.len());
    assert!(heads > 0 && out.len().is_multiple_of(heads) && mass.len() == heads && range.end <= n);
    assert!(picks.iter().all(|k| k.p.len() >= n));
    #[cfg(target_arch = "x86_64")]
    {
        let dv = out.len() / heads;
        let level = level.usable();
        if level >= Level::Avx512 && heads <= union_heads(Level::Avx512, dv) {
            // SAFETY: AVX-512 is present (`usable` checked it); lengths were checked above.
            return unsafe { union_sum_avx512(picks, cells, range, val, out, mass) };
        }
        if level >= Level::Avx2 && heads <= union_heads(Level::Avx2, dv) {
            // SAFETY: AVX2, FMA and F16C are present (`usable` checked them); lengths were
            // checked above.
            return unsafe { union_sum_avx2(picks, cells, range, val, out, mass) };
        }
        if level >= Level::Sse41 && heads <= union_heads(Level::Sse41, dv) {
            // SAFETY: SSE4.1 is present (`usable` checked it); lengths were checked above.
            return unsafe { union_sum_sse41(picks, cells, range, val, out, mass) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    if level.usable() == Level::Neon && heads <= union_heads(Level::Neon, out.len() / heads) {
        // SAFETY: the CPU has NEON (`usable` checked it); lengths were checked above.
        return unsafe { union_sum_neon(picks, cells, range, val, out, mass) };
    }
    let _ = level;
    union_sum_portable(picks, cells, range, val, out, mass)
}

/// The reference for [`union_sum_range`].
pub fn union_sum_portable<'a>(picks: &[Pick], cells: &[(i32, u32)], range: std::ops::Range<usize>, val: impl Fn(u32) -> &'a [f16], out: &mut [f32], mass: &mut [f64]) {
    let dv = out.len() / picks.len();
    out.iter_mut().for_each(|x| *x = 0.0);
    mass.iter_mut().for_each(|m| *m = 0.0);
    let mut row = [0f32; ROW_PIECE];
    for j in range {
        let c = cells[j].1;
        for (k, pk) in picks.iter().enumerate() {
            if pk.cut.takes_p(j, pk.p[j]) {
                mass[k] += pk.p[j] as f64;
                add_row(pk.p[j], val(c), &mut out[k * dv..(k + 1) * dv], &mut row);
            }
        }
    }
}

/// Most heads the union kernel of `level` (the CPU's, lowered to what it has) sums in one
/// pass for rows of `dv` values; 0 where the level has none for that dv.
fn union_heads(level: Level, dv: usize) -> usize {
    match (level.usable(), dv) {
        (Level::Avx512 | Level::Avx2 | Level::Sse41 | Level::Neon, 64) => UNION_HEADS,
        (Level::Avx512, 128) => 2,
        _ => 0,
    }
}

/// [`union_sum_range`] for AVX2 and rows of 64 values, dispatched by the number of picks. The
/// caller checked [`union_heads`] and the lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn union_sum_avx2<'a>(picks: &[Pick], cells: &[(i32, u32)], range: std::ops::Range<usize>, val: impl Fn(u32) -> &'a [f16], out: &mut [f32], mass: &mut [f64]) {
    match picks.len() {
        1 => union_sum_avx2_k::<1>(picks, cells, range, val, out, mass),
        2 => union_sum_avx2_k::<2>(picks, cells, range, val, out, mass),
        3 => union_sum_avx2_k::<3>(picks, cells, range, val, out, mass),
        _ => union_sum_avx2_k::<4>(picks, cells, range, val, out, mass),
    }
}

/// The tokens `from..to` (at most [`VALUE_CHUNK`]) that any of the `G` picks takes, in order,
/// into `list`, each as (token - from) << 4 | the picks that take it (bit k for pick k);
/// returns how many. `mask(p, i, cut)` gives the cut's bit mask of the 32 tokens from i (a
/// SIMD [`take_mask32`]); a last run of fewer than 32 is tested a token at a time.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
fn union_list<const G: usize>(picks: &[Pick], from: usize, to: usize, mask: impl Fn(&[f32], usize, Cut) -> u32, list: &mut [u32; VALUE_CHUNK]) -> usize {
    let mut listed = 0;
    let mut i = from;
    while i < to {
        let mut take = [0u32; G];
        for (t, pk) in take.iter_mut().zip(picks) {
            if i + 32 <= to {
                *t = mask(pk.p, i, pk.cut);
            } else {
                for j in i..to {
                    *t |= (pk.cut.takes_p(j, pk.p[j]) as u32) << (j - i);
                }
            }
        }
        let mut union = take.iter().fold(0, |u, t| u | t);
        while union != 0 {
            let z = union.trailing_zeros();
            union &= union - 1;
            let by = take.iter().enumerate().fold(0, |b, (k, t)| b | ((t >> z) & 1) << k);
            list[listed] = ((i - from + z as usize) as u32) << 4 | by;
            listed += 1;
        }
        i += 32;
    }
    listed
}

/// `G` picks, rows of 64 values, [`VALUE_CHUNK`] tokens at a time: first the picks' cuts as
/// bit masks ([`take_mask32_avx2`]) into one list of (token, the picks that take it), then
/// each listed row read once, [`ROWS_AHEAD`] rows after its read was asked for, converted
/// once and added into each pick that takes it. Each pick's sums are the FMAs that
/// [`weighted_sum`] does for its own list, in the same order: the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn union_sum_avx2_k<'a, const G: usize>(picks: &[Pick], cells: &[(i32, u32)], range: std::ops::Range<usize>, val: impl Fn(u32) -> &'a [f16], out: &mut [f32], mass: &mut [f64]) {
    use std::arch::x86_64::*;
    const L: usize = 8;
    let n = range.end;
    assert!(picks.len() == G && G <= 4 && out.len() == G * 8 * L && mass.len() == G && n <= cells.len());
    assert!(picks.iter().all(|k| k.p.len() >= n));
    let mut acc = [[_mm256_setzero_ps(); L]; G];
    let mut m = [0f64; G];
    let mut list = [0u32; VALUE_CHUNK];
    let mut from = range.start;
    while from < n {
        let to = (from + VALUE_CHUNK).min(n);
        // SAFETY: the CPU has AVX2 (this function's features); `union_list` asks only for
        // whole runs of 32 tokens inside the picks' probabilities.
        let listed = union_list::<G>(picks, from, to, |p, i, cut| unsafe { take_mask32_avx2(p, i, cut) }, &mut list);
        let row_of = |e: u32| val(cells[from + (e >> 4) as usize].1);
        for x in 0..listed {
            if x + ROWS_AHEAD < listed {
                prefetch_row(row_of(list[x + ROWS_AHEAD]).as_ptr(), 8 * L * 2);
            }
            let (e, j) = (list[x], from + (list[x] >> 4) as usize);
            let row = row_of(e);
            assert!(row.len() >= 8 * L);
            let src = row.as_ptr() as *const __m128i;
            let mut v = [_mm256_setzero_ps(); L];
            for (l, v) in v.iter_mut().enumerate() {
                *v = _mm256_cvtph_ps(_mm_loadu_si128(src.add(l)));
            }
            for k in 0..G {
                if (e >> k) & 1 != 0 {
                    let pj = picks[k].p[j];
                    m[k] += pj as f64;
                    let w = _mm256_set1_ps(pj);
                    for (a, v) in acc[k].iter_mut().zip(&v) {
                        *a = _mm256_fmadd_ps(w, *v, *a);
                    }
                }
            }
        }
        from = to;
    }
    for (k, a) in acc.iter().enumerate() {
        for (l, v) in a.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add((k * L + l) * 8), *v);
        }
    }
    mass.copy_from_slice(&m);
}

/// [`union_sum_range`] for SSE4.1 and rows of 64 values, dispatched by the number of picks.
/// The caller checked [`union_heads`] and the lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
unsafe fn union_sum_sse41<'a>(picks: &[Pick], cells: &[(i32, u32)], range: std::ops::Range<usize>, val: impl Fn(u32) -> &'a [f16], out: &mut [f32], mass: &mut [f64]) {
    match picks.len() {
        1 => union_sum_sse41_k::<1>(picks, cells, range, val, out, mass),
        2 => union_sum_sse41_k::<2>(picks, cells, range, val, out, mass),
        3 => union_sum_sse41_k::<3>(picks, cells, range, val, out, mass),
        _ => union_sum_sse41_k::<4>(picks, cells, range, val, out, mass),
    }
}

/// The AVX2 union kernel ([`union_sum_avx2_k`]) in SSE4.1: the same list of (token, picks),
/// each listed row read once ([`ROWS_AHEAD`] rows after its read was asked for), converted once
/// ([`f16x8_to_f32_sse41`]) and added into each pick that takes it, with the multiplies and
/// adds of [`weighted_sum_sse41`] in the same order: the same bits as each pick's own sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
unsafe fn union_sum_sse41_k<'a, const G: usize>(picks: &[Pick], cells: &[(i32, u32)], range: std::ops::Range<usize>, val: impl Fn(u32) -> &'a [f16], out: &mut [f32], mass: &mut [f64]) {
    use std::arch::x86_64::*;
    // vectors of 4 values in a row of 64
    const L: usize = 16;
    let n = range.end;
    assert!(picks.len() == G && G <= 4 && out.len() == G * 4 * L && mass.len() == G && n <= cells.len());
    assert!(picks.iter().all(|k| k.p.len() >= n));
    let mut acc = [[_mm_setzero_ps(); L]; G];
    let mut m = [0f64; G];
    let mut list = [0u32; VALUE_CHUNK];
    let mut from = range.start;
    while from < n {
        let to = (from + VALUE_CHUNK).min(n);
        // SAFETY: the CPU has SSE4.1 (this function's features); `union_list` asks only for
        // whole runs of 32 tokens inside the picks' probabilities.
        let listed = union_list::<G>(picks, from, to, |p, i, cut| unsafe { take_mask32_sse41(p, i, cut) }, &mut list);
        let row_of = |e: u32| val(cells[from + (e >> 4) as usize].1);
        for x in 0..listed {
            if x + ROWS_AHEAD < listed {
                prefetch_row(row_of(list[x + ROWS_AHEAD]).as_ptr(), 4 * L * 2);
            }
            let (e, j) = (list[x], from + (list[x] >> 4) as usize);
            let row = row_of(e);
            assert!(row.len() >= 4 * L);
            let mut v = [_mm_setzero_ps(); L];
            for (l, pair) in v.chunks_exact_mut(2).enumerate() {
                (pair[0], pair[1]) = f16x8_to_f32_sse41(row.as_ptr().add(l * 8));
            }
            for k in 0..G {
                if (e >> k) & 1 != 0 {
                    let pj = picks[k].p[j];
                    m[k] += pj as f64;
                    let w = _mm_set1_ps(pj);
                    for (a, v) in acc[k].iter_mut().zip(&v) {
                        *a = _mm_add_ps(_mm_mul_ps(w, *v), *a);
                    }
                }
            }
        }
        from = to;
    }
    for (k, a) in acc.iter().enumerate() {
        for (l, v) in a.iter().enumerate() {
            _mm_storeu_ps(out.as_mut_ptr().add((k * L + l) * 4), *v);
        }
    }
    mass.copy_from_slice(&m);
}

/// [`take_mask32_avx2`] with SSE4.1: 4 lanes a compare, signed compares on keys and indices
/// with their top bit flipped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
#[inline]
unsafe fn take_mask32_sse41(p: &[f32], at: usize, cut: Cut) -> u32 {
    use std::arch::x86_64::*;
    assert!(at + 32 <= p.len() && p.len() <= i32::MAX as usize);
    if cut == Cut::NONE {
        return 0;
    }
    let top = _mm_set1_epi32(i32::MIN);
    let (ck, ci) = (_mm_set1_epi32((cut.key() ^ 0x8000_0000) as i32), _mm_set1_epi32((cut.index() ^ 0x8000_0000) as i32));
    let iota = _mm_setr_epi32(0, 1, 2, 3);
    let mut take = 0u32;
    for part in 0..8 {
        let from = at + 4 * part;
        let b = _mm_loadu_si128(p.as_ptr().add(from) as *const __m128i);
        // the total_cmp key, top bit flipped (see `take_mask32_avx2`)
        let key = _mm_xor_si128(b, _mm_srli_epi32(_mm_srai_epi32(b, 31), 1));
        let idx = _mm_xor_si128(_mm_add_epi32(_mm_set1_epi32(from as i32), iota), top);
        let above = _mm_cmpgt_epi32(key, ck);
        let tie = _mm_andnot_si128(_mm_cmpgt_epi32(idx, ci), _mm_cmpeq_epi32(key, ck));
        take |= (_mm_movemask_ps(_mm_castsi128_ps(_mm_or_si128(above, tie))) as u32) << (4 * part);
    }
    take
}

/// [`union_sum_range`] for NEON and rows of 64 values, dispatched by the number of picks. The
/// caller checked [`union_heads`] and the lengths.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn union_sum_neon<'a>(picks: &[Pick], cells: &[(i32, u32)], range: std::ops::Range<usize>, val: impl Fn(u32) -> &'a [f16], out: &mut [f32], mass: &mut [f64]) {
    match picks.len() {
        1 => union_sum_neon_k::<1>(picks, cells, range, val, out, mass),
        2 => union_sum_neon_k::<2>(picks, cells, range, val, out, mass),
        3 => union_sum_neon_k::<3>(picks, cells, range, val, out, mass),
        _ => union_sum_neon_k::<4>(picks, cells, range, val, out, mass),
    }
}

/// The AVX2 union kernel ([`union_sum_avx2_k`]) in NEON: the same list of (token, picks), each
/// listed row read once ([`ROWS_AHEAD`] rows after its read was asked for), converted once
/// ([`f16x8_to_f32`]) and added into each pick that takes it, with the FMAs of
/// [`weighted_sum_neon`] in the same order: the same bits as each pick's own sum.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn union_sum_neon_k<'a, const G: usize>(picks: &[Pick], cells: &[(i32, u32)], range: std::ops::Range<usize>, val: impl Fn(u32) -> &'a [f16], out: &mut [f32], mass: &mut [f64]) {
    use std::arch::aarch64::*;
    // vectors of 4 values in a row of 64
    const L: usize = 16;
    let n = range.end;
    assert!(picks.len() == G && G <= 4 && out.len() == G * 4 * L && mass.len() == G && n <= cells.len());
    assert!(picks.iter().all(|k| k.p.len() >= n));
    let mut acc = [[vdupq_n_f32(0.0); L]; G];
    let mut m = [0f64; G];
    let mut list = [0u32; VALUE_CHUNK];
    let mut from = range.start;
    while from < n {
        let to = (from + VALUE_CHUNK).min(n);
        // SAFETY: the CPU has NEON (this function's feature); `union_list` asks only for whole
        // runs of 32 tokens inside the picks' probabilities.
        let listed = union_list::<G>(picks, from, to, |p, i, cut| unsafe { take_mask32_neon(p, i, cut) }, &mut list);
        let row_of = |e: u32| val(cells[from + (e >> 4) as usize].1);
        for x in 0..listed {
            if x + ROWS_AHEAD < listed {
                prefetch_row(row_of(list[x + ROWS_AHEAD]).as_ptr(), 4 * L * 2);
            }
            let (e, j) = (list[x], from + (list[x] >> 4) as usize);
            let row = row_of(e);
            assert!(row.len() >= 4 * L);
            let mut v = [vdupq_n_f32(0.0); L];
            for (l, pair) in v.chunks_exact_mut(2).enumerate() {
                (pair[0], pair[1]) = f16x8_to_f32(row.as_ptr().add(l * 8));
            }
            for k in 0..G {
                if (e >> k) & 1 != 0 {
                    let pj = picks[k].p[j];
                    m[k] += pj as f64;
                    let w = vdupq_n_f32(pj);
                    for (a, v) in acc[k].iter_mut().zip(&v) {
                        *a = vfmaq_f32(*a, w, *v);
                    }
                }
            }
        }
        from = to;
    }
    for (k, a) in acc.iter().enumerate() {
        for (l, v) in a.iter().enumerate() {
            vst1q_f32(out.as_mut_ptr().add((k * L + l) * 4), *v);
        }
    }
    mass.copy_from_slice(&m);
}

/// [`take_mask32`] with NEON: 4 lanes a compare (unsigned compares, as AVX-512 has); the lanes'
/// bits are gathered by weighting them 1, 2, 4, 8 and adding across the vector.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[inline]
unsafe fn take_mask32_neon(p: &[f32], at: usize, cut: Cut) -> u32 {
    use std::arch::aarch64::*;
    assert!(at + 32 <= p.len() && p.len() <= u32::MAX as usize);
    if cut == Cut::NONE {
        return 0;
    }
    let (ck, ci) = (vdupq_n_u32(cut.key()), vdupq_n_u32(cut.index()));
    let top = vdupq_n_u32(0x8000_0000);
    let weights: [u32; 4] = [1, 2, 4, 8];
    let (bits, iota) = (vld1q_u32(weights.as_ptr()), vld1q_u32([0u32, 1, 2, 3].as_ptr()));
    let mut take = 0u32;
    for part in 0..8 {
        let from = at + 4 * part;
        let b = vreinterpretq_u32_f32(vld1q_f32(p.as_ptr().add(from)));
        // the total_cmp key: the sign bit set on a positive value, every bit flipped on a
        // negative one
        let sign = vreinterpretq_u32_s32(vshrq_n_s32::<31>(vreinterpretq_s32_u32(b)));
        let key = veorq_u32(b, vorrq_u32(sign, top));
        let idx = vaddq_u32(vdupq_n_u32(from as u32), iota);
        let above = vcgtq_u32(key, ck);
        let tie = vandq_u32(vceqq_u32(key, ck), vcleq_u32(idx, ci));
        take |= vaddvq_u32(vandq_u32(vorrq_u32(above, tie), bits)) << (4 * part);
    }
    take
}

/// [`union_sum_range`] for AVX-512, dispatched to a kernel whose accumulators are all in
/// registers. The caller checked [`union_heads`] and the lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn union_sum_avx512<'a>(picks: &[Pick], cells: &[(i32, u32)], range: std::ops::Range<usize>, val: impl Fn(u32) -> &'a [f16], out: &mut [f32], mass: &mut [f64]) {
    match (picks.len(), out.len() / picks.len()) {
        (1, 64) => union_sum_avx512_k::<1, 4>(picks, cells, range, val, out, mass),
        (2, 64) => union_sum_avx512_k::<2, 4>(picks, cells, range, val, out, mass),
        (3, 64) => union_sum_avx512_k::<3, 4>(picks, cells, range, val, out, mass),
        (4, 64) => union_sum_avx512_k::<4, 4>(picks, cells, range, val, out, mass),
        (1, 128) => union_sum_avx512_k::<1, 8>(picks, cells, range, val, out, mass),
        _ => union_sum_avx512_k::<2, 8>(picks, cells, range, val, out, mass),
    }
}

/// Which of the 32 tokens from `at` the cut takes, bit j for token `at + j`: the
/// probabilities' order keys compared with the boundary's (16 lanes a compare), as
/// [`Cut::takes_p`] decides one by one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn take_mask32(p: &[f32], at: usize, cut: Cut) -> u32 {
    use std::arch::x86_64::*;
    assert!(at + 32 <= p.len());
    if cut == Cut::NONE {
        return 0;
    }
    let (ck, ci) = (_mm512_set1_epi32(cut.key() as i32), _mm512_set1_epi32(cut.index() as i32));
    let top = _mm512_set1_epi32(i32::MIN);
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut take = 0u32;
    for half in 0..2 {
        let from = at + 16 * half;
        let b = _mm512_loadu_si512(p.as_ptr().add(from) as *const _);
        // the total_cmp key: the sign bit set on a positive value, every bit flipped on a negative one
        let key = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), top));
        let idx = _mm512_add_epi32(_mm512_set1_epi32(from as i32), iota);
        let above = _mm512_cmpgt_epu32_mask(key, ck);
        let tie = _mm512_cmpeq_epi32_mask(key, ck) & _mm512_cmple_epu32_mask(idx, ci);
        take |= ((above | tie) as u32) << (16 * half);
    }
    take
}

/// [`take_mask32`] with AVX2: 8 lanes a compare. AVX2 compares signed, so keys and indices
/// are compared with their top bit flipped, which orders them as unsigned.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn take_mask32_avx2(p: &[f32], at: usize, cut: Cut) -> u32 {
    use std::arch::x86_64::*;
    assert!(at + 32 <= p.len() && p.len() <= i32::MAX as usize);
    if cut == Cut::NONE {
        return 0;
    }
    let top = _mm256_set1_epi32(i32::MIN);
    let (ck, ci) = (_mm256_set1_epi32((cut.key() ^ 0x8000_0000) as i32), _mm256_set1_epi32((cut.index() ^ 0x8000_0000) as i32));
    let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut take = 0u32;
    for part in 0..4 {
        let from = at + 8 * part;
        let b = _mm256_loadu_si256(p.as_ptr().add(from) as *const __m256i);
        // the total_cmp key, top bit flipped: the bits of a positive value, every bit but the
        // top one flipped on a negative one
        let key = _mm256_xor_si256(b, _mm256_srli_epi32(_mm256_srai_epi32(b, 31), 1));
        let idx = _mm256_xor_si256(_mm256_add_epi32(_mm256_set1_epi32(from as i32), iota), top);
        let above = _mm256_cmpgt_epi32(key, ck);
        let tie = _mm256_andnot_si256(_mm256_cmpgt_epi32(idx, ci), _mm256_cmpeq_epi32(key, ck));
        take |= (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(above, tie))) as u32) << (8 * part);
    }
    take
}

/// `G` picks, `L` vectors of 16 values a row. 32 tokens a step: each pick's cut as a bit mask
/// ([`take_mask32`]), then every token in the masks' union: its row converted once and added
/// into each pick that takes it (a masked FMA, so that a pick that does not take the row is
/// not touched even by a non-finite value).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn union_sum_avx512_k<'a, const G: usize, const L: usize>(
    picks: &[Pick],
    cells: &[(i32, u32)],
    range: std::ops::Range<usize>,
    val: impl Fn(u32) -> &'a [f16],
    out: &mut [f32],
    mass: &mut [f64],
) {
    use std::arch::x86_64::*;
    let n = range.end;
    let dv = 16 * L;
    assert!(picks.len() == G && out.len() == G * dv && mass.len() == G && n <= cells.len());
    let mut acc = [[_mm512_setzero_ps(); L]; G];
    let mut m = [0f64; G];
    let mut take = [0u32; G];
    let mut i = range.start;
    while i < n {
        let mut union = 0u32;
        for (k, pk) in picks.iter().enumerate() {
            let mut t = 0u32;
            if i + 32 <= n {
                t = take_mask32(pk.p, i, pk.cut);
            } else {
                for j in i..n {
                    t |= (pk.cut.takes_p(j, pk.p[j]) as u32) << (j - i);
                }
            }
            take[k] = t;
            union |= t;
        }
        while union != 0 {
            let z = union.trailing_zeros();
            union &= union - 1;
            let j = i + z as usize;
            let row = val(cells[j].1);
            assert!(row.len() >= dv);
            let src = row.as_ptr() as *const __m256i;
            let mut w = [_mm512_setzero_ps(); G];
            let mut on = [0u16; G];
            for k in 0..G {
                let pj = picks[k].p[j];
                let taken = (take[k] >> z) & 1;
                // adding 0 keeps the f64 sum what it is over the taken tokens alone
                m[k] += if taken != 0 { pj as f64 } else { 0.0 };
                w[k] = _mm512_set1_ps(pj);
                on[k] = 0u16.wrapping_sub(taken as u16);
            }
            #[allow(clippy::needless_range_loop)] // acc is indexed [k][l], the loop runs l
            for l in 0..L {
                let v = _mm512_cvtph_ps(_mm256_loadu_si256(src.add(l)));
                for k in 0..G {
                    acc[k][l] = _mm512_mask3_fmadd_ps(w[k], v, acc[k][l], on[k]);
                }
            }
        }
        i += 32;
    }
    for (k, a) in acc.iter().enumerate() {
        for (l, v) in a.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(k * dv + l * 16), *v);
        }
    }
    mass.copy_from_slice(&m);
}

/// All of HCAttention for one query token and the KV heads in `kv_heads` (all of a layer's
/// with `layer_k`). `q(h)` gives query head h (f32, dk), `val(cell, kvh)` a value row,
/// `out(kvh)` the g * dv outputs of a group.
///
/// # Safety
/// No thread writes the keys of these cells during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn approximate<'a>(
    keys: &KeyStore,
    kv_heads: std::ops::Range<usize>,
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    q: impl Fn(usize) -> &'a [f32],
    val: impl Fn(u32, usize) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    a: Approx,
    s: &mut ApproxScratch,
    mut out: impl FnMut(usize) -> &'a mut [f32],
) {
    let n = cells.len();
    let heads = kv_heads.len() * g;
    let mut probs = std::mem::take(&mut s.probs);
    probs.resize(heads * n, 0.0);
    if s.hists.len() < heads {
        s.hists.resize_with(heads, Histogram::default);
    }
    s.ks.clear();
    let with_levels = keys.has_levels();
    let (mut lv, mut raw) = (std::mem::take(&mut s.levels), std::mem::take(&mut s.raw));
    if with_levels {
        lv.resize(heads * n, 0);
        raw.resize(heads * n, 0.0);
        if s.heads.len() < heads {
            s.heads.resize_with(heads, HeadLevels::default);
        }
    }
    for (i, kvh) in kv_heads.clone().enumerate() {
        let p = &mut probs[i * g * n..(i + 1) * g * n];
        if with_levels {
            let mut bs = std::mem::take(&mut s.bias_step);
            bs.resize(g, (0.0, 0.0));
            let (l, r) = (&mut lv[i * g * n..(i + 1) * g * n], &mut raw[i * g * n..(i + 1) * g * n]);
            levels(keys, kvh, g, dk, cells, |h| q(kvh * g + h), s, l, r, n, &mut bs);
            for h in 0..g {
                let (l, r, (bias, step)) = (&l[h * n..(h + 1) * n], &r[h * n..(h + 1) * n], bs[h]);
                let sink = sinks.map(|x| x[kvh * g + h]);
                // one chunk: the same counts, so the same bits, as the decode's split into several
                let head = &mut s.heads[i * g + h];
                softmax_in_chunks(crate::simd::level(), l, r, bias, step, scale, sink, n.max(1), head, &mut s.chunk_scratch, &mut p[h * n..(h + 1) * n]);
                if a.layer_k {
                    s.ks.push(head.count_top_p(a.tau));
                }
            }
            s.bias_step = bs;
        } else {
            logits(keys, kvh, g, dk, cells, |h| q(kvh * g + h), scale, s, p, n);
            for h in 0..g {
                let l = &mut p[h * n..(h + 1) * n];
                softmax(l, sinks.map(|x| x[kvh * g + h]));
                s.hists[i * g + h].build(l);
                if a.layer_k {
                    s.ks.push(s.top.count_with(l, &s.hists[i * g + h], a.tau));
                }
            }
        }
    }
    let k_layer = a.layer_k.then(|| layer_k(&s.ks, n));
    let mut cuts = std::mem::take(&mut s.cuts);
    cuts.clear();
    for i in 0..heads {
        cuts.push(if with_levels {
            let (head, l) = (&s.heads[i], std::iter::once((0, &lv[i * n..(i + 1) * n])));
            match k_layer {
                Some(k) => head.cut_top_k(k, l),
                None => head.cut_top_p(a.tau, l),
            }
        } else {
            cut(&probs[i * n..(i + 1) * n], &s.hists[i], a, k_layer, &mut s.top)
        });
    }
    (s.levels, s.raw) = (lv, raw);
    for (i, kvh) in kv_heads.enumerate() {
        let (p, c) = (&probs[i * g * n..(i + 1) * g * n], &cuts[i * g..(i + 1) * g]);
        let o = &mut out(kvh)[..g * dv];
        value_sums(crate::simd::level(), p, c, cells, a.renorm, |c| val(c, kvh), o, &mut s.parts, &mut s.part_mass, &mut s.sel);
    }
    s.cuts = cuts;
    s.probs = probs;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_value_sum_equals_the_portable_one() {
        let mut seed = 5u64;
        let mut r = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for dv in [8, 16, 64, 128, 256, 24, 48] {
            let n = 50;
            let rows: Vec<Vec<f16>> = (0..n).map(|_| (0..dv).map(|_| f16::from_f32(r() * 4.0)).collect()).collect();
            let p: Vec<f32> = (0..n).map(|_| r().abs()).collect();
            let cells: Vec<(i32, u32)> = (0..n as u32).map(|c| (c as i32, (c * 7) % n as u32)).collect();
            let sel: Vec<u32> = (0..n as u32).filter(|j| j % 3 != 1).collect();
            let mut a = vec![0f32; dv];
            weighted_sum_portable(&p, &sel, 1.5, &cells, |c| &rows[c as usize], &mut a);
            for level in Level::ALL {
                let mut b = vec![9f32; dv];
                weighted_sum_with(level, &p, &sel, 1.5, &cells, |c| &rows[c as usize], &mut b);
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "dv {dv} at {:?}: {x} vs {y}", level.usable());
                }
            }
        }
    }

    /// Attention-like probabilities of n tokens from a seed.
    fn probs(n: usize, seed: &mut u64) -> Vec<f32> {
        let mut l: Vec<f32> = (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (*seed >> 40) as f32 / (1u64 << 24) as f32;
                // a few strong tokens over a tail, and coarse values for ties
                if u < 0.02 { 8.0 } else { (u * 24.0).floor() / 4.0 }
            })
            .collect();
        softmax_with(Level::Portable, &mut l, None);
        l
    }

    #[test]
    fn union_value_sums_equal_one_sum_per_head() {
        let mut seed = 77u64;
        for (heads, dv, n) in [(2usize, 64usize, 1000usize), (3, 64, 4099), (4, 64, 31), (3, 32, 700), (4, 48, 97), (1, 64, 300), (2, 128, 515), (1, 128, 40)] {
            let rows: Vec<Vec<f16>> = (0..n).map(|c| (0..heads.max(1) * dv).map(|d| f16::from_f32(((c * 31 + d * 7) % 97) as f32 / 50.0 - 1.0)).collect()).collect();
            let cells: Vec<(i32, u32)> = (0..n as u32).map(|c| (c as i32, (c * 13) % n as u32)).collect();
            let ps: Vec<Vec<f32>> = (0..heads).map(|_| probs(n, &mut seed)).collect();
            let mut hists: Vec<Histogram> = (0..heads).map(|_| Histogram::default()).collect();
            for (h, p) in hists.iter_mut().zip(&ps) {
                h.build(p);
            }
            for k_layer in [None, Some(n / 5 + 1), Some(0), Some(n)] {
                let mut top = TopP::at(Level::Portable);
                let picks: Vec<Pick> = (0..heads)
                    .map(|k| {
                        let cut = match k_layer {
                            Some(kl) => top.cut_top_k_with(&ps[k], &hists[k], kl),
                            None => top.cut_with(&ps[k], &hists[k], 0.9).0,
                        };
                        Pick { p: &ps[k], cut }
                    })
                    .collect();
                // the reference: each head's list, then its own sum
                let mut want = vec![0f32; heads * dv];
                let mut want_mass = vec![0f64; heads];
                for k in 0..heads {
                    let mut sel = Vec::new();
                    match k_layer {
                        Some(kl) => top.top_k_with(&ps[k], &hists[k], kl, &mut sel),
                        None => {
                            top.select_with(&ps[k], &hists[k], 0.9, &mut sel);
                        }
                    }
                    want_mass[k] = sel.iter().map(|&j| ps[k][j as usize] as f64).sum();
                    weighted_sum_portable(&ps[k], &sel, 1.0, &cells, |c| &rows[c as usize], &mut want[k * dv..(k + 1) * dv]);
                }
                // and over a part of the tokens only
                let part = n / 3..2 * n / 3;
                let mut want_part = vec![0f32; heads * dv];
                for (k, pk) in picks.iter().enumerate() {
                    let sel: Vec<u32> = part.clone().filter(|&j| pk.cut.takes_p(j, pk.p[j])).map(|j| j as u32).collect();
                    weighted_sum_portable(pk.p, &sel, 1.0, &cells, |c| &rows[c as usize], &mut want_part[k * dv..(k + 1) * dv]);
                }
                for level in Level::ALL {
                    let (mut got, mut mass) = (vec![7f32; heads * dv], vec![7f64; heads]);
                    union_sum_with(level, &picks, &cells, |c| &rows[c as usize], &mut got, &mut mass);
                    let what = format!("{:?} heads {heads} dv {dv} n {n} k {k_layer:?}", level.usable());
                    assert_eq!(mass, want_mass, "{what}");
                    for (x, y) in want.iter().zip(&got) {
                        assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{what}: {x} vs {y}");
                    }
                    // where the level has a union kernel for this shape (or none at all),
                    // each head's sum is the one its own list gives at this level, bit for bit:
                    // the union only shares the reads
                    let union_kernel = level.usable() == Level::Portable || heads <= union_heads(level, dv);
                    for (k, pk) in picks.iter().enumerate().filter(|_| union_kernel) {
                        let sel: Vec<u32> = (0..n).filter(|&j| pk.cut.takes_p(j, pk.p[j])).map(|j| j as u32).collect();
                        let mut alone = vec![0f32; dv];
                        weighted_sum_with(level, pk.p, &sel, 1.0, &cells, |c| &rows[c as usize], &mut alone);
                        assert_eq!(alone, got[k * dv..(k + 1) * dv], "{what}: head {k} alone");
                    }
                    union_sum_range(level, &picks, &cells, part.clone(), |c| &rows[c as usize], &mut got, &mut mass);
                    for (x, y) in want_part.iter().zip(&got) {
                        assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{what}, tokens {part:?}: {x} vs {y}");
                    }
                }
            }
        }
    }

    #[test]
    fn union_value_sum_leaves_rows_a_head_does_not_take_alone() {
        // token 0 holds the most mass for head 0 and none for head 1; its row is not finite
        // (64 values: the row length the SIMD union kernels take)
        let n = 64;
        let dv = 64;
        let mut p0 = vec![0.5 / (n - 1) as f32; n];
        p0[0] = 0.5;
        let mut p1 = vec![1.0 / (n - 1) as f32; n];
        p1[0] = 0.0;
        let mut rows: Vec<Vec<f16>> = (0..n).map(|_| vec![f16::from_f32(1.0); dv]).collect();
        rows[0] = vec![f16::INFINITY; dv];
        let cells: Vec<(i32, u32)> = (0..n as u32).map(|c| (c as i32, c)).collect();
        let (mut h0, mut h1) = (Histogram::default(), Histogram::default());
        h0.build(&p0);
        h1.build(&p1);
        let mut top = TopP::default();
        let c0 = top.cut_with(&p0, &h0, 0.5).0;
        let c1 = top.cut_with(&p1, &h1, 0.5).0;
        let picks = [Pick { p: &p0, cut: c0 }, Pick { p: &p1, cut: c1 }];
        for level in Level::ALL {
            let (mut out, mut mass) = (vec![0f32; 2 * dv], vec![0f64; 2]);
            union_sum_with(level, &picks, &cells, |c| &rows[c as usize], &mut out, &mut mass);
            assert!(out[..dv].iter().all(|x| x.is_infinite()), "{level:?}: head 0 takes the infinite row");
            assert!(out[dv..].iter().all(|x| x.is_finite() && *x > 0.0), "{level:?}: head 1 does not");
        }
    }

    #[test]
    fn collected_cuts_are_the_tokens_the_cut_takes_at_every_level() {
        let mut seed = 9u64;
        let n = 3000;
        let mut p = probs(n, &mut seed);
        // the ends of the order: zeros, a negative zero, a value just above 1
        p[3] = 0.0;
        p[4] = -0.0;
        p[40] = 1.0000001;
        let mut h = Histogram::default();
        h.build(&p);
        let mut top = TopP::default();
        let mut cuts = vec![Cut::ALL, Cut::NONE];
        for tau in [0.2f32, 0.9, 0.999] {
            cuts.push(top.cut_with(&p, &h, tau).0);
        }
        for k in [1, 333, n - 1] {
            cuts.push(top.cut_top_k_with(&p, &h, k));
        }
        let mut sel = Vec::new();
        for cut in cuts {
            for range in [0..n, 5..1030, 1024..2048, 2990..3000, 7..7] {
                let want: Vec<u32> = range.clone().filter(|&i| cut.takes_p(i, p[i])).map(|i| i as u32).collect();
                for level in Level::ALL {
                    collect_cut(level, &p, cut, range.clone(), &mut sel);
                    assert_eq!(sel, want, "{cut:?} {range:?} at {:?}", level.usable());
                }
            }
        }
    }

    #[test]
    fn chunked_value_sums_equal_one_sum_per_head_in_any_chunk_order() {
        let mut seed = 5u64;
        for (heads, dv, n) in [(3usize, 64usize, 2000usize), (5, 64, 4500), (4, 128, 1500), (3, 32, 2100), (1, 256, 700)] {
            let rows: Vec<Vec<f16>> = (0..n).map(|c| (0..dv).map(|d| f16::from_f32(((c * 17 + d * 5) % 89) as f32 / 40.0 - 1.0)).collect()).collect();
            let cells: Vec<(i32, u32)> = (0..n as u32).map(|c| (c as i32, c)).collect();
            let probs_all: Vec<f32> = (0..heads).flat_map(|_| probs(n, &mut seed)).collect();
            let hists: Vec<Histogram> = probs_all
                .chunks_exact(n)
                .map(|p| {
                    let mut h = Histogram::default();
                    h.build(p);
                    h
                })
                .collect();
            for (renorm, k_layer) in [(true, None), (false, None), (true, Some(300)), (false, Some(300))] {
                let a = Approx { tau: 0.9, renorm, layer_k: k_layer.is_some() };
                let (mut top, mut sel) = (TopP::default(), Vec::new());
                // the reference: each head's list and its sum in one pass
                let mut want = vec![0f32; heads * dv];
                for k in 0..heads {
                    select_and_sum(&probs_all[k * n..(k + 1) * n], &hists[k], &cells, a, k_layer, &mut top, &mut sel, |c| &rows[c as usize], &mut want[k * dv..(k + 1) * dv]);
                }
                let cuts: Vec<Cut> = (0..heads).map(|k| cut(&probs_all[k * n..(k + 1) * n], &hists[k], a, k_layer, &mut top)).collect();
                for level in Level::ALL {
                    let what = format!("{:?} heads {heads} dv {dv} renorm {renorm} k {k_layer:?}", level.usable());
                    let mut got = vec![0f32; heads * dv];
                    let (mut parts, mut part_mass) = (Vec::new(), Vec::new());
                    value_sums(level, &probs_all, &cuts, &cells, renorm, |c| &rows[c as usize], &mut got, &mut parts, &mut part_mass, &mut sel);
                    for (x, y) in want.iter().zip(&got) {
                        assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{what}: {x} vs {y}");
                    }
                    // the chunks run in another order (as threads would), then finished in order:
                    // the same bits
                    let chunks = value_chunks(n);
                    let mut by_chunk = vec![(vec![0f32; heads * dv], vec![0f64; heads]); chunks];
                    for c in (0..chunks).rev() {
                        let (o, m) = &mut by_chunk[c];
                        chunk_sums(level, HeadRows { p: &probs_all, stride: n, first: 0 }, &cuts, &cells, c, |c| &rows[c as usize], o, m, &mut sel);
                        // and from the chunk's probabilities alone, as the decode's 4-bit items
                        // have them (its cells renumbered, and the cuts with them): the same bits
                        let (from, to) = (c * VALUE_CHUNK, ((c + 1) * VALUE_CHUNK).min(n));
                        let mine: Vec<f32> = (0..heads).flat_map(|k| probs_all[k * n + from..k * n + to].to_vec()).collect();
                        let (mut o2, mut m2) = (vec![0f32; heads * dv], vec![0f64; heads]);
                        chunk_sums(level, HeadRows { p: &mine, stride: to - from, first: from }, &cuts, &cells, c, |c| &rows[c as usize], &mut o2, &mut m2, &mut sel);
                        assert_eq!((&o2, &m2), (&*o, &*m), "{what}: chunk {c} from its own probabilities");
                    }
                    for k in 0..heads {
                        let mut again = vec![0f32; dv];
                        finish_sums(by_chunk.iter().map(|(o, m)| (&o[k * dv..(k + 1) * dv], m[k])), renorm, &mut again);
                        assert_eq!(again, got[k * dv..(k + 1) * dv], "{what}: head {k}");
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_is_the_same_at_every_level() {
        let mut seed = 11u64;
        for n in [1usize, 7, 16, 33, 1000, 8195] {
            for sink in [None, Some(3.0f32)] {
                let l: Vec<f32> = (0..n)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 20.0 - 10.0
                    })
                    .collect();
                let mut want = l.clone();
                softmax_with(Level::Portable, &mut want, sink);
                for level in Level::ALL {
                    let mut got = l.clone();
                    softmax_with(level, &mut got, sink);
                    for (x, y) in want.iter().zip(&got) {
                        // the same exp per element; only the order of the sum's additions differs
                        assert!((x - y).abs() <= 1e-6 * x.abs() + 1e-30, "n {n} at {:?}: {x} vs {y}", level.usable());
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_with_the_sink_taking_its_share() {
        let mut l = vec![1.0f32, 2.0, 3.0];
        softmax(&mut l, None);
        assert!((l.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(l[2] > l[1] && l[1] > l[0]);
        let mut l = vec![0.0f32, 0.0];
        softmax(&mut l, Some(0.0));
        assert!((l[0] - 1.0 / 3.0).abs() < 1e-6);
        let mut l = vec![f32::NEG_INFINITY; 3];
        softmax(&mut l, None);
        assert!(l.iter().all(|&x| x == 0.0));
    }
}
