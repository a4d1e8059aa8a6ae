//! A query head's attention distribution from the 4-bit scan's levels (see
//! [`crate::approx::levels`]), and its selection, such that the passes over the head's cells
//! split across threads but one: a count up to the selection's boundary cell.
//!
//! A 4-bit score is `bias + step × s` for an integer sum s, so a head's n scores take only the
//! few thousand levels between its lowest and highest sum, and cells at one level share one
//! probability. So:
//! 1. [`count_chunk`] counts a chunk of a head's cells per level (any thread, any chunk);
//! 2. [`HeadLevels::merge`] adds the chunks' counts up, [`HeadLevels::softmax`] takes one exp
//!    per level, and the selection walks the levels from the top: the top-p (or top-k)
//!    boundary is a level and a rank among its cells, and one counting pass over the levels
//!    finds that cell's index ([`HeadLevels::cut_top_p`], [`HeadLevels::cut_top_k`]);
//! 3. [`HeadLevels::lookup`] writes the probabilities of any chunk of cells (any thread).
//!
//! Only step 2 runs once per head, and its work grows with the number of levels, not of cells.
//! The counts are integers, so any split into chunks gives the same bits.
//!
//! Cells whose keys are still exact (sinks, recent tokens: level [`EXACT_LEVEL`]) keep their
//! own logits; they are few, and ranked among the levels by probability. The order is the
//! selection's reference order ([`crate::select`]): probability, highest first, then index.

use crate::attention::{exp, Scale};
use crate::keys::{level_score, EXACT_LEVEL};
use crate::select::Cut;
use crate::simd::Level;
use std::cmp::Ordering;

/// The end of a list of [`count_chunk`] that is shorter than its room (a pair never equals it:
/// a coded level is below `EXACT_LEVEL`).
pub const END: u64 = u64::MAX;
/// The end of a list of exact cells shorter than its room.
pub const END_EXACT: u32 = u32::MAX;

/// Counters per level filled in turn, so that cells at one level do not wait on each other.
const WAYS: usize = 4;

#[inline(always)]
fn pair_level(x: u64) -> u16 {
    (x >> 32) as u16
}

/// Scratch of [`count_chunk`]: the per-level counters, zero between calls.
#[derive(Default)]
pub struct CountScratch {
    ways: Vec<u32>,
}

/// Count one chunk of one head's levels `lv` (cells `first..first + lv.len()` of the head):
/// `pairs` gets each coded level present, with its count, as `level << 32 | count` in level
/// order; `exact` (when given: the exact cells are the same for every head of a KV head) the
/// indices of the exact cells, in order. Both have room for `lv.len()` entries; a shorter list
/// ends with [`END`] or [`END_EXACT`].
pub fn count_chunk(level: Level, lv: &[u16], first: usize, pairs: &mut [u64], exact: Option<&mut [u32]>, s: &mut CountScratch) {
    assert!(pairs.len() == lv.len() && exact.as_ref().is_none_or(|e| e.len() == lv.len()));
    #[cfg(target_arch = "x86_64")]
    match level.usable() {
        // SAFETY: `usable` is never above what the CPU has.
        Level::Avx512 => return unsafe { count_avx512(lv, first, pairs, exact, s) },
        Level::Avx2 => return unsafe { count_avx2(lv, first, pairs, exact, s) },
        Level::Portable | Level::Neon | Level::Sse41 => {}
    }
    let _ = level;
    count_body(lv, first, pairs, exact, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn count_avx2(lv: &[u16], first: usize, pairs: &mut [u64], exact: Option<&mut [u32]>, s: &mut CountScratch) {
    count_body(lv, first, pairs, exact, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn count_avx512(lv: &[u16], first: usize, pairs: &mut [u64], exact: Option<&mut [u32]>, s: &mut CountScratch) {
    count_body(lv, first, pairs, exact, s)
}

#[inline(always)]
fn count_body(lv: &[u16], first: usize, pairs: &mut [u64], exact: Option<&mut [u32]>, s: &mut CountScratch) {
    // the coded levels' range, and where the exact cells are
    let (mut lo, mut hi, mut n_exact) = (u16::MAX, 0u16, 0usize);
    let mut exact = exact;
    for (c, chunk) in lv.chunks(64).enumerate() {
        let (mut clo, mut chi, mut any) = (u16::MAX, 0u16, false);
        for &x in chunk {
            let e = x == EXACT_LEVEL;
            any |= e;
            clo = clo.min(x);
            chi = chi.max(if e { 0 } else { x });
        }
        (lo, hi) = (lo.min(clo), hi.max(chi));
        if any {
            for (k, _) in chunk.iter().enumerate().filter(|e| *e.1 == EXACT_LEVEL) {
                if let Some(ex) = exact.as_deref_mut() {
                    ex[n_exact] = (first + c * 64 + k) as u32;
                }
                n_exact += 1;
            }
        }
    }
    if let Some(ex) = exact {
        if n_exact < ex.len() {
            ex[n_exact] = END_EXACT;
        }
    }
    let coded = lv.len() - n_exact;
    let mut out = 0;
    if coded > 0 {
        // cells per level, WAYS counters each; an exact cell lands in slot r, not read
        let r = (hi - lo) as usize + 1;
        let w = r + 1;
        let slot = |x: u16| (x.wrapping_sub(lo) as usize).min(r);
        if s.ways.len() < WAYS * w {
            s.ways.resize(WAYS * w, 0);
        }
        let (c0, rest) = s.ways[..WAYS * w].split_at_mut(w);
        let (c1, rest) = rest.split_at_mut(w);
        let (c2, c3) = rest.split_at_mut(w);
        let mut quads = lv.chunks_exact(WAYS);
        for q in &mut quads {
            c0[slot(q[0])] += 1;
            c1[slot(q[1])] += 1;
            c2[slot(q[2])] += 1;
            c3[slot(q[3])] += 1;
        }
        for &x in quads.remainder() {
            c0[slot(x)] += 1;
        }
        for k in 0..w {
            let c = std::mem::take(&mut c0[k]) + std::mem::take(&mut c1[k]) + std::mem::take(&mut c2[k]) + std::mem::take(&mut c3[k]);
            if c > 0 && k < r {
                pairs[out] = ((lo as u64 + k as u64) << 32) | c as u64;
                out += 1;
            }
        }
    }
    if out < pairs.len() {
        pairs[out] = END;
    }
}

/// One chunk of a head's cells as [`count_chunk`] left it: its pairs and exact cells, and the
/// raw scores of its exact cells (`raw[j - first]` for cell j; other entries are not read).
#[derive(Clone, Copy)]
pub struct ChunkCounts<'a> {
    pub first: usize,
    pub pairs: &'a [u64],
    pub exact: &'a [u32],
    pub raw: &'a [f32],
}

/// The cells of one probability in the selection's order: coded levels `levels` (offsets from
/// the head's lowest level) with `coded` cells, and `ranked[exact]`.
struct Group {
    x: f32,
    levels: std::ops::Range<usize>,
    coded: usize,
    exact: std::ops::Range<usize>,
}

/// One head's distribution over its levels, between the steps of the module doc; reused from
/// step to step (no allocation once warm).
#[derive(Default)]
pub struct HeadLevels {
    /// the lowest coded level
    lo: u16,
    /// cells per level from `lo`
    count: Vec<u32>,
    /// each level's probability from `lo`, then 0 (what an exact cell looks up)
    prob: Vec<f32>,
    /// the exact cells in index order: (index, logit), then (index, probability)
    exact: Vec<(u32, f32)>,
    /// the exact cells by probability, highest first, then by index (from `softmax`)
    ranked: Vec<(u32, f32)>,
    /// the head's cells
    n: usize,
}

impl HeadLevels {
    /// The head's counts from its chunks (in index order), and its exact cells' logits.
    pub fn merge<'a>(&mut self, chunks: impl Iterator<Item = ChunkCounts<'a>> + Clone, scale: Scale) {
        let used = |c: &ChunkCounts| c.pairs.iter().position(|&x| x == END).unwrap_or(c.pairs.len());
        let (mut lo, mut hi) = (u16::MAX, 0u16);
        self.n = 0;
        for c in chunks.clone() {
            let k = used(&c);
            if k > 0 {
                (lo, hi) = (lo.min(pair_level(c.pairs[0])), hi.max(pair_level(c.pairs[k - 1])));
            }
            self.n += c.pairs.len();
        }
        let r = if lo <= hi { (hi - lo) as usize + 1 } else { 0 };
        self.lo = lo;
        self.count.clear();
        self.count.resize(r, 0);
        self.exact.clear();
        for c in chunks {
            for &x in &c.pairs[..used(&c)] {
                self.count[(pair_level(x) - lo) as usize] += x as u32;
            }
            for &j in c.exact.iter().take_while(|&&j| j != END_EXACT) {
                self.exact.push((j, scale.logit(c.raw[j as usize - c.first])));
            }
        }
    }

    /// Each level's probability and each exact cell's: exp(logit - max) times the inverse of
    /// the sum, as [`crate::approx::softmax`] gives them from the f32 scores, with one exp per
    /// level; `sink` is one more logit that takes mass but has no cell. The same bits at every
    /// instruction-set level.
    pub fn softmax(&mut self, level: Level, bias: f32, step: f32, scale: Scale, sink: Option<f32>) {
        #[cfg(target_arch = "x86_64")]
        match level.usable() {
            // SAFETY: `usable` is never above what the CPU has.
            Level::Avx512 => return unsafe { self.softmax_avx512(bias, step, scale, sink) },
            Level::Avx2 => return unsafe { self.softmax_avx2(bias, step, scale, sink) },
            Level::Portable | Level::Neon | Level::Sse41 => {}
        }
        let _ = level;
        self.softmax_body(bias, step, scale, sink)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn softmax_avx2(&mut self, bias: f32, step: f32, scale: Scale, sink: Option<f32>) {
        self.softmax_body(bias, step, scale, sink)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn softmax_avx512(&mut self, bias: f32, step: f32, scale: Scale, sink: Option<f32>) {
        self.softmax_body(bias, step, scale, sink)
    }

    #[inline(always)]
    fn softmax_body(&mut self, bias: f32, step: f32, scale: Scale, sink: Option<f32>) {
        let (r, lo) = (self.count.len(), self.lo);
        let logit = |level: u16| scale.logit(level_score(bias, step, level));
        // the scores grow with the level (step > 0), so the highest level has the largest logit
        let mut m = if r > 0 { logit(lo + (r - 1) as u16) } else { f32::NEG_INFINITY };
        for e in &self.exact {
            m = m.max(e.1);
        }
        if let Some(sk) = sink {
            m = m.max(sk);
        }
        self.prob.clear();
        self.prob.resize(r + 1, 0.0);
        if !m.is_finite() {
            // nothing visible (or every logit -inf): no mass anywhere
            self.exact.iter_mut().for_each(|e| e.1 = 0.0);
            self.rank_exact();
            return;
        }
        let prob = &mut self.prob[..r];
        for (k, e) in prob.iter_mut().enumerate() {
            *e = exp(logit(lo + k as u16) - m);
        }
        // The walk from the top level down takes the probabilities in order only if they do
        // not fall with the level. The logits grow with it, but the exp's polynomial (or a
        // soft cap's tanh) may dip by an ulp where its range reduction changes: keep the
        // larger one there.
        if prob.windows(2).any(|w| w[1] < w[0]) {
            for k in 1..r {
                prob[k] = prob[k].max(prob[k - 1]);
            }
        }
        // 8 partial sums, so that the loop vectorises; the same order at every level
        let count = &self.count[..r];
        let mut lanes = [0.0f64; 8];
        let whole = r / 8 * 8;
        for (c, e) in count[..whole].chunks_exact(8).zip(prob[..whole].chunks_exact(8)) {
            for i in 0..8 {
                lanes[i] += c[i] as f64 * e[i] as f64;
            }
        }
        let mut sum = lanes.iter().sum::<f64>();
        for k in whole..r {
            sum += count[k] as f64 * prob[k] as f64;
        }
        for e in self.exact.iter_mut() {
            e.1 = exp(e.1 - m);
            sum += e.1 as f64;
        }
        if let Some(sk) = sink {
            sum += exp(sk - m) as f64;
        }
        let inv = if sum > 0.0 { (1.0 / sum) as f32 } else { 0.0 };
        prob.iter_mut().for_each(|x| *x *= inv);
        self.exact.iter_mut().for_each(|e| e.1 *= inv);
        self.rank_exact();
    }

    /// `ranked` from the exact cells' probabilities.
    fn rank_exact(&mut self) {
        self.ranked.clear();
        self.ranked.extend_from_slice(&self.exact);
        self.ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    }

    /// The groups of equal probability, highest first.
    fn groups(&self) -> impl Iterator<Item = Group> + '_ {
        let (prob, count, ranked) = (&self.prob, &self.count, &self.ranked);
        let (mut k, mut i) = (count.len(), 0);
        std::iter::from_fn(move || {
            while k > 0 && count[k - 1] == 0 {
                k -= 1;
            }
            let x = match (k > 0, ranked.get(i)) {
                (false, None) => return None,
                (true, None) => prob[k - 1],
                (false, Some(e)) => e.1,
                (true, Some(e)) => std::cmp::max_by(e.1, prob[k - 1], f32::total_cmp),
            };
            // every group takes at least one level or one exact cell
            let (top, mut coded) = (k, 0);
            while k > 0 && prob[k - 1].total_cmp(&x) == Ordering::Equal {
                coded += count[k - 1] as usize;
                k -= 1;
            }
            let e0 = i;
            while ranked.get(i).is_some_and(|e| e.1.total_cmp(&x) == Ordering::Equal) {
                i += 1;
            }
            Some(Group { x, levels: k..top, coded, exact: e0..i })
        })
    }

    /// The group where the mass, summed from the top, reaches `tau`, the mass and count above
    /// it, and how many of its cells (by index) complete the set; None when the total falls
    /// short (by rounding) or `tau >= 1`: every cell.
    fn top_p_edge(&self, tau: f32) -> Option<(Group, usize, usize)> {
        if tau >= 1.0 {
            return None;
        }
        let need = tau as f64;
        let (mut above, mut n_above) = (0.0f64, 0usize);
        for g in self.groups() {
            let (c, x) = (g.coded + g.exact.len(), g.x as f64);
            // c * x is exact in f64 (c < 2^29, x has 24 bits)
            if above + c as f64 * x >= need {
                // the fewest cells m of the group with above + m x >= need (x > 0 here)
                let mut m = (((need - above) / x).ceil().clamp(1.0, c as f64) as usize).max(1);
                while m > 1 && above + (m - 1) as f64 * x >= need {
                    m -= 1;
                }
                while m < c && above + (m as f64) * x < need {
                    m += 1;
                }
                return Some((g, n_above, m));
            }
            above += c as f64 * x;
            n_above += c;
        }
        None
    }

    /// The size of the top-p set [`cut_top_p`](Self::cut_top_p) takes.
    pub fn count_top_p(&self, tau: f32) -> usize {
        match self.top_p_edge(tau) {
            Some((_, above, m)) => above + m,
            None => self.n,
        }
    }

    /// The top-p set at `tau`: the shortest prefix of the reference order whose mass reaches
    /// tau. `lv` gives the head's levels chunk by chunk, in index order, each with its first
    /// cell.
    pub fn cut_top_p<'a>(&self, tau: f32, lv: impl Iterator<Item = (usize, &'a [u16])>) -> Cut {
        match self.top_p_edge(tau) {
            Some((g, _, m)) => Cut::boundary(g.x, self.nth(&g, m, lv)),
            None => Cut::ALL,
        }
    }

    /// The top `k` cells in the reference order (`lv` as [`cut_top_p`](Self::cut_top_p)).
    pub fn cut_top_k<'a>(&self, k: usize, lv: impl Iterator<Item = (usize, &'a [u16])>) -> Cut {
        if k >= self.n {
            return Cut::ALL;
        }
        if k == 0 {
            return Cut::NONE;
        }
        let mut above = 0;
        let mut edge = None;
        for g in self.groups() {
            let c = g.coded + g.exact.len();
            if above + c >= k {
                edge = Some(g);
                break;
            }
            above += c;
        }
        match edge {
            Some(g) => Cut::boundary(g.x, self.nth(&g, k - above, lv)),
            None => Cut::ALL,
        }
    }

    /// The index of the m-th cell (from 1, in index order) of group `g`.
    fn nth<'a>(&self, g: &Group, m: usize, lv: impl Iterator<Item = (usize, &'a [u16])>) -> u32 {
        let exact = &self.ranked[g.exact.clone()];
        if g.coded == 0 {
            // ranked by index within one probability
            return exact.get(m - 1).map_or(u32::MAX, |e| e.0);
        }
        // coded cells: a level in a..=a + w (an exact cell's level is above every coded one)
        let (a, w) = (self.lo + g.levels.start as u16, (g.levels.len() - 1) as u16);
        let coded = |x: u16| x.wrapping_sub(a) <= w;
        let mut seen = 0;
        let mut next_exact = exact.iter().map(|e| e.0).peekable();
        for (first, lv) in lv {
            for (b, block) in lv.chunks(64).enumerate() {
                let at = first + b * 64;
                let ties = next_exact.peek().is_some_and(|&j| (j as usize) < at + block.len());
                let c = block.iter().map(|&x| coded(x) as u16).sum::<u16>() as usize;
                if !ties && seen + c < m {
                    seen += c;
                    continue;
                }
                for (t, &x) in block.iter().enumerate() {
                    let j = at + t;
                    let hit = if x == EXACT_LEVEL {
                        next_exact.next_if(|&e| e as usize == j).is_some()
                    } else {
                        coded(x)
                    };
                    seen += hit as usize;
                    if hit && seen == m {
                        return j as u32;
                    }
                }
            }
        }
        // not reached unless the counts and the levels disagree: the whole group
        u32::MAX
    }

    /// The probabilities of cells `first..first + lv.len()` of the head, from their levels.
    pub fn lookup(&self, level: Level, lv: &[u16], first: usize, p: &mut [f32]) {
        assert!(p.len() == lv.len() && !self.prob.is_empty());
        let (lo, prob) = (self.lo, &self.prob[..]);
        match level.usable() {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                // SAFETY: the CPU has AVX-512 F/BW (`usable` is never above what it has).
                let done = unsafe { lookup_avx512(lv, lo, prob, p) };
                lookup_tail(&lv[done..], lo, prob, &mut p[done..]);
            }
            // SAFETY: the CPU has AVX2.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { lookup_avx2(lv, lo, prob, p) },
            _ => lookup_tail(lv, lo, prob, p),
        }
        self.exact_over(p, first)
    }

    /// The exact cells' probabilities over the lookups of `p` (cells `first..`).
    fn exact_over(&self, p: &mut [f32], first: usize) {
        let (from, end) = (self.exact.partition_point(|e| (e.0 as usize) < first), first + p.len());
        for &(j, e) in self.exact[from..].iter().take_while(|e| (e.0 as usize) < end) {
            p[j as usize - first] = e;
        }
    }
}

/// `p[j] = prob[lv[j] - lo]`, and the last entry of `prob` for a level outside the table (an
/// exact cell's).
#[inline(always)]
fn lookup_tail(lv: &[u16], lo: u16, prob: &[f32], p: &mut [f32]) {
    let r = prob.len() - 1;
    for (pj, &x) in p.iter_mut().zip(lv) {
        *pj = prob[(x.wrapping_sub(lo) as usize).min(r)];
    }
}

/// [`lookup_tail`] compiled for AVX2 (its lookups become gathers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lookup_avx2(lv: &[u16], lo: u16, prob: &[f32], p: &mut [f32]) {
    lookup_tail(lv, lo, prob, p)
}

/// [`HeadLevels::lookup`]'s table lookups 16 cells a step (a gather each); returns the cells
/// done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn lookup_avx512(lv: &[u16], lo: u16, prob: &[f32], p: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = lv.len().min(p.len());
    assert!(!prob.is_empty() && prob.len() <= i32::MAX as usize);
    let (vlo, last, low16) = (_mm512_set1_epi32(lo as i32), _mm512_set1_epi32(prob.len() as i32 - 1), _mm512_set1_epi32(0xffff));
    let mut j = 0;
    while j + 16 <= n {
        let x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(lv.as_ptr().add(j) as *const __m256i));
        // (x - lo) mod 2^16, then at most the last entry: every index is inside `prob`
        let i = _mm512_min_epu32(_mm512_and_si512(_mm512_sub_epi32(x, vlo), low16), last);
        _mm512_storeu_ps(p.as_mut_ptr().add(j), _mm512_i32gather_ps::<4>(i, prob.as_ptr() as *const _));
        j += 16;
    }
    j
}

/// All of the module's steps for one head whose levels lie in one slice, in chunks of
/// `chunk` cells: the probabilities into `p`, and the head's [`HeadLevels`]. What the decode
/// path does across threads, in one place (tests, benchmarks, the one-thread path).
#[allow(clippy::too_many_arguments)]
pub fn softmax_in_chunks(
    level: Level,
    lv: &[u16],
    raw: &[f32],
    bias: f32,
    step: f32,
    scale: Scale,
    sink: Option<f32>,
    chunk: usize,
    head: &mut HeadLevels,
    scratch: &mut ChunkScratch,
    p: &mut [f32],
) {
    let n = lv.len();
    assert!(raw.len() == n && p.len() == n && chunk > 0);
    scratch.pairs.resize(n, 0);
    scratch.exact.resize(n, 0);
    for at in (0..n).step_by(chunk) {
        let end = (at + chunk).min(n);
        count_chunk(level, &lv[at..end], at, &mut scratch.pairs[at..end], Some(&mut scratch.exact[at..end]), &mut scratch.count);
    }
    let (pairs, exact) = (&scratch.pairs, &scratch.exact);
    let chunks = (0..n).step_by(chunk).map(|at| {
        let end = (at + chunk).min(n);
        ChunkCounts { first: at, pairs: &pairs[at..end], exact: &exact[at..end], raw: &raw[at..end] }
    });
    head.merge(chunks, scale);
    head.softmax(level, bias, step, scale, sink);
    head.lookup(level, lv, 0, p);
}

/// Scratch of [`softmax_in_chunks`].
#[derive(Default)]
pub struct ChunkScratch {
    pairs: Vec<u64>,
    exact: Vec<u32>,
    count: CountScratch,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approx::softmax_with;
    use crate::select::{top_k_sorted, top_p_sorted};

    fn rng(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Random levels of `n` cells over `span` levels, every `exact_every`-th cell exact; some
    /// exact cells score exactly as a coded level does (a tie between the two kinds).
    fn case(seed: &mut u64, n: usize, span: u16, exact_every: usize, bias: f32, step: f32) -> (Vec<u16>, Vec<f32>) {
        let base = (rng(seed) * 1000.0) as u16;
        let mut lv: Vec<u16> = (0..n).map(|_| base + (rng(seed) * span as f32) as u16 % span).collect();
        let mut raw: Vec<f32> = (0..n).map(|_| rng(seed) * 40.0 - 20.0).collect();
        if exact_every > 0 {
            for j in (0..n).step_by(exact_every) {
                if j % 3 == 0 && j + 1 < n && lv[j + 1] != EXACT_LEVEL {
                    raw[j] = level_score(bias, step, lv[j + 1]);
                }
                lv[j] = EXACT_LEVEL;
            }
        }
        (lv, raw)
    }

    #[test]
    fn probabilities_are_the_softmax_of_the_scores_in_any_chunks_at_every_level() {
        let mut seed = 23u64;
        let (mut head, mut scratch) = (HeadLevels::default(), ChunkScratch::default());
        for (n, span, exact_every) in [(1usize, 1u16, 0usize), (5, 3, 2), (100, 40, 0), (3000, 2500, 37), (8200, 16000, 0), (64, 10, 1)] {
            for (sink, softcap) in [(None, 0.0f32), (Some(2.0f32), 0.0), (None, 30.0)] {
                let (bias, step) = (-3.0f32 + rng(&mut seed), 0.002 + rng(&mut seed) * 0.01);
                let scale = Scale { kq_scale: 0.125, softcap };
                let (lv, raw) = case(&mut seed, n, span, exact_every, bias, step);
                // the reference: the f32 scores `KeyStore::scores` writes, then `logits` and `softmax`
                let mut want: Vec<f32> = lv.iter().zip(&raw).map(|(&x, &w)| scale.logit(if x == EXACT_LEVEL { w } else { level_score(bias, step, x) })).collect();
                softmax_with(Level::Portable, &mut want, sink);
                let mut first: Option<Vec<u32>> = None;
                for level in Level::ALL {
                    for chunk in [n, 1, 7, 1000] {
                        let mut p = vec![f32::NAN; n];
                        softmax_in_chunks(level, &lv, &raw, bias, step, scale, sink, chunk, &mut head, &mut scratch, &mut p);
                        for (j, (x, y)) in want.iter().zip(&p).enumerate() {
                            // the same exp per cell; the sum's additions run in another order
                            assert!((x - y).abs() <= 2e-6 * x.abs() + 1e-30, "n {n} cell {j} at {:?}: {x} vs {y}", level.usable());
                        }
                        // every level and every chunking gives the same bits
                        let bits: Vec<u32> = p.iter().map(|x| x.to_bits()).collect();
                        match &first {
                            Some(f) => assert_eq!(f, &bits, "n {n} at {:?}, chunks of {chunk}", level.usable()),
                            None => first = Some(bits),
                        }
                        // looked up piece by piece (the decode's value chunks), the same bits
                        let mut q = vec![f32::NAN; n];
                        for at in (0..n).step_by(5) {
                            let end = (at + 5).min(n);
                            head.lookup(level, &lv[at..end], at, &mut q[at..end]);
                        }
                        assert!(q.iter().zip(&p).all(|(x, y)| x.to_bits() == y.to_bits()), "n {n} at {:?}", level.usable());
                        // a higher level never has a lower probability
                        let mut by_level: Vec<(u16, f32)> = lv.iter().zip(&p).filter(|e| *e.0 != EXACT_LEVEL).map(|(&l, &x)| (l, x)).collect();
                        by_level.sort_by_key(|e| e.0);
                        assert!(by_level.windows(2).all(|w| w[0].1 <= w[1].1), "n {n}");
                    }
                }
            }
        }
        // nothing visible: zeros, as `softmax` gives, and every cell selected
        let mut p = vec![1.0f32; 3];
        let scale = Scale { kq_scale: 1.0, softcap: 0.0 };
        softmax_in_chunks(Level::Portable, &[EXACT_LEVEL; 3], &[f32::NEG_INFINITY; 3], 0.0, 1.0, scale, None, 3, &mut head, &mut scratch, &mut p);
        assert_eq!(p, vec![0.0; 3]);
        assert_eq!(head.cut_top_p(0.9, std::iter::once((0, &[EXACT_LEVEL; 3][..]))), Cut::ALL);
    }

    /// The cells a cut takes, in index order.
    fn taken(p: &[f32], cut: Cut) -> Vec<u32> {
        (0..p.len()).filter(|&j| cut.takes_p(j, p[j])).map(|j| j as u32).collect()
    }

    #[test]
    fn selection_from_the_levels_is_the_sort_reference() {
        let mut seed = 41u64;
        let (mut head, mut scratch) = (HeadLevels::default(), ChunkScratch::default());
        let scale = Scale { kq_scale: 0.125, softcap: 0.0 };
        // few levels (long ties), many, exact cells among them and tied with them, one cell
        for (n, span, exact_every) in [(1usize, 1u16, 0usize), (2, 1, 2), (300, 3, 0), (300, 3, 7), (3000, 200, 0), (3000, 2500, 11), (9000, 40, 5), (40, 8, 1)] {
            for sink in [None, Some(4.0f32)] {
                let (bias, step) = (-3.0f32 + rng(&mut seed), 0.005 + rng(&mut seed) * 0.05);
                let (lv, raw) = case(&mut seed, n, span, exact_every, bias, step);
                let mut p = vec![0.0f32; n];
                let mut cuts = Vec::new();
                for chunk in [n.max(1), 13] {
                    softmax_in_chunks(Level::Portable, &lv, &raw, bias, step, scale, sink, chunk, &mut head, &mut scratch, &mut p);
                    let pieces = || (0..n).step_by(chunk).map(|at| (at, &lv[at..(at + chunk).min(n)]));
                    for tau in [0.0f32, 0.1, 0.5, 0.9, 0.99, 1.0] {
                        let mut want = top_p_sorted(&p, tau);
                        want.sort_unstable();
                        let cut = head.cut_top_p(tau, pieces());
                        assert_eq!(taken(&p, cut), want, "n {n} span {span} exact every {exact_every} tau {tau} chunks of {chunk}");
                        assert_eq!(head.count_top_p(tau), want.len(), "n {n} tau {tau}");
                        cuts.push(cut);
                    }
                    for k in [0, 1, 2, n / 3, n / 2, n.saturating_sub(1), n, n + 1] {
                        let cut = head.cut_top_k(k, pieces());
                        assert_eq!(taken(&p, cut), top_k_sorted(&p, k), "n {n} span {span} k {k} chunks of {chunk}");
                        cuts.push(cut);
                    }
                }
                // one chunk and many find the same cuts
                let (one, many) = cuts.split_at(cuts.len() / 2);
                assert_eq!(one, many, "n {n}");
            }
        }
    }
}
