//! The HCAttention decode path: approximate logits from the key store (codes, or exact rows
//! where the store keeps them), softmax over every visible token, the smallest top set whose
//! mass reaches `tau` (per head, or one k for all heads of the layer), and the
//! probability-weighted sum of only those tokens' values.
//!
//! The steps are separate functions so that the backend can run them two ways: all steps of
//! one token in one work item ([`approximate`], for ubatches of several tokens), or each step
//! split across the op's threads with a barrier between steps (one token decoding: scoring by
//! (KV head, cell chunk), softmax, selection and value sums by query head).

use half::f16;

use crate::attention::{exp, Scale};
use crate::keys::{KeyStore, Prep};
use crate::select::{layer_k, Histogram, TopP};
use crate::simd::Level;

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
    s.q.clear();
    for h in 0..g {
        // queries rounded to f16 as stock rounds them, so that exact rows score as in stock
        s.q.extend(q(h)[..dk].iter().map(|&x| f16::from_f32(x).to_f32()));
    }
    keys.prepare(&s.q, g, &mut s.prep);
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
        Level::Portable => {}
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
    }
    let _ = level;
    weighted_sum_portable(p, sel, w, cells, val, out)
}

/// The reference for [`weighted_sum`].
pub fn weighted_sum_portable<'a>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32]) {
    out.iter_mut().for_each(|x| *x = 0.0);
    for &j in sel {
        let pj = p[j as usize] * w;
        for (x, v) in out.iter_mut().zip(val(cells[j as usize].1)) {
            *x += pj * v.to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum_avx2<'a>(p: &[f32], sel: &[u32], w: f32, cells: &[(i32, u32)], val: impl Fn(u32) -> &'a [f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let dv = out.len();
    let lanes = dv / 8;
    // up to 32 accumulators of 8 (dv <= 256, checked by the caller), kept in registers for
    // the common dv = 64 or 128
    let mut acc = [_mm256_setzero_ps(); 32];
    for &j in sel {
        let pj = _mm256_set1_ps(p[j as usize] * w);
        let row = val(cells[j as usize].1);
        assert!(row.len() >= dv);
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

/// The selection of one head and its value sum: the top-p set (`k_layer` None), or the top
/// `k_layer` tokens. `h` is the histogram of `p`. Writes dv outputs.
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
    let mass = match k_layer {
        Some(k) => {
            top.top_k_with(p, h, k, sel);
            sel.iter().map(|&j| p[j as usize] as f64).sum::<f64>()
        }
        None => top.select_with(p, h, a.tau, sel),
    };
    let w = if a.renorm && mass > 0.0 { (1.0 / mass) as f32 } else { 1.0 };
    weighted_sum(p, sel, w, cells, val, out);
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
    for (i, kvh) in kv_heads.clone().enumerate() {
        let p = &mut probs[i * g * n..(i + 1) * g * n];
        logits(keys, kvh, g, dk, cells, |h| q(kvh * g + h), scale, s, p, n);
        for h in 0..g {
            let l = &mut p[h * n..(h + 1) * n];
            softmax(l, sinks.map(|x| x[kvh * g + h]));
            let hist = &mut s.hists[i * g + h];
            hist.build(l);
            if a.layer_k {
                s.ks.push(s.top.count_with(l, hist, a.tau));
            }
        }
    }
    let k_layer = a.layer_k.then(|| layer_k(&s.ks, n));
    for (i, kvh) in kv_heads.enumerate() {
        let o = out(kvh);
        for h in 0..g {
            let p = &probs[(i * g + h) * n..(i * g + h + 1) * n];
            select_and_sum(p, &s.hists[i * g + h], cells, a, k_layer, &mut s.top, &mut s.sel, |c| val(c, kvh), &mut o[h * dv..(h + 1) * dv]);
        }
    }
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
