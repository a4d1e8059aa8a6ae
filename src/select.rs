//! Top-p token selection: the smallest set of tokens whose attention probabilities reach `tau`.
//!
//! The order is by probability, highest first, and among equal probabilities by index, lowest
//! first; the set is the shortest prefix of that order whose mass reaches tau. [`top_p_sorted`]
//! is the reference (a full sort). [`TopP`] finds the same set without sorting, which is what
//! runs per head per decode step: a histogram of the probabilities' bit patterns (mass and
//! count per bucket) finds the bucket where the boundary lies, a partition-based search among
//! that bucket's few members finds the boundary token, and one last pass in index order keeps
//! every token ranked above it. Masses are summed in f64 by both, so they agree wherever the
//! sums are exact.

use crate::simd::Level;

/// Reference: sort everything, take the shortest prefix reaching `tau`. Returns the selected
/// indices in selection order. `tau >= 1` selects everything.
pub fn top_p_sorted(p: &[f32], tau: f32) -> Vec<u32> {
    let mut order: Vec<u32> = (0..p.len() as u32).collect();
    order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
    if tau >= 1.0 {
        return order;
    }
    let mut mass = 0.0f64;
    for (k, &i) in order.iter().enumerate() {
        mass += p[i as usize] as f64;
        if mass >= tau as f64 {
            order.truncate(k + 1);
            return order;
        }
    }
    order
}

/// Histogram buckets: the top 11 bits of the order-preserving key (sign, exponent, 2 bits of
/// mantissa), so a bucket spans at most a factor 1.25 of probability. Probabilities lie in
/// [0, 1], keys 1024 to 1532 of those 2048; anything outside (a NaN, a rounding above 1) is
/// clamped into the first or last of BUCKETS buckets from FIRST, which keeps the order.
const BUCKET_SHIFT: u32 = 21;
const FIRST: u32 = 1024;
const BUCKETS: usize = 512;

/// Sub-histograms filled in turn, so that runs of equal buckets do not wait on each other.
const WAYS: usize = 4;

#[inline(always)]
fn bucket_of(x: f32) -> u16 {
    ((key(x) >> BUCKET_SHIFT).clamp(FIRST, FIRST + BUCKETS as u32 - 1) - FIRST) as u16
}

/// A u32 that orders like `f32::total_cmp`.
#[inline(always)]
fn key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 0 {
        b | 0x8000_0000
    } else {
        !b
    }
}

/// Count and probability mass per bucket of one distribution, and each token's bucket: built
/// once per head and step, then used by [`TopP::count_with`] and [`TopP::top_k_with`] (one k
/// per layer needs both).
#[derive(Default)]
pub struct Histogram {
    count: Vec<u32>,
    mass: Vec<f64>,
    /// WAYS sub-histograms, zero between builds
    ways_count: Vec<u32>,
    ways_mass: Vec<f64>,
    /// bucket of each token
    bucket: Vec<u16>,
    /// lowest and highest bucket in use (lo > hi when empty)
    lo: usize,
    hi: usize,
}

impl Histogram {
    /// Each token's bucket, from the last [`build`](Self::build).
    pub fn buckets(&self) -> &[u16] {
        &self.bucket
    }

    pub fn build(&mut self, p: &[f32]) {
        // the buffers, allocated once
        if self.count.is_empty() {
            self.count = vec![0; BUCKETS];
            self.mass = vec![0.0; BUCKETS];
            self.ways_count = vec![0; WAYS * BUCKETS];
            self.ways_mass = vec![0.0; WAYS * BUCKETS];
        }
        self.bucket.clear();
        self.bucket.extend(p.iter().map(|&x| bucket_of(x)));
        let (lo, hi) = self.bucket.iter().fold((u16::MAX, 0u16), |(lo, hi), &b| (lo.min(b), hi.max(b)));
        let (wc, wm) = (&mut self.ways_count[..WAYS * BUCKETS], &mut self.ways_mass[..WAYS * BUCKETS]);
        for (b, x) in self.bucket.chunks_exact(WAYS).zip(p.chunks_exact(WAYS)) {
            for w in 0..WAYS {
                // a bucket is below BUCKETS (bucket_of clamps), so `at` is in bounds
                let at = (w * BUCKETS + b[w] as usize).min(WAYS * BUCKETS - 1);
                wc[at] += 1;
                wm[at] += x[w] as f64;
            }
        }
        let tail = p.len() / WAYS * WAYS;
        for (b, x) in self.bucket[tail..].iter().zip(&p[tail..]) {
            wc[*b as usize] += 1;
            wm[*b as usize] += *x as f64;
        }
        (self.lo, self.hi) = if p.is_empty() { (1, 0) } else { (lo as usize, hi as usize) };
        for b in self.lo..=self.hi {
            let (mut c, mut m) = (0, 0.0);
            for w in 0..WAYS {
                c += std::mem::take(&mut wc[w * BUCKETS + b]);
                m += std::mem::take(&mut wm[w * BUCKETS + b]);
            }
            self.count[b] = c;
            self.mass[b] = m;
        }
    }
}

/// Append to `out` the indices i whose `take(i, bucket[i])` holds, in order. Every index is
/// written and the length advances only when taken: no branch to mispredict on a selection
/// that is scattered over the tokens.
#[inline(always)]
fn compact(bucket: &[u16], out: &mut Vec<u32>, take: impl Fn(usize, u16) -> bool) {
    let start = out.len();
    out.resize(start + bucket.len() + 1, 0);
    let dst = &mut out[start..];
    let mut len = 0;
    for (i, &b) in bucket.iter().enumerate() {
        dst[len] = i as u32;
        len += take(i, b) as usize;
    }
    out.truncate(start + len);
}

/// [`compact`] for AVX-512, 32 buckets a step: appends to `out` the indices whose bucket is
/// above `edge` (when `above`) or equal to it and `tie(i)` holds, in order. The taken indices
/// of each 16 are packed with a compress and stored whole; only the few lanes in the edge
/// bucket are looked at one by one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn compact_avx512(bucket: &[u16], out: &mut Vec<u32>, edge: u16, above: bool, tie: impl Fn(usize) -> bool) {
    use std::arch::x86_64::*;
    let (start, n) = (out.len(), bucket.len());
    // every full store writes 16 lanes at or past the current length
    out.reserve(n + 32);
    let dst = out.as_mut_ptr().add(start);
    let mut len = 0usize;
    let sixteen = _mm512_set1_epi32(16);
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut i = 0;
    while i + 32 <= n {
        let take = take_mask32(bucket, i, edge, above, &tie);
        if take != 0 {
            let (lo, hi) = (take as u16, (take >> 16) as u16);
            // len <= i here, so both stores end within the n + 32 reserved
            _mm512_storeu_si512(dst.add(len) as *mut _, _mm512_maskz_compress_epi32(lo, idx));
            len += lo.count_ones() as usize;
            _mm512_storeu_si512(dst.add(len) as *mut _, _mm512_maskz_compress_epi32(hi, _mm512_add_epi32(idx, sixteen)));
            len += hi.count_ones() as usize;
        }
        idx = _mm512_add_epi32(idx, _mm512_add_epi32(sixteen, sixteen));
        i += 32;
    }
    for (j, &b) in bucket.iter().enumerate().skip(i) {
        if (above && b > edge) || (b == edge && tie(j)) {
            *dst.add(len) = j as u32;
            len += 1;
        }
    }
    out.set_len(start + len);
}

/// Which of the 32 tokens from `at` are taken, bit j for token `at + j`: those whose bucket
/// is above `edge` (when `above`), and those in it for which `tie` holds (looked at one by
/// one; few tokens share the edge bucket).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
pub(crate) unsafe fn take_mask32(bucket: &[u16], at: usize, edge: u16, above: bool, tie: impl Fn(usize) -> bool) -> u32 {
    use std::arch::x86_64::*;
    let e = _mm512_set1_epi16(edge as i16);
    let b = _mm512_loadu_si512(bucket[at..at + 32].as_ptr() as *const _);
    let mut take: u32 = if above { _mm512_cmpgt_epu16_mask(b, e) } else { 0 };
    let mut eq: u32 = _mm512_cmpeq_epi16_mask(b, e);
    while eq != 0 {
        let t = eq.trailing_zeros();
        if tie(at + t as usize) {
            take |= 1 << t;
        }
        eq &= eq - 1;
    }
    take
}

/// Reusable buffers for the selections, so that the decode loop does not allocate once warm.
#[derive(Default)]
pub struct TopP {
    cand: Vec<u32>,
    next: Vec<u32>,
    ties: Vec<u32>,
    /// the boundary bucket's members, kept for counting
    edge: Vec<u32>,
    /// the histogram of the one-call forms (`select`, `count`, `top_k`)
    hist: Histogram,
    /// the kernels' instruction set when not the process's (tests and benchmarks)
    level: Option<Level>,
}

/// The last token taken in the reference order: everything ranked above it (a higher
/// probability, or the same one at a lower index) is taken too.
#[derive(Clone, Copy)]
struct Boundary {
    value: f32,
    index: u32,
}

/// A selection as a rule rather than a list: token i (probability p, histogram bucket b) is
/// taken when b is above `edge`, or equal to it and i ranks at or above the boundary token
/// (key, index). Applied in index order it gives the selection's list; the value sum of
/// several heads applies their cuts in one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    edge: u16,
    key: u32,
    index: u32,
}

impl Cut {
    /// Every token (bucket 0 with every key, every index).
    pub const ALL: Cut = Cut { edge: 0, key: 0, index: u32::MAX };
    /// No token (buckets stay below `u16::MAX`).
    pub const NONE: Cut = Cut { edge: u16::MAX, key: u32::MAX, index: 0 };

    fn at(b: Boundary) -> Cut {
        Cut { edge: bucket_of(b.value), key: key(b.value), index: b.index }
    }

    /// Every token ranked at or above the token `index` of probability `value`.
    pub(crate) fn boundary(value: f32, index: u32) -> Cut {
        Cut::at(Boundary { value, index })
    }

    /// The bucket that needs a look at the token itself.
    pub fn edge(&self) -> u16 {
        self.edge
    }

    /// Whether token `i` of probability `p` in bucket `bucket` is taken.
    #[inline(always)]
    pub fn takes(&self, i: usize, bucket: u16, p: f32) -> bool {
        bucket > self.edge || (bucket == self.edge && self.takes_in_edge(i, p))
    }

    /// [`takes`](Self::takes) from the probability alone: by its order key, which the buckets
    /// follow, so the answer is the same for every cut that [`TopP`] makes, and for
    /// [`Cut::ALL`] and [`Cut::NONE`].
    #[inline(always)]
    pub fn takes_p(&self, i: usize, p: f32) -> bool {
        let k = key(p);
        self.edge != Cut::NONE.edge && (k > self.key || (k == self.key && i as u32 <= self.index))
    }

    /// The order key (as [`f32::total_cmp`] orders) of the boundary token; a token whose key
    /// is above it is taken.
    pub fn key(&self) -> u32 {
        self.key
    }

    /// The boundary token: among the tokens with its key, those at or below this index are
    /// taken.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The same cut over the tokens from `first` on, numbered from 0 there: token i takes the
    /// same answer as token `first + i` from `self`. When the boundary token lies before
    /// `first`, the tokens of its key that remain all rank below it, so the cut becomes "a key
    /// above the boundary's", which is the next key with every index. The edge bucket is
    /// kept: the buckets follow the keys, so `takes` still agrees.
    pub fn renumbered_from(&self, first: usize) -> Cut {
        if self.edge == Cut::NONE.edge {
            return Cut::NONE;
        }
        match u32::try_from(first) {
            Ok(f) if f <= self.index => Cut { index: self.index - f, ..*self },
            _ if self.key == u32::MAX => Cut::NONE,
            _ => Cut { key: self.key + 1, index: u32::MAX, ..*self },
        }
    }

    /// [`takes`](Self::takes) for a token in the edge bucket.
    #[inline(always)]
    pub fn takes_in_edge(&self, i: usize, p: f32) -> bool {
        let k = key(p);
        k > self.key || (k == self.key && i as u32 <= self.index)
    }
}

impl TopP {
    /// Buffers whose kernels run at `level` (or the best the CPU has below it).
    pub fn at(level: Level) -> TopP {
        TopP { level: Some(level), ..TopP::default() }
    }

    fn level(&self) -> Level {
        self.level.map_or_else(crate::simd::level, Level::usable)
    }

    /// The same set as [`top_p_sorted`] (in index order, not selection order), written into
    /// `out`. Returns the selected mass.
    pub fn select(&mut self, p: &[f32], tau: f32, out: &mut Vec<u32>) -> f64 {
        out.clear();
        if tau >= 1.0 {
            out.extend(0..p.len() as u32);
            return p.iter().map(|&x| x as f64).sum();
        }
        let mut h = std::mem::take(&mut self.hist);
        h.build(p);
        let r = self.select_with(p, &h, tau, out);
        self.hist = h;
        r
    }

    /// [`select`](Self::select) with the histogram of `p` already built.
    pub fn select_with(&mut self, p: &[f32], h: &Histogram, tau: f32, out: &mut Vec<u32>) -> f64 {
        let (cut, mass) = self.cut_with(p, h, tau);
        out.clear();
        Self::collect(self.level(), p, h, cut, out);
        mass
    }

    /// The set of [`select_with`](Self::select_with) as a [`Cut`], and its mass.
    pub fn cut_with(&mut self, p: &[f32], h: &Histogram, tau: f32) -> (Cut, f64) {
        if tau >= 1.0 {
            return (Cut::ALL, p.iter().map(|&x| x as f64).sum());
        }
        let Some((edge, above, _)) = Self::mass_edge(h, tau as f64) else {
            // the total mass is below tau (rounding): everything is selected
            return (Cut::ALL, h.mass[h.lo..=h.hi].iter().sum());
        };
        self.members(h, edge);
        let (last, taken) = self.boundary_by_mass(p, tau as f64 - above);
        (Cut::at(last), above + taken)
    }

    /// The size of the set [`select`](Self::select) would return, without collecting it.
    pub fn count(&mut self, p: &[f32], tau: f32) -> usize {
        if tau >= 1.0 {
            return p.len();
        }
        let mut h = std::mem::take(&mut self.hist);
        h.build(p);
        let r = self.count_with(p, &h, tau);
        self.hist = h;
        r
    }

    /// [`count`](Self::count) with the histogram of `p` already built.
    pub fn count_with(&mut self, p: &[f32], h: &Histogram, tau: f32) -> usize {
        if tau >= 1.0 {
            return p.len();
        }
        let Some((edge, above, n_above)) = Self::mass_edge(h, tau as f64) else {
            return p.len();
        };
        self.members(h, edge);
        self.edge.clone_from(&self.cand);
        let (last, _) = self.boundary_by_mass(p, tau as f64 - above);
        let (kb, ib) = (key(last.value), last.index);
        n_above
            + self
                .edge
                .iter()
                .filter(|&&i| {
                    let k = key(p[i as usize]);
                    k > kb || (k == kb && i <= ib)
                })
                .count()
    }

    /// The top `k` indices of `p` in the reference order (probability, then index), written
    /// into `out` in index order.
    pub fn top_k(&mut self, p: &[f32], k: usize, out: &mut Vec<u32>) {
        let mut h = std::mem::take(&mut self.hist);
        h.build(p);
        self.top_k_with(p, &h, k, out);
        self.hist = h;
    }

    /// [`top_k`](Self::top_k) with the histogram of `p` already built.
    pub fn top_k_with(&mut self, p: &[f32], h: &Histogram, k: usize, out: &mut Vec<u32>) {
        let cut = self.cut_top_k_with(p, h, k);
        out.clear();
        Self::collect(self.level(), p, h, cut, out);
    }

    /// The set of [`top_k_with`](Self::top_k_with) as a [`Cut`].
    pub fn cut_top_k_with(&mut self, p: &[f32], h: &Histogram, k: usize) -> Cut {
        if k >= p.len() {
            return Cut::ALL;
        }
        if k == 0 {
            return Cut::NONE;
        }
        let mut above = 0usize;
        let mut edge = h.lo;
        for b in (h.lo..=h.hi).rev() {
            if above + h.count[b] as usize >= k {
                edge = b;
                break;
            }
            above += h.count[b] as usize;
        }
        self.members(h, edge);
        let r = k - above; // 1 ..= members
        let by_rank = |a: &u32, b: &u32| p[*b as usize].total_cmp(&p[*a as usize]).then(a.cmp(b));
        self.cand.select_nth_unstable_by(r - 1, by_rank);
        let i = self.cand[r - 1];
        Cut::at(Boundary { value: p[i as usize], index: i })
    }

    /// The bucket where the mass, summed from the top, reaches `need`: (bucket, mass above it,
    /// count above it); None when the total falls short.
    fn mass_edge(h: &Histogram, need: f64) -> Option<(usize, f64, usize)> {
        let (mut above, mut n_above) = (0.0f64, 0usize);
        for b in (h.lo..=h.hi).rev() {
            if above + h.mass[b] >= need {
                return Some((b, above, n_above));
            }
            above += h.mass[b];
            n_above += h.count[b] as usize;
        }
        None
    }

    /// The indices in bucket `edge`, into `cand`.
    fn members(&mut self, h: &Histogram, edge: usize) {
        self.cand.clear();
        let edge = edge as u16;
        #[cfg(target_arch = "x86_64")]
        if self.level() >= Level::Avx512 {
            // SAFETY: the CPU has AVX-512 F/BW (`level` is never above what it has).
            return unsafe { compact_avx512(&h.bucket, &mut self.cand, edge, false, |_| true) };
        }
        // few tokens share the boundary's bucket: a plain filter predicts well
        self.cand.extend(h.bucket.iter().enumerate().filter(|(_, &b)| b == edge).map(|(i, _)| i as u32));
    }

    /// Among `cand`, the last token of the shortest reference-order prefix whose mass reaches
    /// `need`, by partitioning around median-of-three pivots; and that prefix's mass.
    fn boundary_by_mass(&mut self, p: &[f32], mut need: f64) -> (Boundary, f64) {
        let mut taken = 0.0f64;
        // the lowest-ranked token taken so far, for when the mass runs out by rounding
        let mut last: Option<Boundary> = None;
        while !self.cand.is_empty() {
            let n = self.cand.len();
            let (a, b, c) = (p[self.cand[0] as usize], p[self.cand[n / 2] as usize], p[self.cand[n - 1] as usize]);
            let x = a.max(b).min(a.min(b).max(c));
            let (mut s_hi, mut s_eq) = (0.0f64, 0.0f64);
            for &i in &self.cand {
                let v = p[i as usize];
                if v > x {
                    s_hi += v as f64;
                } else if v == x {
                    s_eq += v as f64;
                }
            }
            if s_hi >= need {
                // the boundary lies among the values above x
                self.next.clear();
                self.next.extend(self.cand.iter().copied().filter(|&i| p[i as usize] > x));
                std::mem::swap(&mut self.cand, &mut self.next);
                continue;
            }
            // the ties at x are taken by index until the mass is reached
            self.ties.clear();
            self.ties.extend(self.cand.iter().copied().filter(|&i| p[i as usize] == x));
            self.ties.sort_unstable();
            if s_hi + s_eq >= need {
                let mut rest = need - s_hi;
                taken += s_hi;
                for &i in &self.ties {
                    taken += x as f64;
                    rest -= x as f64;
                    if rest <= 0.0 {
                        return (Boundary { value: x, index: i }, taken);
                    }
                }
                // unreachable unless rounding: all ties taken
                let i = *self.ties.last().expect("x is a candidate's value");
                return (Boundary { value: x, index: i }, taken);
            }
            // everything at or above x is taken; the boundary is below x
            taken += s_hi + s_eq;
            need -= s_hi + s_eq;
            last = Some(Boundary { value: x, index: *self.ties.last().expect("x is a candidate's value") });
            self.next.clear();
            self.next.extend(self.cand.iter().copied().filter(|&i| p[i as usize] < x));
            std::mem::swap(&mut self.cand, &mut self.next);
        }
        // the bucket's mass fell short by rounding: all of it is taken
        (last.unwrap_or(Boundary { value: f32::INFINITY, index: 0 }), taken)
    }

    /// Every index `cut` takes, in index order.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn collect(level: Level, p: &[f32], h: &Histogram, cut: Cut, out: &mut Vec<u32>) {
        if cut == Cut::ALL {
            out.extend(0..p.len() as u32);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if level >= Level::Avx512 {
            // SAFETY: the CPU has AVX-512 F/BW (`level` is never above what it has).
            return unsafe { compact_avx512(&h.bucket, out, cut.edge, true, |i| cut.takes_in_edge(i, p[i])) };
        }
        compact(&h.bucket, out, |i, b| cut.takes(i, b, p[i]));
    }
}

/// The paper's layer-wide k: every head keeps its own top-k tokens, with k the smallest value
/// on the grid 1, 1+s, 1+2s, ... (s = max(1, n/100)) at which every head of the layer reaches
/// tau. `k_heads` are the per-head minimal k's.
pub fn layer_k(k_heads: &[usize], n: usize) -> usize {
    let kmax = k_heads.iter().copied().max().unwrap_or(0);
    if kmax == 0 || n == 0 {
        return kmax.min(n);
    }
    let s = (n / 100).max(1);
    (1 + (kmax - 1).div_ceil(s) * s).min(n)
}

/// Reference for [`TopP::top_k`]: a full sort.
pub fn top_k_sorted(p: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..p.len() as u32).collect();
    order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
    order.truncate(k);
    order.sort_unstable();
    order
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 40) as f32 / (1u64 << 24) as f32
    }

    pub(crate) fn softmax(z: &[f32]) -> Vec<f32> {
        let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = z.iter().map(|x| (x - m).exp()).collect();
        let s: f32 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn sorted_set(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[test]
    fn a_cut_takes_the_same_tokens_by_bucket_and_by_probability() {
        let mut seed = 3u64;
        let z: Vec<f32> = (0..3000).map(|i| if i % 7 == 0 { 2.0 } else { rng(&mut seed) * 6.0 }).collect();
        let mut p = softmax(&z);
        // a few exact zeros and a value above 1 (rounding) at the ends of the buckets
        p[5] = 0.0;
        p[6] = 1.0000001;
        let mut h = Histogram::default();
        h.build(&p);
        let mut top = TopP::default();
        let mut cuts = vec![Cut::ALL, Cut::NONE];
        for tau in [0.1f32, 0.5, 0.9, 0.99, 1.0] {
            cuts.push(top.cut_with(&p, &h, tau).0);
        }
        for k in [0, 1, 7, 2999, 3000] {
            cuts.push(top.cut_top_k_with(&p, &h, k));
        }
        // the boundary at the top key, for a renumbering past it
        cuts.push(Cut { edge: (BUCKETS - 1) as u16, key: u32::MAX, index: 10 });
        for cut in cuts {
            for (i, &x) in p.iter().enumerate() {
                assert_eq!(cut.takes(i, h.buckets()[i], x), cut.takes_p(i, x), "{cut:?} token {i} p {x}");
            }
            // renumbered from before, at and past the boundary token: the same answers
            for first in [0, 1, 6, 7, 1000, cut.index() as usize, cut.index() as usize + 1, 2999, 3000] {
                let r = cut.renumbered_from(first);
                for (i, &x) in p.iter().enumerate().skip(first) {
                    let want = cut.takes_p(i, x);
                    assert_eq!(r.takes_p(i - first, x), want, "{cut:?} from {first}: token {i} p {x}");
                    assert_eq!(r.takes(i - first, h.buckets()[i], x), want, "{cut:?} from {first} by bucket: token {i} p {x}");
                }
            }
        }
        // the top key's tokens are all taken or none is
        let top_key = Cut { edge: (BUCKETS - 1) as u16, key: u32::MAX, index: 10 };
        assert!(top_key.renumbered_from(4).takes_p(6, f32::from_bits(0x7fff_ffff)));
        assert_eq!(top_key.renumbered_from(11), Cut::NONE);
    }

    #[test]
    fn equals_sort_reference_on_random_distributions() {
        for level in Level::ALL {
            equals_sort_reference_at(level);
        }
    }

    fn equals_sort_reference_at(level: Level) {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut sel = TopP::at(level);
        let mut out = Vec::new();
        // lengths past 700 reach the 32-bucket steps of the SIMD compaction, and their tails
        for trial in 0..300 {
            let n = 1 + (trial * 37) % 700 + if trial % 5 == 0 { 3000 } else { 0 };
            let sharp = 1.0 + (trial % 7) as f32 * 2.0;
            let coarse = trial % 4 == 0;
            let z: Vec<f32> = (0..n).map(|_| if coarse { (rng(&mut seed) * sharp).floor() } else { rng(&mut seed) * sharp }).collect();
            let p = softmax(&z);
            for tau in [0.1f32, 0.5, 0.9, 0.99, 0.999999, 1.0] {
                sel.select(&p, tau, &mut out);
                assert_eq!(out, sorted_set(top_p_sorted(&p, tau)), "{level:?} trial {trial} n {n} tau {tau}");
                assert_eq!(sel.count(&p, tau), out.len(), "{level:?} trial {trial} n {n} tau {tau}");
            }
        }
    }

    #[test]
    fn equals_sort_reference_with_ties() {
        for level in Level::ALL {
            equals_sort_reference_with_ties_at(level);
        }
    }

    fn equals_sort_reference_with_ties_at(level: Level) {
        let mut sel = TopP::at(level);
        let mut out = Vec::new();
        // many exact ties, including at the boundary: 8 tokens of 0.125
        let p = vec![0.125f32; 8];
        for tau in [0.1f32, 0.125, 0.3, 0.5, 0.9] {
            sel.select(&p, tau, &mut out);
            let want = sorted_set(top_p_sorted(&p, tau));
            assert_eq!(out, want, "tau {tau}");
            assert_eq!(out, (0..want.len() as u32).collect::<Vec<_>>(), "ties go to the lowest indices");
        }
        // ties mixed with distinct values, in shuffled positions
        let p = vec![0.05f32, 0.2, 0.05, 0.2, 0.1, 0.2, 0.05, 0.05, 0.1];
        for tau in [0.15f32, 0.4, 0.45, 0.61, 0.75, 0.85, 0.95] {
            sel.select(&p, tau, &mut out);
            assert_eq!(out, sorted_set(top_p_sorted(&p, tau)), "tau {tau}");
        }
        // 100 ties straddling the 32-token steps of the SIMD compaction
        let p: Vec<f32> = (0..100).map(|i| if (10..90).contains(&i) { 0.01 } else { 0.2 / 20.0 - 1e-5 * (i % 3) as f32 }).collect();
        for tau in [0.3f32, 0.5, 0.77, 0.9] {
            sel.select(&p, tau, &mut out);
            assert_eq!(out, sorted_set(top_p_sorted(&p, tau)), "{level:?} tau {tau}");
        }
    }

    #[test]
    fn selected_mass_reaches_tau_with_the_fewest_tokens() {
        let mut seed = 7u64;
        let z: Vec<f32> = (0..1000).map(|_| rng(&mut seed) * 8.0).collect();
        let p = softmax(&z);
        let mut out = Vec::new();
        let mass = TopP::default().select(&p, 0.9, &mut out);
        assert!(mass >= 0.9);
        let smallest: f32 = out.iter().map(|&i| p[i as usize]).fold(f32::INFINITY, f32::min);
        assert!(mass - (smallest as f64) < 0.9, "one token fewer would still reach tau");
    }

    #[test]
    fn layer_k_follows_the_one_percent_grid() {
        assert_eq!(layer_k(&[3, 7, 5], 50), 7); // grid step 1 below 200 tokens
        assert_eq!(layer_k(&[150, 10], 1000), 151); // step 10: 1, 11, ..., 141, 151
        assert_eq!(layer_k(&[151], 1000), 151);
        assert_eq!(layer_k(&[152], 1000), 161);
        assert_eq!(layer_k(&[999], 1000), 1000);
    }

    #[test]
    fn top_k_is_the_reference_prefix() {
        let p = vec![0.1f32, 0.3, 0.1, 0.3, 0.2];
        let mut sel = TopP::default();
        let mut out = Vec::new();
        sel.top_k(&p, 3, &mut out);
        assert_eq!(out, vec![1, 3, 4]);
        sel.top_k(&p, 4, &mut out);
        assert_eq!(out, vec![0, 1, 3, 4], "the tie at 0.1 goes to index 0");
        sel.top_k(&p, 9, &mut out);
        assert_eq!(out.len(), 5);
        sel.top_k(&p, 0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn top_k_equals_sort_reference_on_random_distributions() {
        for level in Level::ALL {
            top_k_equals_sort_reference_at(level);
        }
    }

    fn top_k_equals_sort_reference_at(level: Level) {
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut sel = TopP::at(level);
        let mut out = Vec::new();
        for trial in 0..200 {
            let n: usize = 1 + (trial * 53) % 900 + if trial % 4 == 1 { 2500 } else { 0 };
            // coarse values make many ties, inside buckets and across them
            let coarse = trial % 3 == 0;
            let z: Vec<f32> = (0..n).map(|_| if coarse { (rng(&mut seed) * 6.0).floor() } else { rng(&mut seed) * 12.0 }).collect();
            let p = softmax(&z);
            for k in [1, n / 7 + 1, n / 2, n.saturating_sub(1).max(1), n] {
                sel.top_k(&p, k, &mut out);
                assert_eq!(out, top_k_sorted(&p, k), "{level:?} trial {trial} n {n} k {k}");
            }
        }
    }
}
