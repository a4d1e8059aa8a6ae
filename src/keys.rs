//! The fast tier: one layer's keys, exact (f16), product-quantized, or scalar-quantized.
//!
//! Compressed stores keep two kinds of cells. Coded cells hold their codes only. Exact cells
//! hold an f16 row in a side slab: the keys of the ubatch being processed (encoded only after
//! their own attention, as the paper does), the `sink`/`recent` tokens, and, for online PQ,
//! every key until the layer has `fit_tokens` of them to fit its codebook on.
//!
//! Threads: `apply` (one thread) reserves the slab rows of a ubatch; the store op then writes
//! them from several threads, each its own cells; the attention op only reads.

use std::cell::UnsafeCell;
use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::attention::dot;
use crate::codebook::{Codebook, CutTable, KMeans, ScalarFit};
use crate::error::{filled, Error, Result};
use crate::options::{code_bits, KeyCodec, Scope};
use crate::scan;
use crate::scan8;

const NONE: u32 = u32::MAX;

/// Coded cells of an 8-bit code block, among the next [`scan8::BLOCK`] cells to score, from
/// which scanning the whole block costs less than summing each cell alone.
const SCAN8_MIN_CELLS: usize = 8;

/// Online books of sub-vectors (2 dims or more; 1-dim books get an exact fit, see
/// [`ScalarFit`]) of at most this many centroids are fitted with SMALL_BOOK_BATCHES
/// mini-batches instead of the paper's 200.
const SMALL_BOOK: usize = 16;
const SMALL_BOOK_BATCHES: usize = 20;

/// Exact f16 rows for a subset of cells, allocated on demand.
struct Slab {
    rows: UnsafeCell<Vec<f16>>,
    free: Vec<u32>,
    row_len: usize,
    /// slab row of each cell, or NONE
    slot: Vec<u32>,
}

// SAFETY: rows are written only through `write` (distinct cells per thread, see the module
// comment) and read only when no thread writes; the Vec is resized only through &mut self.
unsafe impl Sync for Slab {}

impl Slab {
    fn new(n_cells: usize, row_len: usize) -> Result<Slab> {
        Ok(Slab { rows: UnsafeCell::new(Vec::new()), free: Vec::new(), row_len, slot: filled(n_cells, NONE, "the exact-key slots")? })
    }

    fn reserve(&mut self, cell: usize) {
        if self.slot[cell] != NONE {
            return;
        }
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                let rows = self.rows.get_mut();
                rows.resize(rows.len() + self.row_len, f16::ZERO);
                (rows.len() / self.row_len - 1) as u32
            }
        };
        self.slot[cell] = s;
    }

    fn release(&mut self, cell: usize) {
        let s = std::mem::replace(&mut self.slot[cell], NONE);
        if s != NONE {
            self.free.push(s);
        }
    }

    fn has(&self, cell: usize) -> bool {
        self.slot[cell] != NONE
    }

    fn in_use(&self) -> usize {
        self.slot.iter().filter(|&&s| s != NONE).count()
    }

    /// # Safety
    /// No other thread reads or writes this cell's row during the call.
    unsafe fn write(&self, cell: usize, src: &[f32]) {
        let s = self.slot[cell] as usize;
        let rows = &mut *self.rows.get();
        let dst = &mut rows[s * self.row_len..(s + 1) * self.row_len];
        for (d, x) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(*x);
        }
    }

    /// # Safety
    /// No thread writes this cell's row while the slice lives.
    unsafe fn row(&self, cell: usize) -> &[f16] {
        let s = self.slot[cell] as usize;
        let rows = &*self.rows.get();
        &rows[s * self.row_len..(s + 1) * self.row_len]
    }

    fn row_mut(&mut self, cell: usize) -> &mut [f16] {
        let s = self.slot[cell] as usize;
        let len = self.row_len;
        &mut self.rows.get_mut()[s * len..(s + 1) * len]
    }

    fn bytes(&self) -> usize {
        // SAFETY: reading the capacity only, under &self with no concurrent resize.
        unsafe { (*self.rows.get()).capacity() * 2 }
    }

    /// Give back the memory of free rows once they are most of the slab (after a prompt's
    /// exact keys were encoded): rows in use move to the front, the rest is freed.
    fn compact(&mut self) {
        let len = self.row_len;
        let used = self.slot.iter().filter(|&&s| s != NONE).count();
        let rows = self.rows.get_mut();
        if rows.len() / len.max(1) <= 2 * used + 64 {
            return;
        }
        let mut packed = Vec::with_capacity(used * len);
        for s in self.slot.iter_mut().filter(|s| **s != NONE) {
            let old = *s as usize;
            packed.extend_from_slice(&rows[old * len..(old + 1) * len]);
            *s = (packed.len() / len - 1) as u32;
        }
        *rows = packed;
        self.free.clear();
    }
}

/// What a query needs to be scored against coded keys, built once per (token, query head).
#[derive(Default)]
pub struct Prep {
    /// per query head of the group: the f32 query
    q: Vec<f32>,
    /// PQ: per query head, g tables of `centroids` dot products
    tables: Vec<f32>,
    /// int: per query head, per channel group, the sum of the query's channels
    qsum: Vec<f32>,
    /// 4-bit and 8-bit PQ: the tables quantized (to u8, see [`scan`]; to u16 as two byte
    /// tables, see [`scan8`]), per query head; with their bias and step, and the sums of the
    /// blocks last scanned
    tab8: Vec<u8>,
    bias: Vec<f32>,
    step: Vec<f32>,
    sums: Vec<u16>,
    /// whether `tab8` is in use for the current query
    scan: bool,
    /// 8-bit PQ: the kernel whose layout `tab8` has
    kernel8: scan8::Kernel,
    exact: Vec<f32>,
    /// 4-bit PQ: the levels `scores` converts
    levels: Vec<u16>,
}

impl Prep {
    /// Query head `h`'s (bias, step) of the 4-bit scan: a coded cell at `level` scores
    /// [`level_score`]`(bias, step, level)` (see [`KeyStore::levels`]).
    pub fn bias_step(&self, h: usize) -> (f32, f32) {
        (self.bias[h], self.step[h])
    }
}

/// The score of a coded cell at `level` of the 4-bit scan: the same f32 that
/// [`KeyStore::scores`] writes.
#[inline(always)]
pub fn level_score(bias: f32, step: f32, level: u16) -> f32 {
    bias + step * level as f32
}

/// The level of a cell whose keys are exact (see [`KeyStore::levels`]); a 4-bit sum is at most
/// 255 * [`scan::MAX_SUBVECTORS`], below it.
pub const EXACT_LEVEL: u16 = u16::MAX;

/// PQ codes of every cell, `per` codes a cell: 4 bits each up to 16 centroids (in the blocked
/// layout of [`crate::scan`]), one byte up to 256 (in the blocked layout of [`crate::scan8`]),
/// two bytes above (what the memory report counts).
///
/// The narrow forms are kept in planes of `plane` codes a cell (one KV head's sub-vectors),
/// plane after plane, each in its scan's blocked layout. A decode scan reads one KV head's
/// codes over many cells; with the heads interleaved block by block it read a third of each
/// block and skipped the rest, which the hardware prefetchers did not follow: a scan of one
/// head at a time ran at 2.4-3.4 GB/s against 9.5-10 GB/s over contiguous planes (30 layers of
/// 32768 cells, 3 KV heads of 64 4-bit codes).
struct Codes {
    at: CodeLayout,
    data: CodeData,
}

/// Where each code of [`Codes`] lies.
#[derive(Clone, Copy)]
struct CodeLayout {
    per: usize,
    plane: usize,
    /// bytes of one plane (narrow forms)
    plane_bytes: usize,
}

impl CodeLayout {
    /// Byte offset and nibble shift of code `i` of `cell` (4-bit codes).
    #[inline(always)]
    fn nibble(self, cell: usize, i: usize) -> (usize, u32) {
        let (b, shift) = scan::locate(cell, i % self.plane, self.plane);
        (b + (i / self.plane) * self.plane_bytes, shift)
    }

    /// Byte offset of code `i` of `cell` (8-bit codes).
    #[inline(always)]
    fn byte(self, cell: usize, i: usize) -> usize {
        scan8::locate(cell, i % self.plane, self.plane) + (i / self.plane) * self.plane_bytes
    }

    /// Byte offset of the first of the code blocks of plane `p` from `cell` (a block's first
    /// cell); the plane's blocks follow each other.
    #[inline(always)]
    fn block(self, p: usize, cell: usize, nibbles: bool) -> usize {
        p * self.plane_bytes + if nibbles { self.nibble(cell, 0).0 } else { self.byte(cell, 0) }
    }
}

enum CodeData {
    Nibble(Vec<u8>),
    Narrow(Vec<u8>),
    Wide(Vec<u16>),
}

impl Codes {
    /// `per` codes a cell in planes of `plane` (a divisor of `per`).
    fn new(n_cells: usize, per: usize, plane: usize, centroids: usize) -> Result<Codes> {
        const WHAT: &str = "the key codes (fast tier)";
        debug_assert!(plane > 0 && per.is_multiple_of(plane));
        let planes = per / plane;
        let (data, plane_bytes) = match code_bits(centroids) {
            4 => {
                let b = scan::bytes_for(n_cells, plane);
                (CodeData::Nibble(filled(b * planes, 0, WHAT)?), b)
            }
            8 => {
                let b = scan8::bytes_for(n_cells, plane);
                (CodeData::Narrow(filled(b * planes, 0, WHAT)?), b)
            }
            _ => (CodeData::Wide(filled(n_cells * per, 0, WHAT)?), 0),
        };
        Ok(Codes { at: CodeLayout { per, plane, plane_bytes }, data })
    }

    /// Bytes held (the memory report reads this, not a formula).
    fn bytes(&self) -> usize {
        match &self.data {
            CodeData::Nibble(v) | CodeData::Narrow(v) => v.capacity(),
            CodeData::Wide(v) => v.capacity() * 2,
        }
    }

    /// Code `i` of `cell`.
    #[inline]
    fn get(&self, cell: usize, i: usize) -> usize {
        match &self.data {
            CodeData::Nibble(v) => {
                let (b, shift) = self.at.nibble(cell, i);
                ((v[b] >> shift) & 0x0f) as usize
            }
            CodeData::Narrow(v) => v[self.at.byte(cell, i)] as usize,
            CodeData::Wide(v) => v[cell * self.at.per + i] as usize,
        }
    }

    #[inline]
    fn set(&mut self, cell: usize, i: usize, code: u32) {
        let at = self.at;
        match &mut self.data {
            CodeData::Nibble(v) => {
                let (b, shift) = at.nibble(cell, i);
                v[b] = (v[b] & !(0x0f << shift)) | ((code as u8 & 0x0f) << shift);
            }
            CodeData::Narrow(v) => v[at.byte(cell, i)] = code as u8,
            CodeData::Wide(v) => v[cell * at.per + i] = code as u16,
        }
    }
}

/// Sum of one table entry per sub-vector: the approximate <q, k> of a coded key.
#[inline(always)]
fn gather_sum<T: Copy + Into<usize>>(codes: &[T], table: &[f32], m: usize) -> f32 {
    let mut s = 0.0f32;
    for (i, &code) in codes.iter().enumerate() {
        s += table[i * m + code.into()];
    }
    s
}

enum Coded {
    None,
    /// `books`: empty until fitted or loaded, then one (scope layer or model) or one per group;
    /// shared (Arc) when one model-scope codebook serves every layer
    Pq { dim: usize, centroids: usize, scope: Scope, books: Vec<Arc<Codebook>>, codes: Codes },
    Int { bits: u32, group: usize, codes: Vec<u8>, scale: Vec<f32>, zero: Vec<f32> },
}

pub struct KeyStore {
    n_head_kv: usize,
    dk: usize,
    slab: Slab,
    coded: Coded,
    fit_tokens: usize,
    seed: u64,
    /// most bytes the exact rows have held (prefill=exact keeps a whole prompt exact)
    peak_exact: usize,
    /// cells coded since the last [`KeyStore::take_fresh`], kept while a GPU tier mirrors the
    /// codes (None: nobody asks)
    fresh: Option<Vec<u32>>,
}

impl KeyStore {
    pub fn new(codec: KeyCodec, n_cells: usize, n_head_kv: usize, dk: usize, fit_tokens: usize, seed: u64) -> Result<KeyStore> {
        let row = n_head_kv * dk;
        let coded = match codec {
            KeyCodec::F16 => Coded::None,
            KeyCodec::Pq { dim, centroids, scope } => {
                if !dk.is_multiple_of(dim) {
                    return Err(Error::Config(format!("pq_dim={dim} does not divide the head dimension {dk}")));
                }
                Coded::Pq { dim, centroids, scope, books: Vec::new(), codes: Codes::new(n_cells, row / dim, dk / dim, centroids)? }
            }
            KeyCodec::Int { bits, group } => {
                if !dk.is_multiple_of(group) {
                    return Err(Error::Config(format!("int_group={group} does not divide the head dimension {dk}")));
                }
                let per = if bits == 8 { row } else { row / 2 };
                let n_groups = n_cells * row / group;
                Coded::Int {
                    bits,
                    group,
                    codes: filled(n_cells * per, 0, "the key codes (fast tier)")?,
                    scale: filled(n_groups, 0.0, "the key scales (fast tier)")?,
                    zero: filled(n_groups, 0.0, "the key zero points (fast tier)")?,
                }
            }
        };
        Ok(KeyStore { n_head_kv, dk, slab: Slab::new(n_cells, row)?, coded, fit_tokens, seed, peak_exact: 0, fresh: None })
    }

    pub fn is_exact_codec(&self) -> bool {
        matches!(self.coded, Coded::None)
    }

    /// Fast-tier bytes: codes (or f16 rows for the exact codec), scales, and the exact rows in
    /// use; not the codebooks, which layers may share (see [`KeyStore::codebooks`]).
    pub fn bytes(&self, n_cells: usize) -> usize {
        let row = self.n_head_kv * self.dk;
        match &self.coded {
            Coded::None => n_cells * row * 2,
            Coded::Pq { codes, .. } => codes.bytes() + self.slab.bytes(),
            Coded::Int { codes, scale, zero, .. } => codes.len() + (scale.len() + zero.len()) * 4 + self.slab.bytes(),
        }
    }

    /// Make room for exact rows of these cells (the ubatch about to be stored).
    pub fn reserve(&mut self, cells: impl Iterator<Item = usize>) {
        for c in cells {
            self.slab.reserve(c);
        }
    }

    /// Store one cell's exact keys (all KV heads). Called from the store op.
    ///
    /// # Safety
    /// The cell was reserved, and no other thread touches it during the call.
    pub unsafe fn write_exact(&self, cell: usize, keys: &[f32]) {
        self.slab.write(cell, keys);
    }

    pub fn is_exact(&self, cell: usize) -> bool {
        self.slab.has(cell)
    }

    /// Exact row of one KV head of a cell.
    ///
    /// # Safety
    /// No thread writes the cell during the borrow.
    pub unsafe fn exact_row(&self, cell: usize, kvh: usize) -> &[f16] {
        &self.slab.row(cell)[kvh * self.dk..(kvh + 1) * self.dk]
    }

    /// Free the cell (its sequences are gone).
    pub fn forget(&mut self, cell: usize) {
        self.slab.release(cell);
    }

    /// Encode every exact cell that `keep_exact` does not protect, fitting the online codebook
    /// first when enough keys have arrived. Returns a line to log when a codebook was fitted.
    pub fn settle(&mut self, keep_exact: impl Fn(usize) -> bool) -> Result<Option<String>> {
        self.peak_exact = self.peak_exact.max(self.slab.bytes());
        let exact: Vec<usize> = (0..self.slab.slot.len()).filter(|&c| self.slab.has(c)).collect();
        let mut note = None;
        if let Coded::Pq { dim, centroids, scope, books, .. } = &mut self.coded {
            if books.is_empty() {
                if exact.len() < self.fit_tokens {
                    return Ok(None); // keep collecting
                }
                if *scope == Scope::Model {
                    return Err(Error::Config("a model-scope codebook comes from a calibration file only".into()));
                }
                let (dim, dk) = (*dim, self.dk);
                let groups = scope.books_per_layer(dk, dim);
                let t0 = std::time::Instant::now();
                let fit_err = |e| Error::Config(format!("fitting the key codebook: {e}"));
                if dim == 1 {
                    // scalars: exact Lloyd on the sorted f16 values, all groups in one pass over the rows
                    let mut fits: Vec<ScalarFit> = (0..groups).map(|_| ScalarFit::new()).collect();
                    for &c in &exact {
                        for (i, &v) in self.slab.row_mut(c).iter().enumerate() {
                            fits[if groups == 1 { 0 } else { i % dk }].add(v);
                        }
                    }
                    let fitted: Vec<_> = fits.par_iter_mut().map(|f| f.fit(*centroids, self.seed)).collect();
                    for b in fitted {
                        books.push(Arc::new(b.map_err(fit_err)?));
                    }
                } else {
                    // sub-vectors of every head, pooled per group (or all together)
                    let mut data = vec![Vec::with_capacity(exact.len() * self.n_head_kv * dk / groups); groups];
                    for &c in &exact {
                        for (i, x) in self.slab.row_mut(c).chunks_exact(dim).enumerate() {
                            let gi = if groups == 1 { 0 } else { (i * dim % dk) / dim };
                            data[gi].extend(x.iter().map(|v| v.to_f32()));
                        }
                    }
                    // the paper's 200 mini-batches are for its 8192-centroid books; 16-centroid
                    // ones settle in far fewer, and the fit stalls the first generation step
                    let max_iter = if *centroids <= SMALL_BOOK { SMALL_BOOK_BATCHES } else { KMeans::new(*centroids, dim).max_iter };
                    for d in &data {
                        let km = KMeans { seed: self.seed, max_iter, ..KMeans::new(*centroids, dim) };
                        books.push(Arc::new(km.fit(d, &mut |_, _| {}).map_err(fit_err)?));
                    }
                }
                note = Some(format!(
                    "fitted {} online codebook{} ({} centroids of {} dims) on {} keys in {:.2} s",
                    groups,
                    if groups == 1 { "" } else { "s" },
                    centroids,
                    dim,
                    exact.len(),
                    t0.elapsed().as_secs_f64()
                ));
            }
        }
        if self.is_exact_codec() {
            return Ok(note);
        }
        let mut buf = vec![0f32; self.n_head_kv * self.dk];
        let mut codes_buf = vec![0u8; buf.len()];
        // scalars: compare with midpoints, not every centroid; for a prompt's worth of them, or
        // for a generation step's token or two where one book is all there is to transpose
        // (one per channel costs more to build than it saves on a token)
        let cuts = match &self.coded {
            Coded::Pq { dim: 1, books, .. } if books.len() == 1 || (exact.len() > 64 && books.len() == self.dk) => CutTable::new(books),
            _ => None,
        };
        for c in exact {
            if keep_exact(c) {
                continue;
            }
            self.slab.row_mut(c).convert_to_f32_slice(&mut buf);
            self.encode(c, &buf, cuts.as_ref().map(|t| (t, &mut codes_buf[..])));
            self.slab.release(c);
        }
        self.slab.compact();
        Ok(note)
    }

    /// Codes of one cell's keys; `cuts`, for 1-dim books, finds them through the books'
    /// midpoints (see [`CutTable`]).
    fn encode(&mut self, cell: usize, keys: &[f32], cuts: Option<(&CutTable, &mut [u8])>) {
        let row = self.n_head_kv * self.dk;
        if let Some(f) = &mut self.fresh {
            f.push(cell as u32);
        }
        match &mut self.coded {
            Coded::None => {}
            Coded::Pq { dim, books, codes, .. } => match cuts {
                Some((cuts, buf)) => {
                    cuts.codes(keys, buf);
                    buf.iter().enumerate().for_each(|(i, &code)| codes.set(cell, i, code as u32));
                }
                None => {
                    let per_head = self.dk / *dim;
                    let book = |i: usize| if books.len() == 1 { 0 } else { i % per_head };
                    for (i, x) in keys.chunks_exact(*dim).enumerate() {
                        codes.set(cell, i, books[book(i)].nearest(x));
                    }
                }
            },
            Coded::Int { bits, group, codes, scale, zero } => {
                let levels = ((1u32 << *bits) - 1) as f32;
                let n_groups = row / *group;
                for gi in 0..n_groups {
                    let xs = &keys[gi * *group..(gi + 1) * *group];
                    let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let s = if hi > lo { (hi - lo) / levels } else { 1.0 };
                    scale[cell * n_groups + gi] = s;
                    zero[cell * n_groups + gi] = lo;
                    for (k, &x) in xs.iter().enumerate() {
                        let q = ((x - lo) / s).round().clamp(0.0, levels) as u8;
                        let idx = gi * *group + k;
                        if *bits == 8 {
                            codes[cell * row + idx] = q;
                        } else {
                            let byte = &mut codes[cell * row / 2 + idx / 2];
                            *byte = if idx % 2 == 0 { (*byte & 0xf0) | q } else { (*byte & 0x0f) | (q << 4) };
                        }
                    }
                }
            }
        }
    }

    /// Reconstruct a coded cell's keys (all heads), for tests and state I/O.
    pub fn decode(&self, cell: usize, out: &mut [f32]) {
        let row = self.n_head_kv * self.dk;
        match &self.coded {
            Coded::None => out.iter_mut().for_each(|x| *x = 0.0),
            Coded::Pq { dim, books, codes, .. } => {
                let g = row / *dim;
                let per_head = self.dk / *dim;
                for (i, o) in out.chunks_exact_mut(*dim).enumerate().take(g) {
                    let code = codes.get(cell, i);
                    match books.get(if books.len() == 1 { 0 } else { i % per_head }) {
                        Some(b) => o.copy_from_slice(&b.centroids()[code * dim..(code + 1) * dim]),
                        None => o.iter_mut().for_each(|x| *x = 0.0),
                    }
                }
            }
            Coded::Int { bits, group, codes, scale, zero } => {
                let n_groups = row / *group;
                for (idx, o) in out.iter_mut().enumerate().take(row) {
                    let gi = idx / *group;
                    let q = if *bits == 8 {
                        codes[cell * row + idx]
                    } else {
                        let b = codes[cell * row / 2 + idx / 2];
                        if idx % 2 == 0 { b & 0x0f } else { b >> 4 }
                    };
                    *o = zero[cell * n_groups + gi] + scale[cell * n_groups + gi] * q as f32;
                }
            }
        }
    }

    /// Build what scoring `g` query heads needs (`q`: g rows of dk).
    pub fn prepare(&self, q: &[f32], g: usize, prep: &mut Prep) {
        prep.q.clear();
        prep.q.extend_from_slice(&q[..g * self.dk]);
        // set below for 4-bit and 8-bit codes only; a thread's scratch serves every layer and context
        prep.scan = false;
        match &self.coded {
            Coded::Pq { books, dim, centroids, codes, .. } if !books.is_empty() => {
                let gs = self.dk / dim;
                let per = gs * centroids;
                let narrow = matches!(codes.data, CodeData::Narrow(_)) && gs <= scan8::MAX_SUBVECTORS;
                if narrow {
                    prep.scan = true;
                    prep.kernel8 = scan8::Kernel::chosen();
                    prep.sums.resize(scan8::PLANES * g * scan8::RUN * scan8::BLOCK, 0);
                }
                if narrow && *dim == 1 && books.len() <= scan8::MAX_SUBVECTORS {
                    // 1-dim books: the tables are the query's channels times the centroids,
                    // quantized as they are built (building the f32 tables first would cost
                    // about as much as the scan)
                    let mut refs = [&[][..]; scan8::MAX_SUBVECTORS];
                    for (r, b) in refs.iter_mut().zip(books) {
                        *r = b.centroids();
                    }
                    let one = books.len() == 1;
                    let (tab8, bias, step) = (&mut prep.tab8, &mut prep.bias, &mut prep.step);
                    scan8::quantize_products(prep.kernel8, &prep.q, g, gs, &refs[..books.len()], |i| if one { 0 } else { i }, tab8, bias, step);
                    return;
                }
                prep.tables.resize(g * per, 0.0);
                for h in 0..g {
                    let qh = &q[h * self.dk..(h + 1) * self.dk];
                    let t = &mut prep.tables[h * per..(h + 1) * per];
                    if books.len() == 1 {
                        books[0].table(qh, t);
                    } else if *dim == 1 {
                        // one book per channel: the table is the query times each centroid
                        // (a direct loop; the general path costs a call per channel)
                        for ((x, b), row) in qh.iter().zip(books.iter()).zip(t.chunks_exact_mut(*centroids)) {
                            for (o, c) in row.iter_mut().zip(b.centroids()) {
                                *o = x * c;
                            }
                        }
                    } else {
                        for (i, b) in books.iter().enumerate() {
                            b.table(&qh[i * dim..(i + 1) * dim], &mut t[i * centroids..(i + 1) * centroids]);
                        }
                    }
                }
                if narrow {
                    scan8::quantize_tables(prep.kernel8, &prep.tables, *centroids, g, gs, &mut prep.tab8, &mut prep.bias, &mut prep.step);
                } else if *centroids == 16 && gs <= scan::MAX_SUBVECTORS {
                    prep.scan = true;
                    prep.tab8.resize(g * per, 0);
                    prep.bias.clear();
                    prep.step.clear();
                    for h in 0..g {
                        let (bias, step) = scan::quantize_tables(&prep.tables[h * per..(h + 1) * per], &mut prep.tab8[h * per..(h + 1) * per]);
                        prep.bias.push(bias);
                        prep.step.push(step);
                    }
                    prep.sums.resize(g * scan::BLOCK, 0);
                }
            }
            Coded::Int { group, .. } => {
                let n = self.dk / *group;
                prep.qsum.clear();
                for h in 0..g {
                    for gi in 0..n {
                        prep.qsum.push(q[h * self.dk + gi * group..h * self.dk + (gi + 1) * group].iter().sum());
                    }
                }
            }
            _ => {}
        }
    }

    /// Raw scores <q_h, k_c> of the g query heads against KV head `kvh` of each cell, written
    /// as out[h * stride + j]. Exact cells use their f16 row, coded ones their codes.
    ///
    /// # Safety
    /// No thread writes these cells during the call.
    pub unsafe fn scores(&self, kvh: usize, prep: &mut Prep, g: usize, cells: &[(i32, u32)], out: &mut [f32], stride: usize) {
        if self.has_levels() && prep.scan {
            let mut lv = std::mem::take(&mut prep.levels);
            lv.resize(g * stride, 0);
            self.levels(kvh, prep, g, cells, &mut lv, out, stride);
            for h in 0..g {
                let (o, l) = (&mut out[h * stride..h * stride + cells.len()], &lv[h * stride..h * stride + cells.len()]);
                for (o, &l) in o.iter_mut().zip(l) {
                    if l != EXACT_LEVEL {
                        *o = level_score(prep.bias[h], prep.step[h], l);
                    }
                }
            }
            prep.levels = lv;
            return;
        }
        let n = stride;
        let dk = self.dk;
        prep.exact.resize(dk, 0.0);
        // the block whose sums prep.sums holds, and the 8-bit block last found not worth a scan
        let mut block = usize::MAX;
        let mut sparse = usize::MAX;
        let mut j = 0;
        while j < cells.len() {
            if prep.scan {
                let done = self.scan_run(kvh, prep, g, cells, j, out, stride);
                if done > 0 {
                    j += done;
                    block = usize::MAX; // prep.sums now holds that run's block
                    continue;
                }
            }
            let (at, c) = (j, cells[j].1 as usize);
            j += 1;
            if self.slab.has(c) {
                self.exact_row(c, kvh).convert_to_f32_slice(&mut prep.exact);
                for h in 0..g {
                    out[h * n + at] = dot(&prep.q[h * dk..(h + 1) * dk], &prep.exact);
                }
                continue;
            }
            match &self.coded {
                Coded::Pq { books, codes, dim, centroids, .. } if !books.is_empty() => {
                    let gs = dk / dim;
                    let m = *centroids;
                    let per = gs * m;
                    match &codes.data {
                        CodeData::Narrow(v) if prep.scan => {
                            let b = c / scan8::BLOCK;
                            if b != block && b != sparse {
                                // scan the block when enough of its coded cells come next; the
                                // sums are the same integers either way
                                let ahead = &cells[at..(at + scan8::BLOCK).min(cells.len())];
                                let used = ahead.iter().filter(|e| e.1 as usize / scan8::BLOCK == b && !self.slab.has(e.1 as usize)).count();
                                if used >= SCAN8_MIN_CELLS {
                                    let off = codes.at.block(kvh, b * scan8::BLOCK, false);
                                    scan8::sums(prep.kernel8, &v[off..off + gs * scan8::BLOCK], 0, 1, &prep.tab8, scan8::PLANES * g, gs, &mut prep.sums);
                                    block = b;
                                } else {
                                    sparse = b;
                                }
                            }
                            for h in 0..g {
                                let (hi, lo) = (scan8::PLANES * h, scan8::PLANES * h + 1);
                                let (sh, sl) = if b == block {
                                    let k = c % scan8::BLOCK;
                                    (prep.sums[hi * scan8::BLOCK + k], prep.sums[lo * scan8::BLOCK + k])
                                } else {
                                    let code = |i| v[codes.at.byte(c, kvh * gs + i)];
                                    (scan8::cell_sum(prep.kernel8, &prep.tab8, gs, hi, code), scan8::cell_sum(prep.kernel8, &prep.tab8, gs, lo, code))
                                };
                                out[h * n + at] = scan8::score(prep.bias[h], prep.step[h], sh, sl);
                            }
                        }
                        CodeData::Narrow(_) => {
                            for h in 0..g {
                                let t = &prep.tables[h * per..(h + 1) * per];
                                out[h * n + at] = (0..gs).map(|i| t[i * m + codes.get(c, kvh * gs + i)]).sum();
                            }
                        }
                        CodeData::Wide(v) => {
                            let span = c * codes.at.per + kvh * gs..c * codes.at.per + (kvh + 1) * gs;
                            for h in 0..g {
                                out[h * n + at] = gather_sum(&v[span.clone()], &prep.tables[h * per..(h + 1) * per], m);
                            }
                        }
                        CodeData::Nibble(_) => {
                            for h in 0..g {
                                let t = &prep.tables[h * per..(h + 1) * per];
                                out[h * n + at] = (0..gs).map(|i| t[i * m + codes.get(c, kvh * gs + i)]).sum();
                            }
                        }
                    }
                }
                Coded::Int { bits, group, codes, scale, zero } => {
                    let row = self.n_head_kv * dk;
                    let n_groups = row / *group;
                    let base = kvh * dk;
                    for h in 0..g {
                        let qh = &prep.q[h * dk..(h + 1) * dk];
                        let mut s = 0.0f32;
                        for gi in 0..dk / *group {
                            let gg = (base + gi * *group) / *group;
                            let mut acc = 0.0f32;
                            for k in 0..*group {
                                let idx = base + gi * *group + k;
                                let qv = if *bits == 8 {
                                    codes[c * row + idx]
                                } else {
                                    let b = codes[c * row / 2 + idx / 2];
                                    if idx.is_multiple_of(2) { b & 0x0f } else { b >> 4 }
                                };
                                acc += qh[gi * *group + k] * qv as f32;
                            }
                            s += scale[c * n_groups + gg] * acc + zero[c * n_groups + gg] * prep.qsum[h * (dk / *group) + gi];
                        }
                        out[h * n + at] = s;
                    }
                }
                // unreachable for a settled store: a PQ cell is encoded only after the fit
                _ => (0..g).for_each(|h| out[h * n + at] = 0.0),
            }
        }
    }

    /// Whether [`levels`](Self::levels) serves this store: 16-centroid codebooks, fitted (4-bit
    /// codes, scanned with quantized tables).
    pub fn has_levels(&self) -> bool {
        matches!(&self.coded, Coded::Pq { books, centroids: 16, dim, .. } if !books.is_empty() && self.dk / dim <= scan::MAX_SUBVECTORS)
    }

    /// The 4-bit scan's integer sums (levels) of the g query heads against KV head `kvh` of each
    /// cell, as `lv[h * stride + j]`. A coded cell scores [`level_score`] of its level and its
    /// head's `prep.bias_step(h)`; an exact
    /// cell gets [`EXACT_LEVEL`] and its raw score <q_h, k> in `exact[h * stride + j]` (the
    /// other entries of `exact` are left alone). A head's levels span a few hundred values
    /// (370 to 770 for SmolLM2's heads at 32768 cells), so the softmax can take one exp per
    /// level rather than one per cell
    /// ([`crate::levels`]). Needs [`has_levels`](Self::has_levels) and the
    /// query prepared.
    ///
    /// # Safety
    /// No thread writes these cells during the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn levels(&self, kvh: usize, prep: &mut Prep, g: usize, cells: &[(i32, u32)], lv: &mut [u16], exact: &mut [f32], stride: usize) {
        let Coded::Pq { codes, dim, .. } = &self.coded else {
            return;
        };
        let CodeData::Nibble(v) = &codes.data else {
            return;
        };
        const B: usize = scan::BLOCK;
        let (dk, gs, n) = (self.dk, self.dk / dim, cells.len());
        assert!(prep.scan && lv.len() >= (g - 1) * stride + n && exact.len() >= (g - 1) * stride + n);
        prep.exact.resize(dk, 0.0);
        // the block whose sums prep.sums holds
        let mut block = usize::MAX;
        let mut j = 0;
        while j < n {
            let c = cells[j].1 as usize;
            // the fast case: a whole block of coded cells, in order
            if c.is_multiple_of(B)
                && j + B <= n
                && cells[j..j + B].iter().enumerate().all(|(x, e)| e.1 as usize == c + x)
                && self.slab.slot[c..c + B].iter().all(|&s| s == NONE)
            {
                let at = codes.at.block(kvh, c, true);
                scan::sums(&v[at..at + gs * 16], &prep.tab8, g, gs, &mut prep.sums);
                for h in 0..g {
                    lv[h * stride + j..h * stride + j + B].copy_from_slice(&prep.sums[h * B..(h + 1) * B]);
                }
                block = usize::MAX;
                j += B;
                continue;
            }
            if self.slab.has(c) {
                self.exact_row(c, kvh).convert_to_f32_slice(&mut prep.exact);
                for h in 0..g {
                    lv[h * stride + j] = EXACT_LEVEL;
                    exact[h * stride + j] = dot(&prep.q[h * dk..(h + 1) * dk], &prep.exact);
                }
            } else {
                // a block scanned once serves its cells that follow
                if c / B != block {
                    let at = codes.at.block(kvh, c / B * B, true);
                    scan::sums(&v[at..at + gs * 16], &prep.tab8, g, gs, &mut prep.sums);
                    block = c / B;
                }
                for h in 0..g {
                    lv[h * stride + j] = prep.sums[h * B + c % B];
                }
            }
            j += 1;
        }
    }

    /// The 8-bit scan's fast case: when `cells[j..]` starts with the cells of one code block in
    /// order, all coded, scan up to [`scan8::RUN`] such blocks that follow each other and write
    /// their scores with one loop. Returns the cells done: the blocks'
    /// worth, or 0 (and nothing written) otherwise.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn scan_run(&self, kvh: usize, prep: &mut Prep, g: usize, cells: &[(i32, u32)], j: usize, out: &mut [f32], stride: usize) -> usize {
        let Coded::Pq { codes: Codes { data, at: layout }, dim, .. } = &self.coded else {
            return 0;
        };
        // 4-bit codes are scanned by `levels`
        let (block, most) = match data {
            CodeData::Narrow(_) => (scan8::BLOCK, scan8::RUN),
            CodeData::Nibble(_) | CodeData::Wide(_) => return 0,
        };
        let c0 = cells[j].1 as usize;
        if !c0.is_multiple_of(block) {
            return 0;
        }
        // whole blocks of coded cells, in order
        let whole = |k: usize| {
            let (at, c) = (j + k * block, c0 + k * block);
            at + block <= cells.len()
                && cells[at..at + block].iter().enumerate().all(|(x, e)| e.1 as usize == c + x)
                && self.slab.slot[c..c + block].iter().all(|&s| s == NONE)
        };
        let nb = (0..most).take_while(|&k| whole(k)).count();
        if nb == 0 {
            return 0;
        }
        let gs = self.dk / dim;
        let len = nb * block;
        match data {
            CodeData::Narrow(v) => {
                // a plane's blocks follow each other
                let (at, skip) = (layout.block(kvh, c0, false), gs * block);
                let tables = scan8::PLANES * g;
                scan8::sums(prep.kernel8, &v[at..at + (nb - 1) * skip + gs * block], skip, nb, &prep.tab8, tables, gs, &mut prep.sums);
                for h in 0..g {
                    let (bias, step) = (prep.bias[h], prep.step[h]);
                    let (hi, lo) = (scan8::PLANES * h, scan8::PLANES * h + 1);
                    let (hi, lo) = (&prep.sums[hi * len..(hi + 1) * len], &prep.sums[lo * len..(lo + 1) * len]);
                    let dst = &mut out[h * stride + j..h * stride + j + len];
                    for ((o, &sh), &sl) in dst.iter_mut().zip(hi).zip(lo) {
                        *o = scan8::score(bias, step, sh, sl);
                    }
                }
            }
            CodeData::Nibble(_) | CodeData::Wide(_) => return 0,
        }
        len
    }

    /// Raw bytes of one cell's keys for state I/O: a form byte (1 = exact f16 row, 0 = coded),
    /// then the row or the codes (and scales).
    pub fn save_cell(&mut self, cell: usize, w: &mut dyn FnMut(&[u8])) {
        let row = self.n_head_kv * self.dk;
        if self.slab.has(cell) {
            w(&[1]);
            let b: Vec<u8> = self.slab.row_mut(cell).iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
            w(&b);
            return;
        }
        w(&[0]);
        match &self.coded {
            Coded::None => {}
            Coded::Pq { codes, .. } => {
                let g = codes.at.per;
                // two bytes per code whatever the width in memory (the state format)
                let b: Vec<u8> = (0..g).flat_map(|i| (codes.get(cell, i) as u16).to_le_bytes()).collect();
                w(&b);
            }
            Coded::Int { bits, group, codes, scale, zero } => {
                let per = if *bits == 8 { row } else { row / 2 };
                w(&codes[cell * per..(cell + 1) * per]);
                let n = row / group;
                for v in scale[cell * n..(cell + 1) * n].iter().chain(&zero[cell * n..(cell + 1) * n]) {
                    w(&v.to_le_bytes());
                }
            }
        }
    }

    /// Inverse of [`save_cell`](Self::save_cell). False when the input ends early or is
    /// malformed.
    pub fn load_cell(&mut self, cell: usize, r: &mut dyn FnMut(&mut [u8]) -> bool) -> Result<()> {
        let short = || Error::State("the saved state ends early".into());
        let row = self.n_head_kv * self.dk;
        let mut form = [0u8];
        if !r(&mut form) {
            return Err(short());
        }
        match form[0] {
            1 => {
                let mut b = vec![0u8; row * 2];
                if !r(&mut b) {
                    return Err(short());
                }
                self.slab.reserve(cell);
                for (d, s) in self.slab.row_mut(cell).iter_mut().zip(b.chunks_exact(2)) {
                    *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]]));
                }
                Ok(())
            }
            0 => {
                self.slab.release(cell);
                match &mut self.coded {
                    Coded::None => Err(Error::State("a coded cell in an exact store".into())),
                    Coded::Pq { dim, codes, centroids, books, .. } => {
                        if books.is_empty() {
                            return Err(Error::State("coded keys without a codebook".into()));
                        }
                        let g = row / *dim;
                        let mut b = vec![0u8; g * 2];
                        if !r(&mut b) {
                            return Err(short());
                        }
                        for (i, s) in b.chunks_exact(2).enumerate() {
                            let d = u16::from_le_bytes([s[0], s[1]]);
                            if d as usize >= *centroids {
                                return Err(Error::State(format!("code {d} is out of range")));
                            }
                            codes.set(cell, i, d as u32);
                        }
                        if let Some(f) = &mut self.fresh {
                            f.push(cell as u32);
                        }
                        Ok(())
                    }
                    Coded::Int { bits, group, codes, scale, zero } => {
                        let per = if *bits == 8 { row } else { row / 2 };
                        if !r(&mut codes[cell * per..(cell + 1) * per]) {
                            return Err(short());
                        }
                        let n = row / *group;
                        let mut b = [0u8; 4];
                        for i in 0..2 * n {
                            if !r(&mut b) {
                                return Err(short());
                            }
                            let v = f32::from_le_bytes(b);
                            if i < n { scale[cell * n + i] = v } else { zero[cell * n + i - n] = v }
                        }
                        Ok(())
                    }
                }
            }
            x => Err(Error::State(format!("bad key form byte {x}"))),
        }
    }

    /// Start (or stop) listing the cells whose codes change, for a GPU tier that mirrors them.
    pub fn track_fresh(&mut self, on: bool) {
        self.fresh = on.then(Vec::new);
    }

    /// The cells coded since the last call (each may appear more than once).
    pub fn take_fresh(&mut self) -> Vec<u32> {
        self.fresh.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The PQ codes of `cell`, every KV head's in order (n_head_kv * dk / pq_dim of them).
    pub fn code_row(&self, cell: usize, out: &mut Vec<u16>) {
        if let Coded::Pq { dim, codes, .. } = &self.coded {
            let per = self.n_head_kv * self.dk / dim;
            out.extend((0..per).map(|i| codes.get(cell, i) as u16));
        }
    }

    /// The PQ codebooks (none before the fit, and for other codecs).
    pub fn codebooks(&self) -> &[Arc<Codebook>] {
        match &self.coded {
            Coded::Pq { books, .. } => books,
            _ => &[],
        }
    }

    /// Most bytes the exact rows held at once so far.
    pub fn peak_exact_bytes(&self) -> usize {
        self.peak_exact.max(self.slab.bytes())
    }

    pub fn exact_cells(&self) -> usize {
        self.slab.in_use()
    }

    pub fn row_len(&self) -> usize {
        self.n_head_kv * self.dk
    }

    /// Install codebooks (from a calibration file or a saved state). Books equal to the ones
    /// in place are kept as they are, so layers sharing a model-scope book keep sharing it.
    pub fn set_codebooks(&mut self, b: Vec<Arc<Codebook>>) -> Result<()> {
        let dk = self.dk;
        match &mut self.coded {
            Coded::Pq { dim, centroids, scope, books, .. }
                if b.is_empty()
                    || (b.len() == scope.books_per_layer(dk, *dim) && b.iter().all(|x| x.dim() == *dim && x.len() == *centroids)) =>
            {
                let same = books.len() == b.len() && books.iter().zip(&b).all(|(x, y)| x.centroids() == y.centroids());
                if !same {
                    *books = b;
                }
                Ok(())
            }
            _ if b.is_empty() => Ok(()),
            _ => Err(Error::State("the saved codebooks do not fit this cache's key codec".into())),
        }
    }

    /// Drop every cell (exact rows and the online codebook stay as they are: codes of free
    /// cells are never read).
    pub fn forget_all(&mut self) {
        for c in 0..self.slab.slot.len() {
            self.slab.release(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize, row: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_add(0x9e3779b97f4a7c15);
        (0..n * row)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn fill(store: &mut KeyStore, data: &[f32], n: usize) {
        let row = store.row_len();
        store.reserve(0..n);
        for c in 0..n {
            unsafe { store.write_exact(c, &data[c * row..(c + 1) * row]) };
        }
    }

    #[test]
    fn int_codecs_round_trip_within_half_a_step() {
        for bits in [8u32, 4] {
            let (n, heads, dk, group) = (20, 2, 64, 32);
            let mut st = KeyStore::new(KeyCodec::Int { bits, group }, n, heads, dk, 1, 0).unwrap();
            let data = keys(n, heads * dk, bits as u64);
            fill(&mut st, &data, n);
            st.settle(|_| false).unwrap();
            assert_eq!(st.exact_cells(), 0);
            let mut out = vec![0.0; heads * dk];
            let step = 4.0 / ((1u32 << bits) - 1) as f32;
            for c in 0..n {
                st.decode(c, &mut out);
                for (x, y) in out.iter().zip(&data[c * heads * dk..]) {
                    // f16 staging adds a little on top of half a quantization step
                    assert!((x - y).abs() <= step / 2.0 + 2e-3, "{bits} bits: {x} vs {y}");
                }
            }
        }
    }

    fn codec_dim(c: KeyCodec) -> usize {
        match c {
            KeyCodec::Pq { dim, .. } => dim,
            _ => 1,
        }
    }

    #[test]
    fn scores_equal_decode_then_dot() {
        let (n, heads, dk) = (300, 2, 16);
        for codec in [
            KeyCodec::Pq { dim: 2, centroids: 64, scope: Scope::Layer },
            KeyCodec::Pq { dim: 4, centroids: 32, scope: Scope::Group },
            KeyCodec::Int { bits: 4, group: 8 },
            KeyCodec::Int { bits: 8, group: 16 },
            // 4-bit codes: the blocked layout and the u8-table scan
            KeyCodec::Pq { dim: 1, centroids: 16, scope: Scope::Group },
            KeyCodec::Pq { dim: 2, centroids: 16, scope: Scope::Layer },
            // 8-bit codes (the two above too): the blocked layout and the u8-table scan
            KeyCodec::Pq { dim: 1, centroids: 256, scope: Scope::Layer },
            KeyCodec::Pq { dim: 1, centroids: 100, scope: Scope::Group },
        ] {
            let mut st = KeyStore::new(codec, n, heads, dk, 100, 1).unwrap();
            let data = keys(n, heads * dk, 3);
            fill(&mut st, &data, n);
            // keep cell 5 exact to cover both paths
            st.settle(|c| c == 5).unwrap();
            assert!(st.is_exact(5) && !st.is_exact(6));
            let g = 2;
            let q = keys(g, dk, 9);
            let cells: Vec<(i32, u32)> = (0..n as u32).map(|c| (c as i32, c)).collect();
            let mut prep = Prep::default();
            let mut out = vec![0.0; g * n];
            for kvh in 0..heads {
                st.prepare(&q, g, &mut prep);
                unsafe { st.scores(kvh, &mut prep, g, &cells, &mut out, cells.len()) };
                let mut rec = vec![0.0; heads * dk];
                for c in 0..n {
                    if c == 5 {
                        for (r, x) in rec.iter_mut().zip(&data[c * heads * dk..(c + 1) * heads * dk]) {
                            *r = f16::from_f32(*x).to_f32();
                        }
                    } else {
                        st.decode(c, &mut rec);
                    }
                    for h in 0..g {
                        let want: f32 = q[h * dk..(h + 1) * dk].iter().zip(&rec[kvh * dk..(kvh + 1) * dk]).map(|(a, b)| a * b).sum();
                        let got = out[h * n + c];
                        // the scan's u8 tables round each sub-vector's entry by up to step / 2
                        let rounding = if prep.scan && c != 5 { (dk / codec_dim(codec)) as f32 * prep.step[h] / 2.0 } else { 0.0 };
                        assert!((want - got).abs() <= 1e-3 * (1.0 + want.abs()) + rounding * 1.001, "{codec:?} cell {c}: {got} vs {want}");
                    }
                }
                // 4-bit codes: the levels behind those scores, exact cells marked
                assert_eq!(st.has_levels(), matches!(codec, KeyCodec::Pq { centroids: 16, .. }), "{codec:?}");
                if st.has_levels() {
                    let (mut lv, mut raw) = (vec![0u16; g * n], vec![f32::NAN; g * n]);
                    unsafe { st.levels(kvh, &mut prep, g, &cells, &mut lv, &mut raw, n) };
                    for c in 0..n {
                        for h in 0..g {
                            let (l, (bias, step)) = (lv[h * n + c], prep.bias_step(h));
                            if c == 5 {
                                assert_eq!((l, raw[h * n + c]), (EXACT_LEVEL, out[h * n + c]));
                            } else {
                                assert_eq!(level_score(bias, step, l), out[h * n + c], "{codec:?} cell {c}");
                            }
                        }
                    }
                }
                // any order and any subset of cells scores the same as the whole list in order
                // (sparse ones too: 8-bit codes are then summed cell by cell, not scanned)
                let mixed: Vec<(i32, u32)> = (0..n as u32).rev().filter(|c| c % 3 != 1).map(|c| (c as i32, c)).chain((64..128).map(|c| (c, c as u32))).collect();
                let sparse: Vec<(i32, u32)> = (0..n as u32).filter(|c| c % 16 == 3).chain(60..70).map(|c| (c as i32, c)).collect();
                for list in [mixed, sparse] {
                    let mut again = vec![0.0; g * list.len()];
                    unsafe { st.scores(kvh, &mut prep, g, &list, &mut again, list.len()) };
                    for (j, &(_, c)) in list.iter().enumerate() {
                        for h in 0..g {
                            assert_eq!(again[h * list.len() + j], out[h * n + c as usize], "{codec:?} cell {c}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn online_pq_waits_for_fit_tokens_then_encodes() {
        let (n, heads, dk) = (64, 1, 8);
        let mut st = KeyStore::new(KeyCodec::Pq { dim: 2, centroids: 16, scope: Scope::Layer }, n, heads, dk, 40, 0).unwrap();
        let data = keys(n, dk, 5);
        let row = dk;
        st.reserve(0..30);
        for c in 0..30 {
            unsafe { st.write_exact(c, &data[c * row..(c + 1) * row]) };
        }
        assert!(st.settle(|_| false).unwrap().is_none());
        assert_eq!(st.exact_cells(), 30, "too few keys to fit: everything stays exact");
        st.reserve(30..50);
        for c in 30..50 {
            unsafe { st.write_exact(c, &data[c * row..(c + 1) * row]) };
        }
        let note = st.settle(|c| c >= 48).unwrap();
        assert!(note.unwrap().contains("16 centroids"));
        assert_eq!(st.exact_cells(), 2, "all but the protected cells are coded");
        assert_eq!(st.codebooks().len(), 1);
        let before = st.bytes(n);
        st.forget(48);
        assert!(st.bytes(n) <= before);
    }

    #[test]
    fn codec_needs_a_divisor_of_the_head_dimension() {
        assert!(KeyStore::new(KeyCodec::Pq { dim: 4, centroids: 16, scope: Scope::Layer }, 4, 1, 6, 1, 0).is_err());
        assert!(KeyStore::new(KeyCodec::Int { bits: 8, group: 32 }, 4, 1, 48, 1, 0).is_err());
    }

    #[test]
    fn each_kv_heads_codes_lie_in_one_plane_of_their_own() {
        // (cells, codes a cell, codes a plane, centroids): 4-bit and 8-bit, whole and partial
        // blocks, one plane and several
        for (n, per, plane, centroids) in [(64, 192, 64, 16), (70, 12, 4, 16), (33, 8, 8, 16), (130, 96, 32, 256), (64, 6, 2, 200), (5, 4, 1, 256)] {
            let mut codes = Codes::new(n, per, plane, centroids).unwrap();
            let nibbles = matches!(codes.data, CodeData::Nibble(_));
            let len = match &codes.data {
                CodeData::Nibble(v) | CodeData::Narrow(v) => v.len(),
                CodeData::Wide(_) => unreachable!(),
            };
            let mut seen = std::collections::HashSet::new();
            for cell in 0..n {
                for i in 0..per {
                    let (byte, shift) = if nibbles { codes.at.nibble(cell, i) } else { (codes.at.byte(cell, i), 0) };
                    assert!(byte < len, "{n} {per} {plane}: cell {cell} code {i} at {byte} of {len}");
                    let p = i / plane;
                    assert!((p * codes.at.plane_bytes..(p + 1) * codes.at.plane_bytes).contains(&byte), "code {i} outside plane {p}");
                    assert!(seen.insert((byte, shift)), "{n} {per} {plane}: cell {cell} code {i} shares {byte}/{shift}");
                }
            }
            // and every code reads back what was set, the neighbours untouched
            let code = |cell: usize, i: usize| ((cell * 31 + i * 7) % centroids) as u32;
            for cell in 0..n {
                for i in 0..per {
                    codes.set(cell, i, code(cell, i));
                }
            }
            for cell in 0..n {
                for i in 0..per {
                    assert_eq!(codes.get(cell, i), code(cell, i) as usize, "cell {cell} code {i}");
                }
            }
        }
    }
}
