//! Attention over stored tokens, for one query token and one KV head's group of query heads.
//! This is the exact kernel (every visible token, f16 storage, f32 math); it is also the
//! reference that faster kernels are tested against.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Sliding-window rule of a layer (llama.cpp's LLAMA_SWA_TYPE_* and is_masked_swa).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    None,
    /// key visible when p_query - p_key < n
    Standard(i32),
    /// key visible when p_key >= floor(p_query / n) * n
    Chunked(i32),
    /// key visible when |p_query - p_key| <= n / 2
    Symmetric(i32),
}

impl Window {
    pub fn from_c(swa_type: i32, n_swa: u32) -> Option<Window> {
        let n = n_swa as i32;
        match swa_type {
            0 => Some(Window::None),
            1 if n > 0 => Some(Window::Standard(n)),
            2 if n > 0 => Some(Window::Chunked(n)),
            3 if n > 0 => Some(Window::Symmetric(n)),
            _ => None,
        }
    }

    /// Inclusive position bounds of the keys a query at `p` may see.
    pub fn bounds(self, p: i32, causal: bool) -> (i32, i32) {
        let hi = if causal { p } else { i32::MAX };
        match self {
            Window::None => (i32::MIN, hi),
            Window::Standard(n) => (p.saturating_sub(n - 1), hi),
            Window::Chunked(n) => ((p / n) * n, hi),
            Window::Symmetric(n) => (p.saturating_sub(n / 2), hi.min(p.saturating_add(n / 2))),
        }
    }
}

/// The entries of a (position, cell) list sorted by position that a query at `p` may see.
pub fn visible(list: &[(i32, u32)], p: i32, causal: bool, window: Window) -> &[(i32, u32)] {
    let (lo, hi) = window.bounds(p, causal);
    let a = list.partition_point(|e| e.0 < lo);
    let b = list.partition_point(|e| e.0 <= hi);
    if a >= b {
        &list[0..0]
    } else {
        &list[a..b]
    }
}

/// Scalars of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub kq_scale: f32,
    /// 0 = off; else logit = softcap * tanh(logit / softcap), applied after kq_scale
    pub softcap: f32,
}

impl Scale {
    #[inline]
    pub(crate) fn logit(self, dot: f32) -> f32 {
        let z = dot * self.kq_scale;
        if self.softcap != 0.0 {
            self.softcap * (z / self.softcap).tanh()
        } else {
            z
        }
    }
}

/// Per-thread scratch, reused across calls so the loop does not allocate once warm.
#[derive(Default)]
pub struct Scratch {
    logits: Vec<f32>,
    row: Vec<f32>,
}

/// Exact attention of `g` query heads (`q`: g rows of `dk`, contiguous) over the `cells`,
/// whose key and value rows of this KV head `key(cell)` and `val(cell)` return. Writes g rows
/// of `dv` into `out`. `sinks`: one extra logit per query head that takes probability mass
/// but has no value (llama.cpp's attention sinks). No visible token and no sink gives zeros.
#[allow(clippy::too_many_arguments)]
pub fn exact<'a>(
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { exact_avx2(q, g, dk, dv, cells, key, val, scale, sinks, scratch, out) };
    }
    exact_portable(q, g, dk, dv, cells, key, val, scale, sinks, scratch, out)
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_fma() -> bool {
    crate::simd::level() >= crate::simd::Level::Avx2
}

/// The same code compiled for AVX2 and FMA, so that its loops vectorise 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn exact_avx2<'a>(
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    exact_portable(q, g, dk, dv, cells, key, val, scale, sinks, scratch, out)
}

/// The portable version, and the body of the others.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn exact_portable<'a>(
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let n = cells.len();
    scratch.logits.clear();
    scratch.logits.resize(g * n, 0.0);
    scratch.row.resize(dk.max(dv), 0.0);

    for (j, &(_, c)) in cells.iter().enumerate() {
        let k = &mut scratch.row[..dk];
        key(c).convert_to_f32_slice(k);
        for h in 0..g {
            let qh = &q[h * dk..(h + 1) * dk];
            scratch.logits[h * n + j] = scale.logit(dot(qh, k));
        }
    }

    out[..g * dv].iter_mut().for_each(|x| *x = 0.0);
    for h in 0..g {
        let l = &mut scratch.logits[h * n..(h + 1) * n];
        let sink = sinks.map(|s| s[h]);
        let mut m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if let Some(s) = sink {
            m = m.max(s);
        }
        if m == f32::NEG_INFINITY {
            continue;
        }
        let mut sum = 0.0f32;
        for x in l.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        if let Some(s) = sink {
            sum += (s - m).exp();
        }
        let inv = 1.0 / sum;
        l.iter_mut().for_each(|x| *x *= inv);
    }

    for (j, &(_, c)) in cells.iter().enumerate() {
        let v = &mut scratch.row[..dv];
        val(c).convert_to_f32_slice(v);
        for h in 0..g {
            let p = scratch.logits[h * n + j];
            let o = &mut out[h * dv..(h + 1) * dv];
            for (oi, vi) in o.iter_mut().zip(v.iter()) {
                *oi += p * vi;
            }
        }
    }
}

/// Keys and values converted to f32 per chunk of the blocked kernel: small enough to stay in
/// L1 with the block's queries and accumulators.
const BLOCK_KEYS: usize = 16;

/// Scratch of [`exact_block`], kept per thread.
#[derive(Default)]
pub struct BlockScratch {
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    /// per query row: running max, running sum, output accumulator
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    /// one token's outputs, handed to `out`
    out: Vec<f32>,
    /// the vector kernel's queries transposed ([dk][rows]) and each row's visible range
    qt: Vec<f32>,
    ra: Vec<i32>,
    rb: Vec<i32>,
}

/// Exact attention of a block of query tokens over one KV head, for prompts: each key and
/// value is converted to f32 once per block instead of once per query token, and the block's
/// rows are updated chunk by chunk with an online softmax (running max and sum), so nothing of
/// size n is kept per row. Gives the same result as [`exact`] per token up to f32 rounding.
///
/// `q`: the block's query rows, token-major (`ranges.len() * g` rows of `dk`); `ranges[t]`:
/// token t's visible entries of `cells` as an index range; `out(t, o)` receives token t's
/// `g * dv` outputs.
#[allow(clippy::too_many_arguments)]
pub fn exact_block<'a>(
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    ranges: &[(usize, usize)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    scratch: &mut BlockScratch,
    out: impl FnMut(usize, &[f32]),
) {
    exact_block_with(crate::simd::level(), q, g, dk, dv, cells, ranges, key, val, scale, sinks, scratch, out)
}

/// [`exact_block`] at a chosen instruction-set level (lowered to what the CPU has).
#[allow(clippy::too_many_arguments)]
pub fn exact_block_with<'a>(
    level: crate::simd::Level,
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    ranges: &[(usize, usize)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    scratch: &mut BlockScratch,
    out: impl FnMut(usize, &[f32]),
) {
    #[cfg(target_arch = "x86_64")]
    match level.usable() {
        // SAFETY: `usable` is never above what the CPU has.
        crate::simd::Level::Avx512 => return unsafe { exact_block_avx512(q, g, dk, dv, cells, ranges, key, val, scale, sinks, scratch, out) },
        crate::simd::Level::Avx2 => return unsafe { exact_block_avx2(q, g, dk, dv, cells, ranges, key, val, scale, sinks, scratch, out) },
        crate::simd::Level::Sse41 => return unsafe { exact_block_sse41(q, g, dk, dv, cells, ranges, key, val, scale, sinks, scratch, out) },
        crate::simd::Level::Portable | crate::simd::Level::Neon => {}
    }
    #[cfg(target_arch = "aarch64")]
    if level.usable() == crate::simd::Level::Neon {
        // SAFETY: the CPU has NEON (`usable` checked it).
        return unsafe { exact_block_neon(q, g, dk, dv, cells, ranges, key, val, scale, sinks, scratch, out) };
    }
    let _ = level;
    exact_block_portable(q, g, dk, dv, cells, ranges, key, val, scale, sinks, scratch, out)
}

/// The vector block kernel at AVX-512: 16 rows a vector, up to 4 vectors a register block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn exact_block_avx512<'a>(
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    ranges: &[(usize, usize)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    scratch: &mut BlockScratch,
    out: impl FnMut(usize, &[f32]),
) {
    exact_block_lanes::<crate::simd::F32x16>(q, g, dk, dv, cells, ranges, key, val, scale, sinks, scratch, out)
}

/// The vector block kernel at AVX2: 8 rows a vector, up to 2 vectors a register block (16
/// registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn exact_block_avx2<'a>(
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    ranges: &[(usize, usize)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    scratch: &mut BlockScratch,
    out: impl FnMut(usize, &[f32]),
) {
    exact_block_lanes::<crate::simd::F32x8>(q, g, dk, dv, cells, ranges, key, val, scale, sinks, scratch, out)
}

/// The vector block kernel at SSE4.1: 4 rows a vector, up to 2 vectors a register block (16
/// registers), a multiply and an add where the others have an FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
#[allow(clippy::too_many_arguments)]
unsafe fn exact_block_sse41<'a>(
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    ranges: &[(usize, usize)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    scratch: &mut BlockScratch,
    out: impl FnMut(usize, &[f32]),
) {
    exact_block_lanes::<crate::simd::F32x4>(q, g, dk, dv, cells, ranges, key, val, scale, sinks, scratch, out)
}

/// The vector block kernel at NEON: 4 rows a vector, up to 4 vectors a register block (32
/// registers).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn exact_block_neon<'a>(
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    ranges: &[(usize, usize)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    scratch: &mut BlockScratch,
    out: impl FnMut(usize, &[f32]),
) {
    exact_block_lanes::<crate::simd::F32x4>(q, g, dk, dv, cells, ranges, key, val, scale, sinks, scratch, out)
}

/// Keys per chunk of the vector block kernel.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const BLOCK_KEYS_LANES: usize = 32;

/// The vector block kernel. It turns the block around: the block's query rows (its tokens
/// times the g heads of the KV head, padded to whole vectors) lie across the vector lanes, so
/// that the logits, the online softmax and the value sums are all vertical operations with
/// no horizontal sum, and one key or value element, broadcast, serves a whole vector of rows
/// (the GQA sharing: a KV head's keys are read once for all its query heads and all the
/// block's tokens). Register blocks of 4 keys (or value elements) by up to `L::BLOCK` row
/// vectors keep the loads at about half an operand per FMA. The sums run in another order
/// than the portable kernel's, so the results agree with it up to f32 rounding, not bit for
/// bit. Inlined into the `#[target_feature]` wrappers above, which give `L`'s intrinsics
/// their instruction set.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn exact_block_lanes<'a, L: crate::simd::Lanes>(
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    ranges: &[(usize, usize)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    s: &mut BlockScratch,
    mut out: impl FnMut(usize, &[f32]),
) {
    const KB: usize = BLOCK_KEYS_LANES;
    let w = L::WIDTH;
    let rows = ranges.len() * g;
    assert!(q.len() >= rows * dk, "block queries: {} < {rows} rows of {dk}", q.len());
    // rows padded to whole vectors; the padding rows see nothing
    let rp = rows.div_ceil(w) * w;
    let nv = rp / w;
    s.qt.clear();
    s.qt.resize(dk * rp, 0.0);
    for r in 0..rows {
        for d in 0..dk {
            s.qt[d * rp + r] = q[r * dk + d];
        }
    }
    s.ra.clear();
    s.rb.clear();
    for r in 0..rp {
        let (a, b) = if r < rows { ranges[r / g] } else { (0, 0) };
        s.ra.push(a as i32);
        s.rb.push(b as i32);
    }
    s.m.clear();
    s.m.resize(rp, f32::NEG_INFINITY);
    s.l.clear();
    s.l.resize(rp, 0.0);
    s.acc.clear();
    s.acc.resize(dv * rp, 0.0);
    s.k.clear();
    s.k.resize(KB * dk, 0.0);
    s.v.clear();
    s.v.resize(KB * dv, 0.0);
    s.s.clear();
    s.s.resize(KB * rp, 0.0);
    let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
    let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    let ks = L::splat(if scale.softcap == 0.0 { scale.kq_scale } else { 1.0 });
    let ninf = L::splat(f32::NEG_INFINITY);
    let mut c0 = lo;
    while c0 < hi {
        let c1 = (c0 + KB).min(hi);
        let n = c1 - c0;
        for (j, &(_, c)) in cells[c0..c1].iter().enumerate() {
            L::f16_to_f32(&key(c)[..dk], &mut s.k[j * dk..(j + 1) * dk]);
            L::f16_to_f32(&val(c)[..dv], &mut s.v[j * dv..(j + 1) * dv]);
        }
        // a short last chunk: zero keys give finite logits, which the ranges then hide
        s.k[n * dk..].iter_mut().for_each(|x| *x = 0.0);
        s.v[n * dv..].iter_mut().for_each(|x| *x = 0.0);
        // logits, [key][row]
        let mut v0 = 0;
        while v0 < nv {
            match (nv - v0).min(L::BLOCK) {
                4 => block_logits::<L, 4>(s, dk, rp, v0),
                3 => block_logits::<L, 3>(s, dk, rp, v0),
                2 => block_logits::<L, 2>(s, dk, rp, v0),
                _ => block_logits::<L, 1>(s, dk, rp, v0),
            }
            v0 += L::BLOCK;
        }
        if scale.softcap != 0.0 {
            s.s[..n * rp].iter_mut().for_each(|x| *x = scale.logit(*x));
        }
        // online softmax, a vector of rows at a time: hidden keys to -inf, the chunk's max,
        // rescale of what came before, then the weights (0 where hidden) in place of the
        // logits
        for v in 0..nv {
            let (a, b) = (s.ra.as_ptr().add(v * w), s.rb.as_ptr().add(v * w));
            let m_old = L::load(s.m.as_ptr().add(v * w));
            let mut mx = m_old;
            for j in 0..n {
                let p = s.s.as_mut_ptr().add(j * rp + v * w);
                let x = L::visible_or(a, b, (c0 + j) as i32, L::mul(L::load(p), ks), ninf);
                L::store(p, x);
                mx = L::max(mx, x);
            }
            // rows that have seen nothing yet keep max -inf; 0 in its place keeps the
            // differences below free of -inf - -inf (their weights are 0 anyway)
            let m_new = L::neg_inf_to_zero(mx);
            let f = L::exp(L::sub(m_old, m_new));
            let mut sum = L::splat(0.0);
            for j in 0..n {
                let p = s.s.as_mut_ptr().add(j * rp + v * w);
                let e = L::visible_or(a, b, (c0 + j) as i32, L::exp(L::sub(L::load(p), m_new)), L::splat(0.0));
                L::store(p, e);
                sum = L::add(sum, e);
            }
            let l = L::load(s.l.as_ptr().add(v * w));
            L::store(s.l.as_mut_ptr().add(v * w), L::fmadd(l, f, sum));
            L::store(s.m.as_mut_ptr().add(v * w), mx);
            // a row whose max did not move has f = 1: the product changes nothing
            for e in 0..dv {
                let p = s.acc.as_mut_ptr().add(e * rp + v * w);
                L::store(p, L::mul(L::load(p), f));
            }
        }
        // values, [element][row] += V[key][element] * weight[key][row]
        let mut e0 = 0;
        while e0 < dv {
            let re = (dv - e0).min(4);
            let mut v0 = 0;
            while v0 < nv {
                match ((nv - v0).min(L::BLOCK), re) {
                    (4, 4) => block_values::<L, 4, 4>(s, dv, rp, n, e0, v0),
                    (3, 4) => block_values::<L, 3, 4>(s, dv, rp, n, e0, v0),
                    (2, 4) => block_values::<L, 2, 4>(s, dv, rp, n, e0, v0),
                    (1, 4) => block_values::<L, 1, 4>(s, dv, rp, n, e0, v0),
                    (nb, _) => {
                        for e in e0..e0 + re {
                            match nb {
                                4 => block_values::<L, 4, 1>(s, dv, rp, n, e, v0),
                                3 => block_values::<L, 3, 1>(s, dv, rp, n, e, v0),
                                2 => block_values::<L, 2, 1>(s, dv, rp, n, e, v0),
                                _ => block_values::<L, 1, 1>(s, dv, rp, n, e, v0),
                            }
                        }
                    }
                }
                v0 += L::BLOCK;
            }
            e0 += re;
        }
        c0 = c1;
    }
    s.out.resize(g * dv, 0.0);
    for t in 0..ranges.len() {
        for h in 0..g {
            let r = t * g + h;
            let inv = finish_row(s.m[r], s.l[r], sinks.map(|x| x[h]));
            for (e, d) in s.out[h * dv..(h + 1) * dv].iter_mut().enumerate() {
                *d = s.acc[e * rp + r] * inv;
            }
        }
        out(t, &s.out);
    }
}

/// Logits of all the chunk's keys for the row vectors v0..v0+V: 4 keys by V vectors of
/// accumulators, one query element loaded per vector and one key element broadcast per key.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
unsafe fn block_logits<L: crate::simd::Lanes, const V: usize>(s: &mut BlockScratch, dk: usize, rp: usize, v0: usize) {
    let w = L::WIDTH;
    let (qt, k, out) = (s.qt.as_ptr(), s.k.as_ptr(), s.s.as_mut_ptr());
    for j0 in (0..BLOCK_KEYS_LANES).step_by(4) {
        let mut acc = [[L::splat(0.0); V]; 4];
        for d in 0..dk {
            let mut qv = [L::splat(0.0); V];
            for (v, x) in qv.iter_mut().enumerate() {
                *x = L::load(qt.add(d * rp + (v0 + v) * w));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                let kb = L::splat(*k.add((j0 + j) * dk + d));
                for v in 0..V {
                    a[v] = L::fmadd(kb, qv[v], a[v]);
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            for (v, x) in a.iter().enumerate() {
                L::store(out.add((j0 + j) * rp + (v0 + v) * w), *x);
            }
        }
    }
}

/// Value sums of elements e0..e0+E for the row vectors v0..v0+V over the chunk's n keys.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
unsafe fn block_values<L: crate::simd::Lanes, const V: usize, const E: usize>(
    s: &mut BlockScratch,
    dv: usize,
    rp: usize,
    n: usize,
    e0: usize,
    v0: usize,
) {
    let w = L::WIDTH;
    let (wt, vals, acc_p) = (s.s.as_ptr(), s.v.as_ptr(), s.acc.as_mut_ptr());
    let mut acc = [[L::splat(0.0); V]; E];
    for (e, a) in acc.iter_mut().enumerate() {
        for (v, x) in a.iter_mut().enumerate() {
            *x = L::load(acc_p.add((e0 + e) * rp + (v0 + v) * w));
        }
    }
    for j in 0..n {
        let mut wv = [L::splat(0.0); V];
        for (v, x) in wv.iter_mut().enumerate() {
            *x = L::load(wt.add(j * rp + (v0 + v) * w));
        }
        for (e, a) in acc.iter_mut().enumerate() {
            let vb = L::splat(*vals.add(j * dv + e0 + e));
            for v in 0..V {
                a[v] = L::fmadd(vb, wv[v], a[v]);
            }
        }
    }
    for (e, a) in acc.iter().enumerate() {
        for (v, x) in a.iter().enumerate() {
            L::store(acc_p.add((e0 + e) * rp + (v0 + v) * w), *x);
        }
    }
}

/// The factor a row's accumulated value sum is multiplied by at the end: 1 / its softmax
/// sum, with the head's sink (if any) joining the sum; 0 for a row that saw nothing.
fn finish_row(m: f32, l: f32, sink: Option<f32>) -> f32 {
    let (mut m, mut l) = (m, l);
    let mut f = 1.0;
    if let Some(sink) = sink {
        let m2 = m.max(sink);
        if m2 != f32::NEG_INFINITY {
            f = if m == f32::NEG_INFINITY { 0.0 } else { (m - m2).exp() };
            l = l * f + (sink - m2).exp();
            m = m2;
        }
    }
    if m == f32::NEG_INFINITY || l == 0.0 {
        0.0
    } else {
        f / l
    }
}
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn exact_block_portable<'a>(
    q: &[f32],
    g: usize,
    dk: usize,
    dv: usize,
    cells: &[(i32, u32)],
    ranges: &[(usize, usize)],
    key: impl Fn(u32) -> &'a [f16],
    val: impl Fn(u32) -> &'a [f16],
    scale: Scale,
    sinks: Option<&[f32]>,
    s: &mut BlockScratch,
    mut out: impl FnMut(usize, &[f32]),
) {
    const KB: usize = BLOCK_KEYS;
    let rows = ranges.len() * g;
    s.m.clear();
    s.m.resize(rows, f32::NEG_INFINITY);
    s.l.clear();
    s.l.resize(rows, 0.0);
    s.acc.clear();
    s.acc.resize(rows * dv, 0.0);
    // keys transposed ([dk][KB]) so that one row's KB logits are KB-wide FMAs with no
    // horizontal sums; values as rows ([KB][dv])
    s.k.resize(KB * dk, 0.0);
    s.v.resize(KB * dv, 0.0);
    s.s.resize(dk.max(dv), 0.0);
    let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
    let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
    let mut c0 = lo;
    while c0 < hi {
        let c1 = (c0 + KB).min(hi);
        let n = c1 - c0;
        for (j, &(_, c)) in cells[c0..c1].iter().enumerate() {
            let row = &mut s.s[..dk];
            key(c).convert_to_f32_slice(row);
            for (d, &x) in row.iter().enumerate() {
                s.k[d * KB + j] = x;
            }
            val(c).convert_to_f32_slice(&mut s.v[j * dv..(j + 1) * dv]);
        }
        for j in n..KB {
            for d in 0..dk {
                s.k[d * KB + j] = 0.0;
            }
        }
        for (t, &(a, b)) in ranges.iter().enumerate() {
            let (a, b) = (a.max(c0) - c0, b.min(c1).max(c0) - c0);
            if a >= b {
                continue;
            }
            for h in 0..g {
                let r = t * g + h;
                let qr = &q[r * dk..(r + 1) * dk];
                let mut x = [0.0f32; KB];
                for (d, &qd) in qr.iter().enumerate() {
                    let kd = &s.k[d * KB..(d + 1) * KB];
                    for (xj, &kj) in x.iter_mut().zip(kd) {
                        *xj += qd * kj;
                    }
                }
                if scale.softcap == 0.0 {
                    x.iter_mut().for_each(|v| *v *= scale.kq_scale);
                } else {
                    x.iter_mut().for_each(|v| *v = scale.logit(*v));
                }
                let mc = x[a..b].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let m_new = s.m[r].max(mc);
                if m_new == f32::NEG_INFINITY {
                    continue;
                }
                let acc = &mut s.acc[r * dv..(r + 1) * dv];
                if s.m[r] != m_new {
                    let f = exp(s.m[r] - m_new);
                    s.l[r] *= f;
                    acc.iter_mut().for_each(|v| *v *= f);
                    s.m[r] = m_new;
                }
                for xj in x.iter_mut() {
                    *xj = exp(*xj - m_new);
                }
                // keys outside this token's range weigh nothing
                x[..a].iter_mut().for_each(|v| *v = 0.0);
                x[b..].iter_mut().for_each(|v| *v = 0.0);
                s.l[r] += x.iter().sum::<f32>();
                // 32 outputs at a time held in registers across the chunk's keys
                let mut e0 = 0;
                while e0 + 32 <= dv {
                    let mut reg = [0.0f32; 32];
                    reg.copy_from_slice(&acc[e0..e0 + 32]);
                    for (j, &p) in x.iter().enumerate().take(n) {
                        let vj = &s.v[j * dv + e0..j * dv + e0 + 32];
                        for e in 0..32 {
                            reg[e] += p * vj[e];
                        }
                    }
                    acc[e0..e0 + 32].copy_from_slice(&reg);
                    e0 += 32;
                }
                for (j, &p) in x.iter().enumerate().take(n) {
                    for (o, v) in acc[e0..].iter_mut().zip(&s.v[j * dv + e0..(j + 1) * dv]) {
                        *o += p * v;
                    }
                }
            }
        }
        c0 = c1;
    }
    s.out.resize(g * dv, 0.0);
    let o = &mut s.out;
    for t in 0..ranges.len() {
        for h in 0..g {
            let r = t * g + h;
            let inv = finish_row(s.m[r], s.l[r], sinks.map(|x| x[h]));
            for (d, a) in o[h * dv..(h + 1) * dv].iter_mut().zip(&s.acc[r * dv..(r + 1) * dv]) {
                *d = a * inv;
            }
        }
        out(t, o);
    }
}

/// e^x in f32 without a libm call or a branch, so that loops over it vectorise: 2^n by the
/// exponent bits and a degree-6 polynomial on the remainder (relative error about 2e-7 on
/// [-87, 88]). Inputs are clamped to that range: below -87 (-inf included) it gives e^-87,
/// about 1.6e-38, which as a softmax weight next to the maximum's 1 is nothing.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // eight independent partial sums let the compiler vectorise without -ffast-math
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for l in 0..8 {
            acc[l] += a[i * 8 + l] * b[i * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &[f32]) -> Vec<f16> {
        v.iter().map(|x| f16::from_f32(*x)).collect()
    }

    /// Straightforward softmax attention in f64 over f16-rounded keys and values.
    fn reference(q: &[f32], keys: &[Vec<f16>], vals: &[Vec<f16>], scale: f32, sink: Option<f32>) -> Vec<f32> {
        let logits: Vec<f64> = keys
            .iter()
            .map(|k| k.iter().zip(q).map(|(a, b)| a.to_f64() * *b as f64).sum::<f64>() * scale as f64)
            .collect();
        let mut m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if let Some(s) = sink {
            m = m.max(s as f64);
        }
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let z: f64 = e.iter().sum::<f64>() + sink.map(|s| (s as f64 - m).exp()).unwrap_or(0.0);
        let dv = vals[0].len();
        (0..dv).map(|d| (e.iter().zip(vals).map(|(p, v)| p * v[d].to_f64()).sum::<f64>() / z) as f32).collect()
    }

    #[test]
    fn matches_reference_with_gqa_and_sinks() {
        let (dk, dv, n, g) = (16, 8, 37, 3);
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
        };
        let keys: Vec<Vec<f16>> = (0..n).map(|_| h(&(0..dk).map(|_| rnd()).collect::<Vec<_>>())).collect();
        let vals: Vec<Vec<f16>> = (0..n).map(|_| h(&(0..dv).map(|_| rnd()).collect::<Vec<_>>())).collect();
        let q: Vec<f32> = (0..g * dk).map(|_| rnd() * 3.0).collect();
        let cells: Vec<(i32, u32)> = (0..n as u32).map(|c| (c as i32, c)).collect();
        let sinks = [0.5f32, -1.0, 2.0];
        for (use_sinks, portable) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut out = vec![0.0; g * dv];
            let mut s = Scratch::default();
            let sk = if use_sinks { Some(&sinks[..]) } else { None };
            let kernel = if portable { exact_portable } else { exact };
            kernel(&q, g, dk, dv, &cells, |c| &keys[c as usize][..], |c| &vals[c as usize][..],
                   Scale { kq_scale: 0.25, softcap: 0.0 }, sk, &mut s, &mut out);
            for hh in 0..g {
                let r = reference(&q[hh * dk..(hh + 1) * dk], &keys, &vals, 0.25, sk.map(|x| x[hh]));
                for d in 0..dv {
                    assert!((out[hh * dv + d] - r[d]).abs() < 1e-5, "head {hh} dim {d}: {} vs {}", out[hh * dv + d], r[d]);
                }
            }
        }
    }

    #[test]
    fn block_kernel_equals_the_per_token_kernel() {
        // (dk, dv, g, tokens): small rows; SmolLM2's shape with a full 32-token block (96 rows,
        // six vectors of the AVX-512 kernel); a wider value row and 4 heads; odd sizes, no GQA
        for (dk, dv, g, t) in [(16, 8, 3, 7), (64, 64, 3, 32), (64, 128, 4, 11), (72, 40, 1, 20)] {
            block_kernel_case(dk, dv, g, t);
        }
    }

    fn block_kernel_case(dk: usize, dv: usize, g: usize, t: usize) {
        let n = 300;
        let mut seed = 7u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
        };
        let keys: Vec<Vec<f16>> = (0..n).map(|_| h(&(0..dk).map(|_| rnd()).collect::<Vec<_>>())).collect();
        let vals: Vec<Vec<f16>> = (0..n).map(|_| h(&(0..dv).map(|_| rnd()).collect::<Vec<_>>())).collect();
        let q: Vec<f32> = (0..t * g * dk).map(|_| rnd() * 3.0).collect();
        let cells: Vec<(i32, u32)> = (0..n as u32).map(|c| (c as i32, c)).collect();
        // causal prefixes, a window, one token that sees nothing, one that sees everything,
        // then causal rows ending in the last chunk
        let mut ranges = vec![(0, 1), (0, 70), (10, 150), (0, 0), (64, 65), (0, 300), (250, 299)];
        ranges.extend((ranges.len()..t).map(|i| (0, 300 - t + i)));
        ranges.truncate(t);
        let sinks: Vec<f32> = (0..g).map(|h| [0.5f32, -1.0, 2.0, 0.0][h % 4]).collect();
        for (sk, softcap) in [(None, 0.0), (Some(&sinks[..]), 0.0), (None, 4.0)] {
            let sc = Scale { kq_scale: 0.25, softcap };
            // every level the CPU has (and the default dispatch), one scratch reused across
            // levels to catch state left behind
            let mut scratch = BlockScratch::default();
            for level in std::iter::once(None).chain(crate::simd::Level::ALL.map(Some)) {
                let mut got = vec![vec![]; t];
                let (key, val) = (|c: u32| &keys[c as usize][..], |c: u32| &vals[c as usize][..]);
                match level {
                    None => exact_block(&q, g, dk, dv, &cells, &ranges, key, val, sc, sk, &mut scratch, |i, o| got[i] = o.to_vec()),
                    Some(l) => {
                        exact_block_with(l, &q, g, dk, dv, &cells, &ranges, key, val, sc, sk, &mut scratch, |i, o| got[i] = o.to_vec())
                    }
                }
                for (i, &(a, b)) in ranges.iter().enumerate() {
                    let mut want = vec![0.0; g * dv];
                    exact(
                        &q[i * g * dk..(i + 1) * g * dk],
                        g,
                        dk,
                        dv,
                        &cells[a..b],
                        |c| &keys[c as usize][..],
                        |c| &vals[c as usize][..],
                        sc,
                        sk,
                        &mut Scratch::default(),
                        &mut want,
                    );
                    assert_eq!(got[i].len(), g * dv);
                    for (x, y) in got[i].iter().zip(&want) {
                        assert!(
                            (x - y).abs() < 1e-5,
                            "{dk}x{dv} g {g}, {level:?}: token {i} ({a}..{b}), sinks {}, softcap {softcap}: {x} vs {y}",
                            sk.is_some()
                        );
                    }
                }
            }
        }
    }
    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(-100.0) < 1e-37);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn softcap_bounds_logits() {
        let s = Scale { kq_scale: 1.0, softcap: 5.0 };
        assert!((s.logit(1000.0) - 5.0).abs() < 1e-5);
        assert!((s.logit(0.5) - 5.0 * (0.1f32).tanh()).abs() < 1e-6);
    }

    #[test]
    fn nothing_visible_gives_zeros() {
        let mut out = vec![1.0; 4];
        let mut s = Scratch::default();
        exact(&[1.0; 4], 1, 4, 4, &[], |_| &[][..], |_| &[][..], Scale { kq_scale: 1.0, softcap: 0.0 }, None, &mut s, &mut out);
        assert_eq!(out, vec![0.0; 4]);
    }

    #[test]
    fn windows_follow_llama_cpp_rules() {
        let list: Vec<(i32, u32)> = (0..20).map(|p| (p, p as u32)).collect();
        let pos = |s: &[(i32, u32)]| s.iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(pos(visible(&list, 5, true, Window::None)), (0..=5).collect::<Vec<_>>());
        assert_eq!(pos(visible(&list, 5, false, Window::None)).len(), 20);
        // standard: masked when p1 - p0 >= n
        assert_eq!(pos(visible(&list, 10, true, Window::Standard(4))), vec![7, 8, 9, 10]);
        // chunked: masked when p0 < floor(p1 / n) * n
        assert_eq!(pos(visible(&list, 10, true, Window::Chunked(4))), vec![8, 9, 10]);
        // symmetric: masked when |p1 - p0| > n / 2
        assert_eq!(pos(visible(&list, 10, false, Window::Symmetric(4))), vec![8, 9, 10, 11, 12]);
        assert_eq!(pos(visible(&list, 10, true, Window::Symmetric(4))), vec![8, 9, 10]);
        assert!(Window::from_c(1, 0).is_none());
        assert!(Window::from_c(7, 4).is_none());
    }
}
