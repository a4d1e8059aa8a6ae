//! Product-quantization codebooks for the keys, and the k-means that fits them.
//!
//! A key of head dimension d is stored as g = d/s codes, one per s-dim sub-vector, each the
//! index of the nearest centroid of a [`Codebook`]. Two operations are hot: encoding every new
//! key (one nearest-centroid search per sub-vector) and, once per decode step and head, the
//! lookup table of query-centroid dot products from which every token's approximate logit is
//! a sum of g table entries. Both run over all centroids for a tiny s (1..8), so the codebook
//! keeps a second, blocked copy of its centroids laid out so that the loop over centroids is the
//! vectorised one.
//!
//! [`KMeans`] fits a codebook offline on post-RoPE key sub-vectors, following the paper's use
//! of mini-batch k-means. The fit is parallel but bit-identical for any number of threads, so
//! the same data and seed give the same codebook on a laptop and on a many-core server.

use std::collections::HashSet;
use std::fmt;

use half::f16;
use rayon::prelude::*;
use thiserror::Error;

/// Centroids per block of the blocked layout. Eight f32 lanes fill one AVX register or two SSE
/// ones; the per-lane running minimum keeps the argmin free of a loop-carried branch.
const LANES: usize = 8;

/// A vector dimension known at compile time for the common sub-vector sizes, so the kernels'
/// inner loops unroll; other sizes run the same code with a runtime bound.
trait Dim: Copy {
    fn n(self) -> usize;
}

#[derive(Clone, Copy)]
struct Fixed<const D: usize>;

impl<const D: usize> Dim for Fixed<D> {
    #[inline(always)]
    fn n(self) -> usize {
        D
    }
}

#[derive(Clone, Copy)]
struct Runtime(usize);

impl Dim for Runtime {
    #[inline(always)]
    fn n(self) -> usize {
        self.0
    }
}

/// Evaluates `$body` with `$d` bound to a [`Dim`] for `$dim`.
macro_rules! by_dim {
    ($dim:expr, $d:ident => $body:expr) => {
        match $dim {
            1 => {
                let $d = Fixed::<1>;
                $body
            }
            2 => {
                let $d = Fixed::<2>;
                $body
            }
            4 => {
                let $d = Fixed::<4>;
                $body
            }
            8 => {
                let $d = Fixed::<8>;
                $body
            }
            n => {
                let $d = Runtime(n);
                $body
            }
        }
    };
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CodebookError {
    #[error("dimension is 0; vectors must have at least 1 dim")]
    ZeroDim,
    #[error("no centroids: a codebook needs at least 1")]
    Empty,
    #[error("{len} values are not a whole number of {dim}-dim vectors")]
    NotMultiple { len: usize, dim: usize },
    #[error("{count} centroids do not fit 32-bit codes")]
    TooMany { count: usize },
    #[error("value {value} at index {index} is not finite")]
    NonFinite { index: usize, value: f32 },
    #[error("k = 0: k-means needs at least 1 centroid")]
    ZeroK,
    #[error("batch_size = 0: mini-batches need at least 1 point")]
    ZeroBatch,
    #[error("tol = {0}: the tolerance must be finite and >= 0")]
    BadTol(f32),
    #[error("no data points to fit")]
    NoData,
}

/// A set of c centroids of `dim` dims (row-major), with their squared norms cached.
#[derive(Clone)]
pub struct Codebook {
    dim: usize,
    centroids: Vec<f32>,
    /// ||C[m]||², padded to a multiple of LANES with +inf so that padding never wins a search.
    norms: Vec<f32>,
    /// The centroids again, in blocks of LANES, each block dim-major:
    /// `blocked[(b * dim + j) * LANES + l] = C[b * LANES + l][j]` (padding is 0).
    blocked: Vec<f32>,
}

impl fmt::Debug for Codebook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codebook").field("dim", &self.dim).field("len", &self.len()).finish()
    }
}

impl Codebook {
    /// A codebook of `centroids.len() / dim` centroids. Errors when `dim` is 0, there are no
    /// centroids, the length is not a multiple of `dim`, there are more than `u32::MAX`
    /// centroids, or a value is NaN or infinite.
    pub fn new(dim: usize, centroids: Vec<f32>) -> Result<Codebook, CodebookError> {
        if dim == 0 {
            return Err(CodebookError::ZeroDim);
        }
        if centroids.is_empty() {
            return Err(CodebookError::Empty);
        }
        if !centroids.len().is_multiple_of(dim) {
            return Err(CodebookError::NotMultiple { len: centroids.len(), dim });
        }
        let count = centroids.len() / dim;
        if count > u32::MAX as usize {
            return Err(CodebookError::TooMany { count });
        }
        check_finite(&centroids)?;
        Ok(Codebook::build(dim, centroids))
    }

    /// No checks: k-means rebuilds its search structure every batch from values it made itself.
    fn build(dim: usize, centroids: Vec<f32>) -> Codebook {
        let len = centroids.len() / dim;
        let padded = len.div_ceil(LANES) * LANES;
        let mut norms = vec![f32::INFINITY; padded];
        let mut blocked = vec![0.0f32; padded * dim];
        for (m, c) in centroids.chunks_exact(dim).enumerate() {
            norms[m] = c.iter().map(|v| v * v).sum();
            let (b, l) = (m / LANES, m % LANES);
            for (j, &v) in c.iter().enumerate() {
                blocked[(b * dim + j) * LANES + l] = v;
            }
        }
        Codebook { dim, centroids, norms, blocked }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of centroids.
    pub fn len(&self) -> usize {
        self.centroids.len() / self.dim
    }

    /// Always false: a codebook is never built without centroids.
    pub fn is_empty(&self) -> bool {
        self.centroids.is_empty()
    }

    /// All centroids, row-major.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// Index of the centroid nearest to `x` in L2; ties go to the lowest index. Compares
    /// ||c||² - 2<x,c>, which ranks like the distance but can misorder near-ties that lie within
    /// f32 rounding of ||x||². An `x` with a NaN gives 0.
    ///
    /// Panics when `x.len() != dim`.
    pub fn nearest(&self, x: &[f32]) -> u32 {
        assert_eq!(x.len(), self.dim, "nearest: vector of {} dims for a {}-dim codebook", x.len(), self.dim);
        by_dim!(self.dim, d => argmin(d, x, &self.blocked, &self.norms))
    }

    /// Codes of the consecutive `dim`-dim sub-vectors of `v`: `codes[i] = nearest(v_i)`.
    ///
    /// Panics when `v.len() != codes.len() * dim`.
    pub fn encode(&self, v: &[f32], codes: &mut [u32]) {
        let dim = self.dim;
        assert_eq!(v.len(), codes.len() * dim, "encode: {} values for {} codes of {dim} dims", v.len(), codes.len());
        by_dim!(dim, d => {
            for (x, code) in v.chunks_exact(dim).zip(codes.iter_mut()) {
                *code = argmin(d, x, &self.blocked, &self.norms);
            }
        })
    }

    /// The centroids named by `codes`, concatenated into `out`.
    ///
    /// Panics when `out.len() != codes.len() * dim` or a code is not below `len()`.
    pub fn decode(&self, codes: &[u32], out: &mut [f32]) {
        let dim = self.dim;
        let n = codes.len();
        assert_eq!(out.len(), n * dim, "decode: {} values for {n} codes of {dim} dims", out.len());
        for (o, &code) in out.chunks_exact_mut(dim).zip(codes) {
            let m = code as usize;
            o.copy_from_slice(&self.centroids[m * dim..(m + 1) * dim]);
        }
    }

    /// Lookup table for a query of g sub-vectors: `out[i * len + m] = <q_i, C[m]>`, so that the
    /// approximate logit of a key with codes `k` is `sum_i out[i * len + k[i]]`.
    ///
    /// Panics when `q.len()` is not a multiple of `dim` or `out.len() != q.len() / dim * len()`.
    pub fn table(&self, q: &[f32], out: &mut [f32]) {
        let (dim, len) = (self.dim, self.len());
        let g = q.len() / dim;
        assert_eq!(q.len() % dim, 0, "table: a query of {} values is not made of {dim}-dim sub-vectors", q.len());
        assert_eq!(out.len(), g * len, "table: {} entries for {g} sub-vectors x {len} centroids", out.len());
        by_dim!(dim, d => {
            for (qi, row) in q.chunks_exact(dim).zip(out.chunks_exact_mut(len)) {
                dots(d, qi, &self.blocked, row);
            }
        })
    }

    /// Memory of the centroids as f32 (the search caches, norms and blocked copy, are not
    /// counted: they can be rebuilt from the centroids).
    pub fn bytes(&self) -> usize {
        self.centroids.len() * std::mem::size_of::<f32>()
    }

    /// Squared L2 distance from `x` to centroid `m`, computed directly (no norm expansion).
    fn dist2(&self, x: &[f32], m: usize) -> f32 {
        sqdist(x, &self.centroids[m * self.dim..(m + 1) * self.dim])
    }
}

fn check_finite(values: &[f32]) -> Result<(), CodebookError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(CodebookError::NonFinite { index, value: values[index] }),
        None => Ok(()),
    }
}

fn sqdist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Argmin over all centroids of ||c||² - 2<x,c>, ties to the lowest index. Each lane keeps its
/// own running minimum (strict `<`, so the earliest index per lane), and the lanes are merged
/// at the end, which finds the same centroid as a sequential scan would.
#[inline(always)]
fn argmin<D: Dim>(d: D, x: &[f32], blocked: &[f32], norms: &[f32]) -> u32 {
    let dim = d.n();
    let x = &x[..dim];
    let mut best = [f32::INFINITY; LANES];
    let mut best_idx = [0u32; LANES];
    let mut idx: [u32; LANES] = std::array::from_fn(|l| l as u32);
    for (block, block_norms) in blocked.chunks_exact(dim * LANES).zip(norms.chunks_exact(LANES)) {
        let mut acc = [0.0f32; LANES];
        acc.copy_from_slice(block_norms);
        for j in 0..dim {
            let xj = -2.0 * x[j];
            let row = &block[j * LANES..(j + 1) * LANES];
            for l in 0..LANES {
                acc[l] += xj * row[l];
            }
        }
        for l in 0..LANES {
            let better = acc[l] < best[l];
            best[l] = if better { acc[l] } else { best[l] };
            best_idx[l] = if better { idx[l] } else { best_idx[l] };
            idx[l] = idx[l].wrapping_add(LANES as u32);
        }
    }
    let mut min = best[0];
    for &v in &best[1..] {
        min = if v < min { v } else { min };
    }
    // `best` never holds NaN, so some lane equals `min`; with no finite distance at all (NaN
    // in `x`) every lane still holds +inf and index 0.
    let mut winner = u32::MAX;
    for l in 0..LANES {
        if best[l] == min && best_idx[l] < winner {
            winner = best_idx[l];
        }
    }
    winner
}

/// `row[m] = <q, C[m]>` for every centroid.
#[inline(always)]
fn dots<D: Dim>(d: D, q: &[f32], blocked: &[f32], row: &mut [f32]) {
    let dim = d.n();
    let q = &q[..dim];
    let block_dots = |block: &[f32]| {
        let mut acc = [0.0f32; LANES];
        for j in 0..dim {
            let qj = q[j];
            let col = &block[j * LANES..(j + 1) * LANES];
            for l in 0..LANES {
                acc[l] += qj * col[l];
            }
        }
        acc
    };
    // Full blocks first, so that the copy out has a fixed size (a variable one is a memcpy call).
    let mut blocks = blocked.chunks_exact(dim * LANES);
    let mut outs = row.chunks_exact_mut(LANES);
    // `outs` leads the zip: it runs out first, and must not make `blocks` skip the tail block.
    for (out, block) in (&mut outs).zip(&mut blocks) {
        out.copy_from_slice(&block_dots(block));
    }
    let tail = outs.into_remainder();
    if let Some(block) = blocks.next().filter(|_| !tail.is_empty()) {
        tail.copy_from_slice(&block_dots(block)[..tail.len()]);
    }
}

/// splitmix64: tiny, seedable, and good enough to draw samples and batches.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2^-32 for any n used here).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Most points k-means++ seeds from (at least k). Seeding costs O(k * sample); a few tens of
/// points per centroid are enough to place the seeds, which the mini-batches then refine on
/// all the data.
const MAX_INIT_SAMPLE: usize = 200_000;
const INIT_SAMPLE_PER_CENTROID: usize = 32;

/// Points per partial sum in k-means++. Fixed, and the partial sums are added in chunk order,
/// so the sampling does not depend on how rayon splits the work.
const INIT_CHUNK: usize = 4096;

/// Mini-batch k-means stops once it has drawn this many times the data's size in points...
const MAX_EPOCHS: usize = 100;
/// ...but runs at least this many batches (or max_iter, when fewer).
const MIN_BATCHES: usize = 10;

/// Mini-batch k-means settings; see [`KMeans::fit`].
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// Number of centroids.
    pub k: usize,
    /// Dims of each point.
    pub dim: usize,
    /// Most mini-batches.
    pub max_iter: usize,
    /// Points per mini-batch (drawn with replacement).
    pub batch_size: usize,
    pub seed: u64,
    /// Stop early once one batch moves the centroids by less than this, as a sum of squared
    /// moves relative to the mean per-dim variance of the data (as scikit-learn's `tol`);
    /// 0 runs all `max_iter` batches.
    pub tol: f32,
}

impl KMeans {
    /// The paper's settings (scikit-learn MiniBatchKMeans: batch 10000, 200 iterations,
    /// random_state 0, tol 0).
    pub fn new(k: usize, dim: usize) -> KMeans {
        KMeans { k, dim, max_iter: 200, batch_size: 10_000, seed: 0, tol: 0.0 }
    }

    /// Fit on `data` (n points of `dim`, row-major). k-means++ initialisation on a sample
    /// (seeded), then mini-batch k-means (Sculley 2010: per-centroid learning rate 1/count)
    /// for max_iter batches (fewer on small data: at most MAX_EPOCHS times n points drawn) or
    /// until the centroid movement falls below tol, then a final full
    /// Lloyd assignment pass that recomputes every centroid as the mean of its points (empty
    /// clusters are re-seeded from the points farthest from their centroid, deterministically).
    /// When n <= k, every point becomes a centroid and the rest are filled deterministically
    /// (centroid j >= n repeats point j % n; ties in the search go to the first copy).
    ///
    /// Parallel with rayon, and bit-identical for any number of threads. `progress` is called
    /// with (done, total) after each batch and after the final pass, total = max_iter + 1; an
    /// early stop jumps to (total, total).
    pub fn fit(&self, data: &[f32], progress: &mut dyn FnMut(usize, usize)) -> Result<Codebook, CodebookError> {
        let (k, dim) = (self.k, self.dim);
        if dim == 0 {
            return Err(CodebookError::ZeroDim);
        }
        if k == 0 {
            return Err(CodebookError::ZeroK);
        }
        if k > u32::MAX as usize {
            return Err(CodebookError::TooMany { count: k });
        }
        if self.batch_size == 0 {
            return Err(CodebookError::ZeroBatch);
        }
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return Err(CodebookError::BadTol(self.tol));
        }
        if !data.len().is_multiple_of(dim) {
            return Err(CodebookError::NotMultiple { len: data.len(), dim });
        }
        if data.is_empty() {
            return Err(CodebookError::NoData);
        }
        check_finite(data)?;
        let n = data.len() / dim;
        let total = self.max_iter + 1;

        if n <= k {
            let mut centroids = Vec::with_capacity(k * dim);
            for j in 0..k {
                let p = j % n;
                centroids.extend_from_slice(&data[p * dim..(p + 1) * dim]);
            }
            progress(total, total);
            return Ok(Codebook::build(dim, centroids));
        }

        let mut rng = Rng(self.seed);
        let sample_len = n.min((INIT_SAMPLE_PER_CENTROID * k).min(MAX_INIT_SAMPLE).max(k));
        let sample_buf;
        let sample: &[f32] = if sample_len == n {
            data
        } else {
            sample_buf = gather(data, dim, &sample_indices(&mut rng, n, sample_len));
            &sample_buf
        };
        let mut centroids = kmeans_pp(sample, dim, k, &mut rng);
        let threshold = if self.tol > 0.0 { self.tol as f64 * mean_variance(sample, dim) } else { 0.0 };

        let batch = self.batch_size.min(n);
        // On small data a batch is most of it: stop after MAX_EPOCHS passes' worth of points
        // (at least MIN_BATCHES batches) instead of max_iter near-full passes.
        let batches = self.max_iter.min(MIN_BATCHES.max((MAX_EPOCHS * n).div_ceil(batch)));
        let mut state = MiniBatch::new(k, dim);
        let mut labels = vec![0u32; batch];
        let mut points = vec![0.0f32; batch * dim];
        for iter in 0..batches {
            for p in points.chunks_exact_mut(dim) {
                let i = rng.below(n);
                p.copy_from_slice(&data[i * dim..(i + 1) * dim]);
            }
            let cb = Codebook::build(dim, centroids);
            assign(&cb, &points, &mut labels);
            centroids = cb.centroids;
            let moved = state.update(&mut centroids, &points, &labels);
            progress(iter + 1, total);
            if moved < threshold {
                break;
            }
        }

        let centroids = lloyd_pass(data, dim, centroids);
        progress(total, total);
        Ok(Codebook::build(dim, centroids))
    }
}

/// Mini-batch k-means state (Sculley 2010). Each point of a batch moves the centroid it was
/// assigned to (assignments use the centroids as they were at the start of the batch) by
/// c += (x - c) / count, count being all points the centroid has taken so far. Those steps
/// telescope to a running mean, so they are applied per centroid from the batch's f64 sums:
/// the same result up to rounding, without a sequential pass of f32 updates.
struct MiniBatch {
    dim: usize,
    counts: Vec<f64>,
    sums: Vec<f64>,
    batch_counts: Vec<u32>,
}

impl MiniBatch {
    fn new(k: usize, dim: usize) -> MiniBatch {
        MiniBatch { dim, counts: vec![0.0; k], sums: vec![0.0; k * dim], batch_counts: vec![0; k] }
    }

    /// Applies one batch; returns the sum of squared centroid moves.
    fn update(&mut self, centroids: &mut [f32], points: &[f32], labels: &[u32]) -> f64 {
        let dim = self.dim;
        self.sums.fill(0.0);
        self.batch_counts.fill(0);
        for (p, &m) in points.chunks_exact(dim).zip(labels) {
            let m = m as usize;
            self.batch_counts[m] += 1;
            for (s, &v) in self.sums[m * dim..(m + 1) * dim].iter_mut().zip(p) {
                *s += v as f64;
            }
        }
        let mut moved = 0.0f64;
        for (m, c) in centroids.chunks_exact_mut(dim).enumerate() {
            if self.batch_counts[m] == 0 {
                continue;
            }
            let old = self.counts[m];
            self.counts[m] += self.batch_counts[m] as f64;
            for (v, &s) in c.iter_mut().zip(&self.sums[m * dim..(m + 1) * dim]) {
                let new = ((old * *v as f64 + s) / self.counts[m]) as f32;
                moved += ((new - *v) as f64).powi(2);
                *v = new;
            }
        }
        moved
    }
}

/// `count` distinct indices below `n`, ascending (Floyd's algorithm: O(count), not O(n)).
fn sample_indices(rng: &mut Rng, n: usize, count: usize) -> Vec<usize> {
    let mut chosen = HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    for j in n - count..n {
        let t = rng.below(j + 1);
        let pick = if chosen.contains(&t) { j } else { t };
        chosen.insert(pick);
        out.push(pick);
    }
    out.sort_unstable();
    out
}

fn gather(data: &[f32], dim: usize, indices: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(indices.len() * dim);
    for &i in indices {
        out.extend_from_slice(&data[i * dim..(i + 1) * dim]);
    }
    out
}

fn mean_variance(points: &[f32], dim: usize) -> f64 {
    let n = (points.len() / dim) as f64;
    let mut mean = vec![0.0f64; dim];
    for p in points.chunks_exact(dim) {
        for (m, &v) in mean.iter_mut().zip(p) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = 0.0f64;
    for p in points.chunks_exact(dim) {
        for (m, &v) in mean.iter().zip(p) {
            var += (v as f64 - m).powi(2);
        }
    }
    var / n / dim as f64
}

/// Nearest centroid of every point, in parallel. Each point's code depends only on the point
/// and the codebook, so the split across threads cannot change the result.
fn assign(cb: &Codebook, points: &[f32], labels: &mut [u32]) {
    let dim = cb.dim;
    // About 64k distance evaluations per task: enough to amortise rayon's overhead.
    let chunk = (65_536 / cb.len()).max(16);
    labels.par_chunks_mut(chunk).zip(points.par_chunks(chunk * dim)).for_each(|(l, p)| cb.encode(p, l));
}

/// k-means++ seeding (Arthur & Vassilvitskii 2007) on `sample`: each next centroid is a sample
/// point drawn with probability proportional to its squared distance to the nearest centroid
/// so far. The distances are kept in one array updated with each new centroid, so the whole
/// seeding is O(k * sample * dim).
fn kmeans_pp(sample: &[f32], dim: usize, k: usize, rng: &mut Rng) -> Vec<f32> {
    let s = sample.len() / dim;
    let mut centroids = Vec::with_capacity(k * dim);
    let first = rng.below(s);
    centroids.extend_from_slice(&sample[first * dim..(first + 1) * dim]);
    let mut min_d = vec![f32::INFINITY; s];
    for c in 1..k {
        let last = &centroids[(c - 1) * dim..c * dim];
        let chunk_sums: Vec<f64> = by_dim!(dim, d => min_d
            .par_chunks_mut(INIT_CHUNK)
            .zip(sample.par_chunks(INIT_CHUNK * dim))
            .map(|(m, p)| update_min_dist(d, p, last, m))
            .collect());
        let total: f64 = chunk_sums.iter().sum();
        let pick = if total > 0.0 && total.is_finite() {
            draw(rng.unit() * total, &chunk_sums, &min_d)
        } else {
            // Every sample point coincides with a centroid: fewer distinct points than k.
            rng.below(s)
        };
        centroids.extend_from_slice(&sample[pick * dim..(pick + 1) * dim]);
    }
    centroids
}

/// Lowers `min_d` to the distances to centroid `c`; returns the chunk's sum of `min_d`.
#[inline(always)]
fn update_min_dist<D: Dim>(d: D, points: &[f32], c: &[f32], min_d: &mut [f32]) -> f64 {
    let dim = d.n();
    let c = &c[..dim];
    // Lane sums break the add chain so the loop vectorises; f32 is plenty for sampling
    // weights over one chunk.
    let mut acc = [0.0f32; LANES];
    let mut pts = points.chunks_exact(dim * LANES);
    let mut mins = min_d.chunks_exact_mut(LANES);
    for (p, m) in (&mut pts).zip(&mut mins) {
        for l in 0..LANES {
            let x = &p[l * dim..(l + 1) * dim];
            let mut dist = 0.0f32;
            for j in 0..dim {
                let t = x[j] - c[j];
                dist += t * t;
            }
            m[l] = if dist < m[l] { dist } else { m[l] };
            acc[l] += m[l];
        }
    }
    let mut sum: f64 = acc.iter().map(|&a| a as f64).sum();
    for (x, m) in pts.remainder().chunks_exact(dim).zip(mins.into_remainder()) {
        let dist = sqdist(x, c);
        if dist < *m {
            *m = dist;
        }
        sum += *m as f64;
    }
    sum
}

/// The point at which the running sum of `min_d` passes `r` (`chunk_sums` are its partial sums
/// by INIT_CHUNK). Falls back to the last point with a nonzero weight when rounding makes `r`
/// overshoot.
fn draw(r: f64, chunk_sums: &[f64], min_d: &[f32]) -> usize {
    let mut before = 0.0f64;
    for (ci, &cs) in chunk_sums.iter().enumerate() {
        if r < before + cs {
            let start = ci * INIT_CHUNK;
            let end = (start + INIT_CHUNK).min(min_d.len());
            let mut acc = before;
            for (i, &w) in min_d[start..end].iter().enumerate() {
                acc += w as f64;
                if r < acc && w > 0.0 {
                    return start + i;
                }
            }
            if let Some(i) = (start..end).rev().find(|&i| min_d[i] > 0.0) {
                return i;
            }
        }
        before += cs;
    }
    (0..min_d.len()).rev().find(|&i| min_d[i] > 0.0).unwrap_or(0)
}

/// One full Lloyd step: assign every point, then move every centroid to the mean of its points.
/// A centroid left without points takes the point farthest from its own centroid (largest
/// distance first, lower index on ties) out of a cluster that keeps at least one point; if no
/// such point is left it stays where it was. The sums run sequentially in f64 in point order:
/// O(n * dim), small next to the O(n * k * dim) assignment, and independent of threading.
fn lloyd_pass(data: &[f32], dim: usize, centroids: Vec<f32>) -> Vec<f32> {
    let n = data.len() / dim;
    let cb = Codebook::build(dim, centroids);
    let k = cb.len();
    let mut labels = vec![0u32; n];
    assign(&cb, data, &mut labels);

    let mut counts = vec![0usize; k];
    let mut sums = vec![0.0f64; k * dim];
    for (p, &m) in data.chunks_exact(dim).zip(&labels) {
        let m = m as usize;
        counts[m] += 1;
        for (s, &v) in sums[m * dim..(m + 1) * dim].iter_mut().zip(p) {
            *s += v as f64;
        }
    }

    let empty: Vec<usize> = (0..k).filter(|&m| counts[m] == 0).collect();
    if !empty.is_empty() {
        let dist: Vec<f32> = data.par_chunks(dim).zip(&labels).map(|(p, &m)| cb.dist2(p, m as usize)).collect();
        let mut order: Vec<usize> = (0..n).filter(|&i| dist[i] > 0.0).collect();
        order.sort_unstable_by(|&a, &b| dist[b].total_cmp(&dist[a]).then(a.cmp(&b)));
        let mut candidates = order.into_iter();
        for &e in &empty {
            let Some(i) = candidates.by_ref().find(|&i| counts[labels[i] as usize] > 1) else { break };
            let old = labels[i] as usize;
            let p = &data[i * dim..(i + 1) * dim];
            counts[old] -= 1;
            for (s, &v) in sums[old * dim..(old + 1) * dim].iter_mut().zip(p) {
                *s -= v as f64;
            }
            counts[e] = 1;
            for (s, &v) in sums[e * dim..(e + 1) * dim].iter_mut().zip(p) {
                *s = v as f64;
            }
            labels[i] = e as u32;
        }
    }

    let mut centroids = cb.centroids;
    for m in 0..k {
        if counts[m] > 0 {
            for j in 0..dim {
                centroids[m * dim + j] = (sums[m * dim + j] / counts[m] as f64) as f32;
            }
        }
    }
    centroids
}

/// Most Lloyd iterations of [`ScalarFit::fit`]; 1-dim Lloyd on a few thousand distinct
/// values settles in tens.
const SCALAR_LLOYD_ITERS: usize = 100;

/// Exact k-means of f16 scalars (1-dim PQ: one value per sub-vector), for online books.
///
/// In 1 dim every cluster is a run of sorted values between two midpoints, so once the values
/// are sorted (as 16-bit keys) and counted, a full Lloyd iteration costs O(k log distinct):
/// each run's count and sum come from prefix sums. That replaces a mini-batch fit that took
/// 5 ms per book (0.33 s per layer for cpu12.5's 64 books at 8192 prompt tokens, all of it
/// inside the first generation step), and runs Lloyd to convergence on every value instead of
/// 20 mini-batches and one pass.
#[derive(Default)]
pub struct ScalarFit {
    /// order keys (see `order_key`) of the values added
    keys: Vec<u16>,
    /// the radix sort's other buffer
    scratch: Vec<u16>,
    /// first non-finite value added
    bad: Option<(usize, f32)>,
}

/// Sorts 16-bit keys in two counting passes, low byte then high byte. (With a comparison sort,
/// 64 books of 12,288 keys took 14.4 ms to fit; with this, 10.9 ms: `scalar_fit_timing`.)
fn radix_sort(keys: &mut Vec<u16>, scratch: &mut Vec<u16>) {
    let mut counts = [[0usize; 256]; 2];
    for &k in keys.iter() {
        counts[0][(k & 0xff) as usize] += 1;
        counts[1][(k >> 8) as usize] += 1;
    }
    scratch.clear();
    scratch.resize(keys.len(), 0);
    for (pass, count) in counts.iter_mut().enumerate() {
        let mut at = 0;
        for c in count.iter_mut() {
            (*c, at) = (at, at + *c);
        }
        let shift = 8 * pass;
        for &k in keys.iter() {
            let b = ((k >> shift) & 0xff) as usize;
            scratch[count[b]] = k;
            count[b] += 1;
        }
        std::mem::swap(keys, scratch);
    }
}

/// f16 bits mapped so that key order is numeric order (-0 just below +0).
fn order_key(bits: u16) -> u16 {
    if bits & 0x8000 != 0 {
        !bits
    } else {
        bits | 0x8000
    }
}

fn from_order_key(k: u16) -> f16 {
    f16::from_bits(if k & 0x8000 != 0 { k & 0x7fff } else { !k })
}

impl ScalarFit {
    pub fn new() -> ScalarFit {
        ScalarFit::default()
    }

    pub fn add(&mut self, v: f16) {
        if !v.is_finite() && self.bad.is_none() {
            self.bad = Some((self.keys.len(), v.to_f32()));
        }
        self.keys.push(order_key(v.to_bits()));
    }

    /// Fits k centroids and forgets the values for the next book. Seeded like [`KMeans::fit`]
    /// (k-means++ on a sample drawn with `seed`; seeds at quantiles instead left the tails, the
    /// large key channels, to few centroids: cpu25's KLD in tests/approx.rs was 0.0098 against
    /// 0.0027), then Lloyd on all values until no boundary moves. A value exactly between two
    /// centroids goes to the lower one, as [`Codebook::nearest`] breaks ties. The seeds are
    /// sorted, and Lloyd keeps them in order while no cluster is empty. With at most k distinct
    /// values, each becomes a centroid and the rest repeat them (ties in the search go to the
    /// first copy).
    pub fn fit(&mut self, k: usize, seed: u64) -> Result<Codebook, CodebookError> {
        let bad = self.bad.take();
        let total = self.keys.len();
        let refused = if k == 0 {
            Some(CodebookError::ZeroK)
        } else if let Some((index, value)) = bad {
            Some(CodebookError::NonFinite { index, value })
        } else if total == 0 {
            Some(CodebookError::NoData)
        } else {
            None
        };
        if let Some(e) = refused {
            self.keys.clear();
            return Err(e);
        }
        radix_sort(&mut self.keys, &mut self.scratch);
        let mut rng = Rng(seed);
        let sample_len = total.min((INIT_SAMPLE_PER_CENTROID * k).min(MAX_INIT_SAMPLE).max(k));
        let sample: Vec<f32> = if sample_len == total {
            self.keys.iter().map(|&x| from_order_key(x).to_f32()).collect()
        } else {
            sample_indices(&mut rng, total, sample_len).into_iter().map(|i| from_order_key(self.keys[i]).to_f32()).collect()
        };
        let mut vals = Vec::new();
        let mut cum_n = vec![0.0f64];
        let mut cum_s = vec![0.0f64];
        for run in self.keys.chunk_by(|a, b| a == b) {
            let (v, c) = (from_order_key(run[0]).to_f64(), run.len() as f64);
            vals.push(v);
            cum_n.push(cum_n[cum_n.len() - 1] + c);
            cum_s.push(cum_s[cum_s.len() - 1] + c * v);
        }
        self.keys.clear();
        let m = vals.len();
        if m <= k {
            let centroids = (0..k).map(|j| vals[j % m] as f32).collect();
            return Ok(Codebook::build(1, centroids));
        }
        let mut c: Vec<f64> = kmeans_pp(&sample, 1, k, &mut rng).into_iter().map(f64::from).collect();
        c.sort_by(f64::total_cmp);
        let mut ends = vec![usize::MAX; k];
        for _ in 0..SCALAR_LLOYD_ITERS {
            let mut moved = false;
            let mut lo = 0;
            for j in 0..k {
                let hi = if j + 1 == k {
                    m
                } else {
                    let mid = 0.5 * (c[j] + c[j + 1]);
                    lo + vals[lo..].partition_point(|&v| v <= mid)
                };
                moved |= ends[j] != hi;
                ends[j] = hi;
                let cnt = cum_n[hi] - cum_n[lo];
                if cnt > 0.0 {
                    c[j] = (cum_s[hi] - cum_s[lo]) / cnt;
                }
                lo = hi;
            }
            if !moved {
                break;
            }
        }
        Ok(Codebook::build(1, c.into_iter().map(|v| v as f32).collect()))
    }
}

/// Nearest-centroid search for a 1-dim book whose centroids ascend strictly: the code of x is
/// the number of midpoints below it (a value on a midpoint goes to the lower centroid, as
/// [`Codebook::nearest`] breaks ties, up to the rounding of the midpoint). 16 centroids take
/// one vector compare instead of a distance per centroid.
pub struct ScalarCuts {
    /// the midpoints between consecutive centroids
    cuts: Vec<f32>,
}

impl ScalarCuts {
    /// None unless `cb` has 1 dim and strictly ascending centroids.
    pub fn new(cb: &Codebook) -> Option<ScalarCuts> {
        let c = cb.centroids();
        if cb.dim() != 1 || c.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        Some(ScalarCuts { cuts: c.windows(2).map(|w| w[0] + 0.5 * (w[1] - w[0])).collect() })
    }

    pub fn code(&self, x: f32) -> u32 {
        self.cuts.iter().map(|&t| (x > t) as u32).sum()
    }
}

/// The [`ScalarCuts`] of a row's 1-dim books, transposed: cut t of every book side by side,
/// so that encoding a row is one compare per (cut, value) over contiguous lanes, which the
/// compiler vectorises (a prompt's keys, 8192 x 192 values a layer for SmolLM2, are encoded
/// in one go when generation starts). Value i of a row uses book `i % books`.
pub struct CutTable {
    books: usize,
    levels: usize,
    /// cut t of book b at `t * books + b`
    cuts: Vec<f32>,
}

impl CutTable {
    /// None unless every book has 1 dim, strictly ascending centroids, the same number of
    /// them, and at most 256 (codes are bytes).
    pub fn new(books: &[std::sync::Arc<Codebook>]) -> Option<CutTable> {
        let each = books.iter().map(|b| ScalarCuts::new(b)).collect::<Option<Vec<_>>>()?;
        let levels = each.first()?.cuts.len();
        if levels > 255 || each.iter().any(|c| c.cuts.len() != levels) {
            return None;
        }
        let cuts = (0..levels).flat_map(|t| each.iter().map(move |c| c.cuts[t])).collect();
        Some(CutTable { books: books.len(), levels, cuts })
    }

    /// The code of each value of `x` (as [`ScalarCuts::code`] gives it) into `out`; `x.len()`
    /// is a multiple of the book count.
    pub fn codes(&self, x: &[f32], out: &mut [u8]) {
        assert!(x.len().is_multiple_of(self.books) && out.len() == x.len());
        out.fill(0);
        if self.books == 1 {
            for &cut in &self.cuts {
                out.iter_mut().zip(x).for_each(|(o, &v)| *o += (v > cut) as u8);
            }
            return;
        }
        for (xs, os) in x.chunks_exact(self.books).zip(out.chunks_exact_mut(self.books)) {
            for cut in self.cuts.chunks_exact(self.books) {
                os.iter_mut().zip(xs).zip(cut).for_each(|((o, &v), &c)| *o += (v > c) as u8);
            }
        }
        debug_assert!(out.iter().all(|&c| (c as usize) <= self.levels));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform in [-1, 1).
    fn uniform(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect()
    }

    fn brute_dists(cb: &Codebook, x: &[f32]) -> Vec<f64> {
        cb.centroids()
            .chunks_exact(cb.dim())
            .map(|c| c.iter().zip(x).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum())
            .collect()
    }

    fn fit(km: &KMeans, data: &[f32]) -> Codebook {
        km.fit(data, &mut |_, _| {}).unwrap()
    }

    /// Keys-like scalars: a mixture of a few gaussians of different widths, rounded to f16.
    fn scalar_mixture(rng: &mut Rng, n: usize) -> Vec<f16> {
        let gauss = |rng: &mut Rng| {
            let (u, v) = (rng.unit().max(1e-12), rng.unit());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        };
        (0..n)
            .map(|i| {
                let (mu, sd) = [(-3.0, 0.4), (0.0, 1.0), (2.5, 0.2), (6.0, 1.5)][i % 4];
                f16::from_f64(mu + sd * gauss(rng))
            })
            .collect()
    }

    fn sse(cb: &Codebook, xs: &[f32]) -> f64 {
        xs.iter().map(|&x| (x as f64 - cb.centroids()[cb.nearest(&[x]) as usize] as f64).powi(2)).sum()
    }

    #[test]
    fn scalar_fit_is_a_lloyd_fixed_point_no_worse_than_mini_batches() {
        let mut rng = Rng(3);
        let data = scalar_mixture(&mut rng, 24_000);
        let xs: Vec<f32> = data.iter().map(|v| v.to_f32()).collect();
        let mut h = ScalarFit::new();
        data.iter().for_each(|&v| h.add(v));
        let cb = h.fit(16, 0).unwrap();
        let c = cb.centroids();
        assert_eq!(c.len(), 16);
        assert!(c.windows(2).all(|w| w[0] < w[1]), "centroids ascend: {c:?}");
        // every centroid is the mean of the points nearest to it (Lloyd has converged)
        let mut sums = [0.0f64; 16];
        let mut counts = [0usize; 16];
        for &x in &xs {
            let m = cb.nearest(&[x]) as usize;
            sums[m] += x as f64;
            counts[m] += 1;
        }
        for m in 0..16 {
            assert!(counts[m] > 0, "centroid {m} has no points");
            let mean = sums[m] / counts[m] as f64;
            assert!((mean - c[m] as f64).abs() < 1e-4 * (1.0 + mean.abs()), "centroid {m}: {} against its points' mean {mean}", c[m]);
        }
        let km = KMeans { max_iter: 20, ..KMeans::new(16, 1) };
        let (exact, mini) = (sse(&cb, &xs), sse(&fit(&km, &xs), &xs));
        assert!(exact <= mini * 1.001, "scalar fit SSE {exact} against mini-batch {mini}");
    }

    #[test]
    fn scalar_fit_recovers_planted_values_and_few_distinct_values() {
        let mut h = ScalarFit::new();
        for i in 0..4000 {
            h.add(f16::from_f32([-8.0, -1.0, 0.5, 3.0][i % 4] + if i % 8 < 4 { 0.125 } else { -0.125 }));
        }
        let cb = h.fit(4, 0).unwrap();
        assert_eq!(cb.centroids(), &[-8.0, -1.0, 0.5, 3.0]);
        // the values were forgotten: a new book sees only new ones
        for v in [2.0f32, 1.0, 2.0] {
            h.add(f16::from_f32(v));
        }
        let cb = h.fit(4, 0).unwrap();
        assert_eq!(cb.centroids(), &[1.0, 2.0, 1.0, 2.0], "distinct values, then repeated");
        assert_eq!(cb.nearest(&[2.0]), 1, "ties go to the first copy");
    }

    #[test]
    fn radix_sort_sorts() {
        let mut rng = Rng(4);
        for n in [0, 1, 2, 255, 256, 1000, 70_000] {
            let mut v: Vec<u16> = (0..n).map(|i| if i % 3 == 0 { (rng.next_u64() & 0xff) as u16 } else { rng.next_u64() as u16 }).collect();
            let mut want = v.clone();
            want.sort_unstable();
            radix_sort(&mut v, &mut Vec::new());
            assert_eq!(v, want, "n = {n}");
        }
    }

    #[test]
    fn scalar_fit_refuses_bad_input() {
        let mut h = ScalarFit::new();
        assert_eq!(h.fit(16, 0).unwrap_err(), CodebookError::NoData);
        h.add(f16::ONE);
        assert_eq!(h.fit(0, 0).unwrap_err(), CodebookError::ZeroK);
        h.add(f16::ONE);
        h.add(f16::INFINITY);
        match h.fit(4, 0).unwrap_err() {
            CodebookError::NonFinite { index: 1, value } => assert!(value.is_infinite()),
            e => panic!("unexpected {e}"),
        }
        h.add(f16::from_f32(-2.0));
        assert_eq!(h.fit(1, 0).unwrap().centroids(), &[-2.0], "a refused fit leaves nothing behind");
    }

    #[test]
    fn scalar_cuts_code_like_nearest() {
        let mut rng = Rng(9);
        let data = scalar_mixture(&mut rng, 5000);
        for k in [2, 16, 20] {
            let mut h2 = ScalarFit::new();
            data.iter().for_each(|&v| h2.add(v));
            let cb = h2.fit(k, 0).unwrap();
            let cuts = ScalarCuts::new(&cb).unwrap();
            let c = cb.centroids();
            let mut same = 0;
            for x in uniform(&mut rng, 20_000).iter().map(|x| x * 10.0).chain(c.iter().copied()) {
                let (a, b) = (cuts.code(x) as usize, cb.nearest(&[x]) as usize);
                if a == b {
                    same += 1;
                } else {
                    // only where the two centroids are equally near, up to f32 rounding
                    let (da, db) = ((x - c[a]).abs(), (x - c[b]).abs());
                    assert!((da - db).abs() <= 1e-5 * (1.0 + x.abs()), "k={k} x={x}: cuts {a} ({da}), nearest {b} ({db})");
                }
            }
            assert!(same >= 19_990, "k={k}: {same} agree");
        }
        assert!(ScalarCuts::new(&Codebook::new(1, vec![1.0, 1.0]).unwrap()).is_none(), "not strictly ascending");
        assert!(ScalarCuts::new(&Codebook::new(2, vec![1.0, 2.0]).unwrap()).is_none(), "2 dims");
        assert_eq!(ScalarCuts::new(&Codebook::new(1, vec![0.5]).unwrap()).unwrap().code(9.0), 0);
    }

    #[test]
    fn cut_table_codes_like_each_books_cuts() {
        let mut rng = Rng(21);
        for (n_books, k, row) in [(64usize, 16usize, 192usize), (1, 256, 64), (8, 20, 24), (3, 2, 9)] {
            let books: Vec<std::sync::Arc<Codebook>> = (0..n_books)
                .map(|_| {
                    let mut f = ScalarFit::new();
                    scalar_mixture(&mut rng, 3000).into_iter().for_each(|v| f.add(v));
                    std::sync::Arc::new(f.fit(k, 0).unwrap())
                })
                .collect();
            let table = CutTable::new(&books).unwrap();
            let each: Vec<ScalarCuts> = books.iter().map(|b| ScalarCuts::new(b).unwrap()).collect();
            // random values, and every cut itself (a value on a midpoint goes to the lower code)
            let mut x: Vec<f32> = uniform(&mut rng, row * 50).iter().map(|v| v * 8.0).collect();
            for (i, v) in x.iter_mut().enumerate().step_by(7) {
                let c = &each[i % n_books].cuts;
                *v = c[i % c.len()];
            }
            let mut got = vec![0u8; x.len()];
            table.codes(&x, &mut got);
            for (i, (&v, &c)) in x.iter().zip(&got).enumerate() {
                assert_eq!(c as u32, each[i % n_books].code(v), "books {n_books} k {k}: value {i} = {v}");
            }
        }
        let mixed = [std::sync::Arc::new(Codebook::new(1, vec![0.0, 1.0]).unwrap()), std::sync::Arc::new(Codebook::new(1, vec![0.0, 1.0, 2.0]).unwrap())];
        assert!(CutTable::new(&mixed).is_none(), "books of different sizes");
        assert!(CutTable::new(&[]).is_none());
    }

    #[test]
    fn planted_clusters_are_recovered() {
        // 16 centres at the corners of a 4-D hypercube of side 10, 200 points each within 0.5.
        let mut rng = Rng(7);
        let centres: Vec<[f32; 4]> =
            (0..16).map(|c| std::array::from_fn(|j| if c >> j & 1 == 1 { 10.0 } else { 0.0 })).collect();
        let mut data = Vec::new();
        let mut truth = Vec::new();
        for i in 0..16 * 200 {
            let c = i % 16;
            for &v in &centres[c] {
                data.push(v + 0.5 * (rng.unit() as f32 * 2.0 - 1.0));
            }
            truth.push(c);
        }
        let km = KMeans { k: 16, dim: 4, max_iter: 50, batch_size: 500, seed: 1, tol: 0.0 };
        let cb = fit(&km, &data);
        assert_eq!(cb.len(), 16);

        let mut owner = [usize::MAX; 16]; // planted centre -> centroid
        for (m, c) in cb.centroids().chunks_exact(4).enumerate() {
            let (p, d) = (0..16)
                .map(|p| (p, sqdist(c, &centres[p]).sqrt()))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            assert!(d < 0.15, "centroid {m} is {d} from the nearest planted centre");
            assert_eq!(owner[p], usize::MAX, "centroids {} and {m} both took centre {p}", owner[p]);
            owner[p] = m;
        }
        for (i, x) in data.chunks_exact(4).enumerate() {
            assert_eq!(cb.nearest(x) as usize, owner[truth[i]], "point {i}");
        }
    }

    #[test]
    fn same_seed_is_bit_identical_across_thread_counts() {
        let data = uniform(&mut Rng(3), 30_000 * 2);
        let km = KMeans { k: 64, dim: 2, max_iter: 20, batch_size: 2000, seed: 11, tol: 0.0 };
        let run = |threads: usize, km: &KMeans| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut calls = Vec::new();
            let cb = pool.install(|| km.fit(&data, &mut |done, total| calls.push((done, total))).unwrap());
            assert_eq!(calls.last(), Some(&(21, 21)));
            assert!(calls.windows(2).all(|w| w[0].0 < w[1].0), "progress must increase: {calls:?}");
            cb.centroids().iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        let one = run(1, &km);
        let four = run(4, &km);
        assert_eq!(one, four);
        let other = run(4, &KMeans { seed: 12, ..km.clone() });
        assert_ne!(one, other);
    }

    #[test]
    fn large_k_is_bit_identical_across_thread_counts() {
        // Many chunks in k-means++ and a sample smaller than the data (32 * k < n).
        let data = uniform(&mut Rng(5), 40_000);
        let km = KMeans { k: 1000, dim: 1, max_iter: 3, batch_size: 5000, seed: 2, tol: 0.0 };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| fit(&km, &data)).centroids().iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn centroids_encode_to_themselves() {
        for dim in [1, 2, 3, 4, 8] {
            let cb = Codebook::new(dim, uniform(&mut Rng(dim as u64), 37 * dim)).unwrap();
            let mut codes = vec![0u32; 37];
            cb.encode(cb.centroids(), &mut codes);
            assert_eq!(codes, (0..37).collect::<Vec<u32>>(), "dim {dim}");
            let mut back = vec![0.0f32; 37 * dim];
            cb.decode(&codes, &mut back);
            assert_eq!(back, cb.centroids());
        }
    }

    #[test]
    fn reconstruction_error_is_the_nearest_distance() {
        for dim in [1, 2, 4, 8] {
            let mut rng = Rng(100 + dim as u64);
            let cb = Codebook::new(dim, uniform(&mut rng, 256 * dim)).unwrap();
            let v = uniform(&mut rng, 500 * dim);
            let mut codes = vec![0u32; 500];
            cb.encode(&v, &mut codes);
            let mut back = vec![0.0f32; v.len()];
            cb.decode(&codes, &mut back);
            for (i, (x, y)) in v.chunks_exact(dim).zip(back.chunks_exact(dim)).enumerate() {
                let err: f64 = x.iter().zip(y).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
                let min = brute_dists(&cb, x).into_iter().fold(f64::INFINITY, f64::min);
                assert!(err - min <= 1e-6, "dim {dim} sub-vector {i}: error {err}, nearest {min}");
            }
        }
    }

    #[test]
    fn table_scores_equal_decode_then_dot() {
        for (dim, k) in [(1, 16), (2, 256), (4, 100), (8, 64), (3, 20)] {
            let mut rng = Rng(200 + dim as u64);
            let cb = Codebook::new(dim, uniform(&mut rng, k * dim)).unwrap();
            let g = 64 / dim;
            let mut table = vec![0.0f32; g * k];
            for _ in 0..20 {
                let q = uniform(&mut rng, g * dim);
                cb.table(&q, &mut table);
                let codes: Vec<u32> = (0..g).map(|_| rng.below(k) as u32).collect();
                let approx: f64 = codes.iter().enumerate().map(|(i, &c)| table[i * k + c as usize] as f64).sum();
                let mut keys = vec![0.0f32; g * dim];
                cb.decode(&codes, &mut keys);
                let exact: f64 = q.iter().zip(&keys).map(|(&a, &b)| a as f64 * b as f64).sum();
                let scale: f64 = q.iter().zip(&keys).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                assert!((approx - exact).abs() <= 1e-4 * scale, "dim {dim}: {approx} vs {exact}");
            }
        }
    }

    #[test]
    fn nearest_matches_f64_brute_force() {
        for dim in [1, 2, 3, 4, 5, 8] {
            for k in [1, 7, 16, 37, 256] {
                let mut rng = Rng((dim * 1000 + k) as u64);
                let cb = Codebook::new(dim, uniform(&mut rng, k * dim)).unwrap();
                for x in uniform(&mut rng, 300 * dim).chunks_exact(dim) {
                    let d = brute_dists(&cb, x);
                    let want = (0..k).min_by(|&a, &b| d[a].total_cmp(&d[b])).unwrap();
                    let got = cb.nearest(x) as usize;
                    // Only an f32 near-tie may pick another centroid.
                    let (dg, dw) = (d[got], d[want]);
                    assert!(got == want || dg - dw <= 1e-6, "dim {dim} k {k}: {got} ({dg}) vs {want} ({dw})");
                }
            }
        }
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        // Centroid 3 appears again at 11 (same lane, next block) and 12 (other lane and
        // block); centroid 6 again at 5 (same block, earlier lane).
        let mut c = uniform(&mut Rng(9), 20 * 2);
        c.copy_within(6..8, 22);
        c.copy_within(6..8, 24);
        c.copy_within(12..14, 10);
        let cb = Codebook::new(2, c.clone()).unwrap();
        for m in [3, 11, 12] {
            assert_eq!(cb.nearest(&c[2 * m..2 * m + 2]), 3);
        }
        assert_eq!(cb.nearest(&c[12..14]), 5);
        // Equidistant from 0 and 1, and from their copies at 8 and 9.
        let mut c = vec![0.0; 10];
        c[..2].copy_from_slice(&[1.0, -1.0]);
        c[8..].copy_from_slice(&[1.0, -1.0]);
        let cb = Codebook::new(1, c).unwrap();
        assert_eq!(cb.nearest(&[0.5]), 0);
        assert_eq!(cb.nearest(&[-0.9]), 1);
        let cb = Codebook::new(1, vec![5.0, 1.0, -1.0, 5.0, 5.0, 5.0, 5.0, 5.0, 1.0, -1.0]).unwrap();
        assert_eq!(cb.nearest(&[0.0]), 1);
        assert_eq!(cb.nearest(&[-0.5]), 2);
    }

    #[test]
    fn mini_batch_centroids_are_running_means() {
        // Learning rate 1/count: after any batches, a centroid that took points is the mean
        // of every point it took (its starting position has weight 0).
        let mut state = MiniBatch::new(2, 2);
        let mut c = vec![100.0, 100.0, -5.0, -5.0];
        state.update(&mut c, &[1.0, 2.0, 3.0, 4.0], &[0, 0]);
        assert_eq!(c, [2.0, 3.0, -5.0, -5.0]);
        let moved = state.update(&mut c, &[8.0, 9.0, 0.0, 1.0, 7.0, 7.0], &[0, 1, 1]);
        assert_eq!(c, [4.0, 5.0, 3.5, 4.0]);
        assert_eq!(moved, 2.0 * 4.0 + 8.5 * 8.5 + 9.0 * 9.0);
        state.update(&mut c, &[1.0, 1.0], &[1]);
        assert_eq!(c, [4.0, 5.0, 8.0 / 3.0, 3.0]);
    }

    #[test]
    fn few_points_become_the_centroids() {
        let data = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut calls = Vec::new();
        let km = KMeans { k: 5, dim: 2, max_iter: 10, batch_size: 4, seed: 0, tol: 0.0 };
        let cb = km.fit(&data, &mut |d, t| calls.push((d, t))).unwrap();
        assert_eq!(cb.centroids(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(calls, [(11, 11)]);
        assert_eq!(cb.nearest(&[3.0, 4.0]), 1);
        let cb = fit(&KMeans { k: 3, ..km }, &data);
        assert_eq!(cb.centroids(), &data);
    }

    #[test]
    fn empty_clusters_take_the_farthest_points() {
        // Two centroids near the data, one far away that attracts nothing: it takes the point
        // farthest from its centroid (8.5, 1.5 from 10), which leaves its old cluster.
        let data = [0.0, 1.0, 2.0, 8.5, 10.0, 10.5];
        let out = lloyd_pass(&data, 1, vec![1.0, 10.0, 100.0]);
        assert_eq!(out, [1.0, 10.25, 8.5]);
        // Nothing to take: every point sits on its centroid; the empty centroid stays.
        let out = lloyd_pass(&[1.0, 1.0, 2.0], 1, vec![1.0, 2.0, 50.0]);
        assert_eq!(out, [1.0, 2.0, 50.0]);
    }

    #[test]
    fn tolerance_stops_early() {
        let data = uniform(&mut Rng(4), 20_000);
        let mut last = (0, 0);
        let mut batches = 0;
        let km = KMeans { k: 8, dim: 2, max_iter: 100, batch_size: 1000, seed: 0, tol: 0.01 };
        km.fit(&data, &mut |d, t| {
            batches += (d < t) as usize;
            last = (d, t);
        })
        .unwrap();
        assert_eq!(last, (101, 101));
        assert!(batches < 100, "ran all {batches} batches");
    }

    #[test]
    fn bad_inputs_give_typed_errors() {
        use CodebookError as E;
        assert_eq!(Codebook::new(0, vec![1.0]).unwrap_err(), E::ZeroDim);
        assert_eq!(Codebook::new(2, vec![]).unwrap_err(), E::Empty);
        assert_eq!(Codebook::new(3, vec![0.0; 4]).unwrap_err(), E::NotMultiple { len: 4, dim: 3 });
        let err = Codebook::new(1, vec![0.0, f32::NAN]).unwrap_err();
        assert!(matches!(err, E::NonFinite { index: 1, .. }), "{err:?}");
        assert_eq!(err.to_string(), "value NaN at index 1 is not finite");

        let ok = KMeans { k: 4, dim: 2, max_iter: 5, batch_size: 10, seed: 0, tol: 0.0 };
        let data = uniform(&mut Rng(1), 40);
        let fit_err = |km: KMeans, data: &[f32]| km.fit(data, &mut |_, _| {}).unwrap_err();
        assert_eq!(fit_err(KMeans { k: 0, ..ok.clone() }, &data), E::ZeroK);
        assert_eq!(fit_err(KMeans { dim: 0, ..ok.clone() }, &data), E::ZeroDim);
        assert_eq!(fit_err(KMeans { batch_size: 0, ..ok.clone() }, &data), E::ZeroBatch);
        assert_eq!(fit_err(KMeans { tol: -1.0, ..ok.clone() }, &data), E::BadTol(-1.0));
        assert_eq!(fit_err(ok.clone(), &data[..39]), E::NotMultiple { len: 39, dim: 2 });
        assert_eq!(fit_err(ok.clone(), &[]), E::NoData);
        let mut bad = data.clone();
        bad[17] = f32::INFINITY;
        assert_eq!(fit_err(ok.clone(), &bad), E::NonFinite { index: 17, value: f32::INFINITY });
        assert_eq!(E::NotMultiple { len: 39, dim: 2 }.to_string(), "39 values are not a whole number of 2-dim vectors");
        assert!(fit(&ok, &data).len() == 4);
    }

    #[test]
    fn sizes_and_accessors() {
        let cb = Codebook::new(4, vec![0.5; 4 * 300]).unwrap();
        assert_eq!((cb.dim(), cb.len(), cb.is_empty(), cb.bytes()), (4, 300, false, 4 * 300 * 4));
        let cb = Codebook::new(2, vec![3.0, 3.0, 1.0, 1.0, 2.0, 2.0]).unwrap();
        assert_eq!(cb.nearest(&[f32::NAN, 1.0]), 0);
        assert_eq!(format!("{cb:?}"), "Codebook { dim: 2, len: 3 }");
        let idx = sample_indices(&mut Rng(0), 1000, 100);
        assert_eq!(idx.len(), 100);
        assert!(idx.windows(2).all(|w| w[0] < w[1]) && idx[99] < 1000);
    }

    /// Timing of one layer's scalar fits as cpu12.5 has them at 4096 prompt tokens (64 books
    /// of 3 * 4096 values); run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn scalar_fit_timing() {
        let data = scalar_mixture(&mut Rng(2), 64 * 3 * 4096);
        let mut fits: Vec<ScalarFit> = (0..64).map(|_| ScalarFit::new()).collect();
        let t0 = std::time::Instant::now();
        for (i, &v) in data.iter().enumerate() {
            fits[i % 64].add(v);
        }
        let t1 = std::time::Instant::now();
        let books: Vec<_> = fits.iter_mut().map(|f| f.fit(16, 0).unwrap()).collect();
        eprintln!("collect {:.1} ms, fit {:.1} ms (one thread)", (t1 - t0).as_secs_f64() * 1e3, t1.elapsed().as_secs_f64() * 1e3);
        assert_eq!(books.len(), 64);
    }

    /// Timing of realistic fits; run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn fit_timing() {
        for (k, dim) in [(256, 4), (8192, 2)] {
            let data = uniform(&mut Rng(1), 200_000 * dim);
            let start = std::time::Instant::now();
            let cb = fit(&KMeans::new(k, dim), &data);
            let secs = start.elapsed().as_secs_f64();
            eprintln!("k={k} dim={dim} n=200000: {secs:.2} s ({} threads)", rayon::current_num_threads());
            assert_eq!(cb.len(), k);
        }
    }
}
