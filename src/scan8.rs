//! Fast table scans for 8-bit PQ codes (codebooks of 17 to 256 centroids).
//!
//! Codes are kept in blocks of [`BLOCK`] cells. Inside a block, each sub-vector position takes
//! 64 bytes, byte k the code of cell k. A KV head's sub-vectors are contiguous, so one scan
//! streams `64 * gs` bytes per block and head.
//!
//! A query's f32 tables are quantized to u16 with one step per query head, and each is kept as
//! two byte tables ([`PLANES`]), its high and its low bytes: the kernels look bytes up and sum
//! each byte table in u16 lanes, and score = bias + step * (256 * high sum + low sum), with a
//! rounding error of at most `gs * step / 2`. One byte a table with one step per head, as the
//! 4-bit scan of [`crate::scan`] has, is too coarse here: a 256-centroid book shared by all
//! channels spans every channel's range, so each row's few used entries fell on a handful of
//! levels (cpu25 at 8192: mean KLD 0.038 and top-1 90.6% against 0.008 and 97.3% in f32).
//!
//! Each table has [`TABLE`] entries whatever the codebook size (the rest is padding), so that a
//! code indexes it directly. Where the byte tables lie depends on the kernel that reads them
//! ([`Kernel::at`]): one after another for the portable, AVX-512 VBMI and NEON kernels (a
//! sub-vector's table is four 64-byte registers, or sixteen of 16 bytes), eight interleaved per
//! entry for the AVX2 and SSE4.1 ones (one 64-bit read fetches both bytes of four query heads).
//! Every kernel gives the same integers as [`sums_portable`], the reference.

use crate::simd::Level;

/// Cells per code block.
pub const BLOCK: usize = 64;

/// Most blocks one call of [`sums`] scans: the tables are read once for all of them.
pub const RUN: usize = 4;

/// Entries of one sub-vector's quantized table.
pub const TABLE: usize = 256;

/// Most sub-vectors per head the u16 sums hold without overflow (gs * 255 <= 65535).
pub const MAX_SUBVECTORS: usize = 256;

/// Byte tables per query head: the high bytes of its u16 tables (byte table 2h), then the low
/// ones (2h + 1).
pub const PLANES: usize = 2;

/// Byte tables the interleaved layout (AVX2 and SSE4.1 kernels) keeps per entry.
const INTERLEAVE: usize = 8;

/// Byte offset of code `i` (of `per` per cell) of `cell`.
#[inline(always)]
pub fn locate(cell: usize, i: usize, per: usize) -> usize {
    (cell / BLOCK) * per * BLOCK + i * BLOCK + cell % BLOCK
}

/// Bytes that hold the codes of `n_cells` cells of `per` codes each.
pub fn bytes_for(n_cells: usize, per: usize) -> usize {
    n_cells.div_ceil(BLOCK) * per * BLOCK
}

/// The kernel that scans, which fixes the layout of the quantized tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernel {
    #[default]
    Portable,
    /// eight byte tables interleaved per entry, read one 64-bit entry a cell (no gathers),
    /// compiled for AVX2
    Avx2,
    /// the same, compiled for SSE4.1 (x86 without AVX2)
    Sse41,
    /// two-register byte permutes (`vpermi2b`), 64 cells per lookup
    Vbmi,
    /// four-register table lookups (`tbl`), 16 cells per lookup (Arm)
    Neon,
}

impl Kernel {
    /// The kernel for an instruction-set level, lowered to what the CPU has: AVX-512 without
    /// VBMI (before Ice Lake and Zen 4) runs the AVX2 kernel.
    pub fn for_level(level: Level) -> Kernel {
        match level.usable() {
            Level::Portable => Kernel::Portable,
            Level::Neon => Kernel::Neon,
            Level::Sse41 => Kernel::Sse41,
            Level::Avx2 => Kernel::Avx2,
            Level::Avx512 if has_vbmi() => Kernel::Vbmi,
            Level::Avx512 => Kernel::Avx2,
        }
    }

    /// The kernel the process-wide level ([`crate::simd::level`]) gives.
    pub fn chosen() -> Kernel {
        Kernel::for_level(crate::simd::level())
    }

    /// Whether the byte tables are [`INTERLEAVE`]d per entry (else one after another).
    #[inline(always)]
    fn interleaved(self) -> bool {
        matches!(self, Kernel::Avx2 | Kernel::Sse41)
    }

    /// Bytes of `nt` byte tables of `gs` sub-vectors.
    pub fn table_bytes(self, nt: usize, gs: usize) -> usize {
        if self.interleaved() {
            nt.div_ceil(INTERLEAVE) * INTERLEAVE * gs * TABLE
        } else {
            nt * gs * TABLE
        }
    }

    /// Index of byte table `k`'s entry for `code` of sub-vector `i`.
    #[inline(always)]
    pub fn at(self, gs: usize, k: usize, i: usize, code: usize) -> usize {
        if self.interleaved() {
            ((k / INTERLEAVE) * gs * TABLE + i * TABLE + code) * INTERLEAVE + k % INTERLEAVE
        } else {
            (k * gs + i) * TABLE + code
        }
    }
}

fn has_vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Quantize `g` heads' f32 tables (`gs` x `m` each, `m` <= [`TABLE`]) to u16, as `PLANES * g`
/// byte tables in `kernel`'s layout: `out` gets `kernel.table_bytes(PLANES * g, gs)` bytes,
/// padding entries 0, and `bias` and `step` one value per head, with table[h][i][c] ~ min_i +
/// step[h] * q and bias[h] = sum of min_i. The result does not depend on the kernel's
/// instruction set, only its layout.
#[allow(clippy::too_many_arguments)]
pub fn quantize_tables(kernel: Kernel, t: &[f32], m: usize, g: usize, gs: usize, out: &mut Vec<u8>, bias: &mut Vec<f32>, step: &mut Vec<f32>) {
    assert!(m <= TABLE && gs <= MAX_SUBVECTORS && t.len() >= g * gs * m);
    reset_tables(kernel, out, g, gs);
    bias.clear();
    step.clear();
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, Kernel::Avx2 | Kernel::Vbmi) {
        // SAFETY: an Avx2 or Vbmi kernel comes only from `Kernel::for_level`, which checked
        // that the CPU has AVX2 at least.
        return unsafe { tables_avx2(kernel, t, m, g, gs, out, bias, step) };
    }
    tables_lanes(kernel, t, m, g, gs, out, bias, step, min_max)
}

/// [`quantize_tables`] for tables that are products of the query's channels and scalar
/// centroids (1-dim sub-vectors, `q`: g rows of gs), built here rather than read from f32
/// tables: table[h][i][c] = q[h][i] * books[book(i)][c], `m` centroids a book. Same bytes,
/// bias and step as [`quantize_tables`] on those tables: a product with a fixed factor is
/// monotone in the centroid, so each row's extremes are the products with the book's.
#[allow(clippy::too_many_arguments)]
pub fn quantize_products(
    kernel: Kernel,
    q: &[f32],
    g: usize,
    gs: usize,
    books: &[&[f32]],
    book: impl Fn(usize) -> usize,
    out: &mut Vec<u8>,
    bias: &mut Vec<f32>,
    step: &mut Vec<f32>,
) {
    let m = books.first().map_or(0, |b| b.len());
    assert!(
        m <= TABLE
            && gs <= MAX_SUBVECTORS
            && books.len() <= MAX_SUBVECTORS
            && q.len() >= g * gs
            && books.iter().all(|b| b.len() == m)
            && (0..gs).all(|i| book(i) < books.len())
    );
    reset_tables(kernel, out, g, gs);
    bias.clear();
    step.clear();
    #[cfg(target_arch = "x86_64")]
    if matches!(kernel, Kernel::Avx2 | Kernel::Vbmi) {
        // SAFETY: as in `quantize_tables`.
        return unsafe { products_avx2(kernel, q, g, gs, books, book, out, bias, step) };
    }
    products_lanes(kernel, q, g, gs, books, book, out, bias, step, min_max)
}

/// The same code compiled for AVX2, so that its loops vectorise wider, with the rows' minima
/// and maxima in AVX2 (the compiler keeps `f32::min` scalar for its NaN rule). Without
/// fast-math the arithmetic is the same (no fused multiply-adds), so are the bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn tables_avx2(kernel: Kernel, t: &[f32], m: usize, g: usize, gs: usize, out: &mut [u8], bias: &mut Vec<f32>, step: &mut Vec<f32>) {
    // SAFETY: this function runs only where AVX2 is present.
    tables_lanes(kernel, t, m, g, gs, out, bias, step, |row| unsafe { min_max_avx2(row) })
}

/// [`quantize_products`] compiled for AVX2, as [`tables_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn products_avx2(
    kernel: Kernel,
    q: &[f32],
    g: usize,
    gs: usize,
    books: &[&[f32]],
    book: impl Fn(usize) -> usize,
    out: &mut [u8],
    bias: &mut Vec<f32>,
    step: &mut Vec<f32>,
) {
    // SAFETY: this function runs only where AVX2 is present.
    products_lanes(kernel, q, g, gs, books, book, out, bias, step, |row| unsafe { min_max_avx2(row) })
}

/// Query heads whose tables one interleaved entry holds: each head's two bytes, side by side,
/// so that one 64-bit read fetches them all. Their tables are written together, an entry
/// whole; the other layouts are written a head at a time.
const HEADS_PER_ENTRY: usize = INTERLEAVE / PLANES;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tables_lanes(
    kernel: Kernel,
    t: &[f32],
    m: usize,
    g: usize,
    gs: usize,
    out: &mut [u8],
    bias: &mut Vec<f32>,
    step: &mut Vec<f32>,
    min_max: impl Fn(&[f32]) -> (f32, f32),
) {
    let row = |h: usize, i: usize| &t[(h * gs + i) * m..(h * gs + i + 1) * m];
    let extremes = |h: usize, i: usize| min_max(row(h, i));
    let fill = |h: usize, i: usize, lo: f32, inv: f32, q: &mut [u16; TABLE]| quantize_row(row(h, i).iter().copied(), lo, inv, q);
    write_tables(kernel, m, g, gs, out, bias, step, extremes, fill)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn products_lanes(
    kernel: Kernel,
    q: &[f32],
    g: usize,
    gs: usize,
    books: &[&[f32]],
    book: impl Fn(usize) -> usize,
    out: &mut [u8],
    bias: &mut Vec<f32>,
    step: &mut Vec<f32>,
    min_max: impl Fn(&[f32]) -> (f32, f32),
) {
    let m = books.first().map_or(0, |b| b.len());
    let mut ext = [(0.0f32, 0.0f32); MAX_SUBVECTORS];
    for (e, b) in ext.iter_mut().zip(books) {
        *e = min_max(b);
    }
    let extremes = |h: usize, i: usize| {
        let x = q[h * gs + i];
        let (cmin, cmax) = ext[book(i)];
        let (u, v) = (x * cmin, x * cmax);
        if u < v { (u, v) } else { (v, u) }
    };
    let fill = |h: usize, i: usize, lo: f32, inv: f32, row: &mut [u16; TABLE]| {
        let x = q[h * gs + i];
        quantize_row(books[book(i)].iter().map(|&c| x * c), lo, inv, row)
    };
    write_tables(kernel, m, g, gs, out, bias, step, extremes, fill)
}

/// The tables of `g` heads in `kernel`'s layout, from each row's extremes (`extremes(h, i)`,
/// the smallest and largest value of head h's row for sub-vector i) and its quantized values
/// (`fill(h, i, lo, inv, row)`): per head, the extremes give the bias and the step, then each
/// row is quantized and stored. The interleaved layout is written [`HEADS_PER_ENTRY`] heads at
/// a time, every byte of it (padding heads and entries 0).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn write_tables(
    kernel: Kernel,
    m: usize,
    g: usize,
    gs: usize,
    out: &mut [u8],
    bias: &mut Vec<f32>,
    step: &mut Vec<f32>,
    extremes: impl Fn(usize, usize) -> (f32, f32),
    fill: impl Fn(usize, usize, f32, f32, &mut [u16; TABLE]),
) {
    let together = if kernel.interleaved() { HEADS_PER_ENTRY } else { 1 };
    let mut lo = [[0.0f32; MAX_SUBVECTORS]; HEADS_PER_ENTRY];
    let mut inv = [0.0f32; HEADS_PER_ENTRY];
    let mut rows = [[0u16; TABLE]; HEADS_PER_ENTRY];
    for h0 in (0..g).step_by(together) {
        let nh = together.min(g - h0);
        for (j, (lo, inv)) in lo.iter_mut().zip(inv.iter_mut()).take(nh).enumerate() {
            let (mut b, mut range) = (0.0f32, 0.0f32);
            for (i, l) in lo[..gs].iter_mut().enumerate() {
                let (mn, mx) = extremes(h0 + j, i);
                *l = mn;
                b += mn;
                range = range.max(mx - mn);
            }
            *inv = push_step(range, b, bias, step);
        }
        // heads past the last one are padding
        for r in &mut rows[nh..] {
            r.fill(0);
        }
        #[allow(clippy::needless_range_loop)] // i is a column of lo (lo[j][i]), not a row
        for i in 0..gs {
            for (j, row) in rows.iter_mut().take(nh).enumerate() {
                fill(h0 + j, i, lo[j][i], inv[j], row);
            }
            store_rows(kernel, out, gs, h0, i, m, &rows, nh);
        }
    }
}

/// Size `out` for `g` heads' tables; zero it where the layout is not written whole.
fn reset_tables(kernel: Kernel, out: &mut Vec<u8>, g: usize, gs: usize) {
    if !kernel.interleaved() {
        out.clear();
    }
    out.resize(kernel.table_bytes(PLANES * g, gs), 0);
}

/// The step that spreads the largest row range over 0..=65535 (1 when there is none), pushed
/// with the bias; returns its inverse.
#[inline(always)]
fn push_step(range: f32, b: f32, bias: &mut Vec<f32>, step: &mut Vec<f32>) -> f32 {
    let s = if range > 0.0 && range.is_finite() { range / 65535.0 } else { 1.0 };
    bias.push(b);
    step.push(s);
    1.0 / s
}

/// Quantize one row's values (less `lo`, times `inv`) to u16 entries, the entries past them 0.
/// Rounded by adding 2^23, whose float has a unit step up to 2^24, and keeping the low bits,
/// so that the loop vectorises (`round` is a libm call on the baseline target and a saturating
/// cast goes one lane at a time); the comparisons clamp to 0..=65535, NaN to 0.
#[inline(always)]
fn quantize_row(values: impl ExactSizeIterator<Item = f32>, lo: f32, inv: f32, row: &mut [u16; TABLE]) {
    let n = values.len().min(TABLE);
    for (o, x) in row.iter_mut().zip(values) {
        let y = (x - lo) * inv;
        let y = if y > 0.0 { y } else { 0.0 };
        let y = if y < 65535.0 { y } else { 65535.0 };
        *o = (y + 8_388_608.0).to_bits() as u16;
    }
    row[n..].fill(0);
}

/// Store the quantized rows of sub-vector `i` of heads `h0..h0 + nh`: high bytes to byte
/// table 2h, low ones to 2h + 1. The interleaved layout writes whole entries from all the rows
/// (those past `nh` are 0); the others write the first `m` entries of each head's two tables
/// and leave the padding as it was.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn store_rows(kernel: Kernel, out: &mut [u8], gs: usize, h0: usize, i: usize, m: usize, rows: &[[u16; TABLE]; HEADS_PER_ENTRY], nh: usize) {
    match kernel {
        k if k.interleaved() => {
            let at = kernel.at(gs, PLANES * h0, i, 0);
            let entries = out[at..at + TABLE * INTERLEAVE].chunks_exact_mut(INTERLEAVE);
            let heads = rows[0].iter().zip(&rows[1]).zip(rows[2].iter().zip(&rows[3]));
            // a little-endian u16 whose first byte is the high one: the byte-swapped entry
            for (o, ((&a, &b), (&c, &d))) in entries.zip(heads) {
                let e = a.swap_bytes() as u64 | (b.swap_bytes() as u64) << 16 | (c.swap_bytes() as u64) << 32 | (d.swap_bytes() as u64) << 48;
                o.copy_from_slice(&e.to_le_bytes());
            }
        }
        _ => {
            for (j, row) in rows.iter().take(nh).enumerate() {
                let (hi, low) = (kernel.at(gs, PLANES * (h0 + j), i, 0), kernel.at(gs, PLANES * (h0 + j) + 1, i, 0));
                let (a, b) = out.split_at_mut(low);
                for ((oh, ol), &v) in a[hi..hi + m].iter_mut().zip(&mut b[..m]).zip(&row[..m]) {
                    *oh = (v >> 8) as u8;
                    *ol = v as u8;
                }
            }
        }
    }
}

/// Score of a cell from the sums of its head's two byte tables.
#[inline(always)]
pub fn score(bias: f32, step: f32, high: u16, low: u16) -> f32 {
    // below 2^24 (gs <= 256), so exact in f32
    bias + step * (high as u32 * 256 + low as u32) as f32
}

/// Smallest and largest of a table row. Each comparison keeps the running value unless the
/// new one is strictly beyond it, as `minps`/`maxps` do in [`min_max_avx2`], so that both give
/// the same answer (NaNs aside, which no scan can use anyway).
fn min_max(row: &[f32]) -> (f32, f32) {
    let mut mn = [f32::INFINITY; 8];
    let mut mx = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for ((a, b), &x) in mn.iter_mut().zip(mx.iter_mut()).zip(c) {
            *a = if *a < x { *a } else { x };
            *b = if *b > x { *b } else { x };
        }
    }
    let rest = chunks.remainder();
    let a = mn.iter().chain(rest).fold(f32::INFINITY, |a, &x| if a < x { a } else { x });
    let b = mx.iter().chain(rest).fold(f32::NEG_INFINITY, |b, &x| if b > x { b } else { x });
    (a, b)
}

/// [`min_max`] in AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn min_max_avx2(row: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let mut mn = _mm256_set1_ps(f32::INFINITY);
    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        let x = _mm256_loadu_ps(c.as_ptr());
        mn = _mm256_min_ps(mn, x);
        mx = _mm256_max_ps(mx, x);
    }
    let (mut a, mut b) = ([0.0f32; 8], [0.0f32; 8]);
    _mm256_storeu_ps(a.as_mut_ptr(), mn);
    _mm256_storeu_ps(b.as_mut_ptr(), mx);
    let rest = chunks.remainder();
    let a = a.iter().chain(rest).fold(f32::INFINITY, |a, &x| if a < x { a } else { x });
    let b = b.iter().chain(rest).fold(f32::NEG_INFINITY, |b, &x| if b > x { b } else { x });
    (a, b)
}

/// Byte-table sum of one cell for byte table `k`: `code(i)` is the cell's code of sub-vector i
/// (the scans give the same integer for the cell).
#[inline]
pub fn cell_sum(kernel: Kernel, tabs: &[u8], gs: usize, k: usize, code: impl Fn(usize) -> u8) -> u16 {
    (0..gs).map(|i| tabs[kernel.at(gs, k, i, code(i) as usize)] as u32).sum::<u32>() as u16
}

/// Byte-table sums of `nb` consecutive blocks (1 to [`RUN`]) for `g` byte tables (`PLANES`
/// per query head): `codes` holds block b's `64 * gs` bytes of one KV head at `b * stride`,
/// `tabs` the tables in `kernel`'s layout; `out[k * nb * 64 + b * 64 + cell]`, so that a
/// table's sums of the run are contiguous.
#[allow(clippy::too_many_arguments)]
pub fn sums(kernel: Kernel, codes: &[u8], stride: usize, nb: usize, tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: a Vbmi or Avx2 kernel comes only from `Kernel::for_level`, which checked
        // that the CPU has its features; the lengths are checked inside.
        Kernel::Vbmi => return unsafe { sums_vbmi(codes, stride, nb, tabs, g, gs, out) },
        Kernel::Avx2 => return unsafe { sums_loads_avx2(codes, stride, nb, tabs, g, gs, out) },
        // SAFETY: as above, for SSE4.1
        Kernel::Sse41 => return unsafe { sums_loads(codes, stride, nb, tabs, g, gs, out) },
        Kernel::Portable | Kernel::Neon => {}
    }
    #[cfg(target_arch = "aarch64")]
    if kernel == Kernel::Neon {
        // SAFETY: a Neon kernel comes only from `Kernel::for_level`, which checked that the CPU
        // has NEON; the lengths are checked inside.
        return unsafe { sums_neon(codes, stride, nb, tabs, g, gs, out) };
    }
    let _ = kernel;
    sums_portable(codes, stride, nb, tabs, g, gs, out)
}

/// The lengths every kernel needs.
#[allow(clippy::too_many_arguments)]
fn check(codes: &[u8], stride: usize, nb: usize, tabs: &[u8], tab_bytes: usize, g: usize, gs: usize, out: &[u16]) {
    assert!(
        (1..=RUN).contains(&nb)
            && gs <= MAX_SUBVECTORS
            && codes.len() >= (nb - 1) * stride + BLOCK * gs
            && tabs.len() >= tab_bytes
            && out.len() >= g * nb * BLOCK
    );
}

/// The reference for [`sums`] (tables in the portable layout).
#[allow(clippy::too_many_arguments)]
pub fn sums_portable(codes: &[u8], stride: usize, nb: usize, tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    check(codes, stride, nb, tabs, g * gs * TABLE, g, gs, out);
    for h in 0..g {
        let t = &tabs[h * gs * TABLE..(h + 1) * gs * TABLE];
        for b in 0..nb {
            let c = &codes[b * stride..b * stride + BLOCK * gs];
            for cell in 0..BLOCK {
                let s: u32 = (0..gs).map(|i| t[i * TABLE + c[i * BLOCK + cell] as usize] as u32).sum();
                out[(h * nb + b) * BLOCK + cell] = s as u16;
            }
        }
    }
}

/// Write the sums of consecutive cells from `first` on, of the interleaved kernels' group
/// `chunk` of `tables` byte tables: a cell's u64 in `low` holds the sums of tables 2j in its
/// u16 lane j, in `high` those of tables 2j + 1.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn spread_sums(low: &[u64], high: &[u64], first: usize, chunk: usize, tables: usize, nb: usize, out: &mut [u16]) {
    for (cell, (&l, &hh)) in low.iter().zip(high).enumerate() {
        for x in 0..tables {
            let lane = if x % 2 == 0 { l } else { hh };
            out[(chunk * INTERLEAVE + x) * nb * BLOCK + first + cell] = (lane >> (16 * (x / 2))) as u16;
        }
    }
}

/// Sub-vectors whose entries the x86 kernels read for every cell of a run before they move on:
/// eight are 16 KiB of entries, which stay in a 32 KiB L1 cache. Each entry read fetches a line
/// of its own, and passing over all of a head's tables per 16 cells (128 KiB for 64
/// sub-vectors) refilled them from L2: spans of 4 to 16 took about 10% off the gather kernel
/// that came before [`sums_loads`] on Zen 3.
#[cfg(target_arch = "x86_64")]
const SPAN: usize = 8;

/// Cells whose sums [`sums_loads`] keeps in registers: four of whole sums and four of high ones
/// (16 cells' worth would take all 16 XMM registers).
#[cfg(target_arch = "x86_64")]
const CELLS: usize = 8;

/// The x86 kernel, for SSE4.1 and (compiled with VEX encodings by [`sums_loads_avx2`]) AVX2.
/// Each cell's entry, a u64 holding up to eight byte tables' bytes (both bytes of four query
/// heads), is one 64-bit read at its code, and two cells' entries share a register. The u16
/// lanes are summed whole (table 2j plus 256 times table 2j + 1, wrapping) and by their high
/// bytes (tables 2j + 1); tables 2j come out as whole minus 256 times high, exact because every
/// true sum is below 2^16. The sub-vectors go [`SPAN`] at a time over every cell of the run,
/// the partial sums kept per [`CELLS`] cells.
///
/// Plain reads, not gathers: on Zen 3 (`cargo bench --bench kernels -- --quick scan/8bit_avx2`,
/// 3 query heads, 8192 cells of 64 sub-vectors, three runs taking turns) this took 288-391 µs
/// at AVX2 where the four-element 64-bit gathers of the same entries that it replaced took
/// 558-614 µs (the portable kernel, one byte table at a time: 4.7 ms). Filling 256-bit
/// registers from the same reads was no faster.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
#[allow(clippy::too_many_arguments)]
unsafe fn sums_loads(codes: &[u8], stride: usize, nb: usize, tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    sums_loads_body(codes, stride, nb, tabs, g, gs, out)
}

/// [`sums_loads`] compiled for AVX2, with VEX encodings (three-operand forms, fewer register
/// copies; on Zen 3 within the noise of the SSE build).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn sums_loads_avx2(codes: &[u8], stride: usize, nb: usize, tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    sums_loads_body(codes, stride, nb, tabs, g, gs, out)
}

/// The body of [`sums_loads`] and [`sums_loads_avx2`], inlined into each so that its
/// intrinsics compile for the caller's features. The caller has SSE4.1 at least.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn sums_loads_body(codes: &[u8], stride: usize, nb: usize, tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    use std::arch::x86_64::*;
    check(codes, stride, nb, tabs, Kernel::Sse41.table_bytes(g, gs), g, gs, out);
    let parts = nb * BLOCK / CELLS;
    for chunk in 0..g.div_ceil(INTERLEAVE) {
        let t = tabs.as_ptr().add(chunk * INTERLEAVE * gs * TABLE) as *const i64;
        let tables = (g - chunk * INTERLEAVE).min(INTERLEAVE);
        let mut whole = [[_mm_setzero_si128(); CELLS / 2]; RUN * BLOCK / CELLS];
        let mut high = [[_mm_setzero_si128(); CELLS / 2]; RUN * BLOCK / CELLS];
        for i0 in (0..gs).step_by(SPAN) {
            for part in 0..parts {
                let (b, first) = (part / (BLOCK / CELLS), part % (BLOCK / CELLS) * CELLS);
                let (mut w, mut hi) = (whole[part], high[part]);
                for i in i0..(i0 + SPAN).min(gs) {
                    let c = codes.as_ptr().add(b * stride + i * BLOCK + first);
                    let row = t.add(i * TABLE);
                    for k in 0..CELLS / 2 {
                        // the tables are bytes: their entries may be unaligned
                        let one = _mm_loadl_epi64(row.add(*c.add(2 * k) as usize) as *const __m128i);
                        let r = _mm_insert_epi64::<1>(one, row.add(*c.add(2 * k + 1) as usize).read_unaligned());
                        w[k] = _mm_add_epi16(w[k], r);
                        hi[k] = _mm_add_epi16(hi[k], _mm_srli_epi16(r, 8));
                    }
                }
                (whole[part], high[part]) = (w, hi);
            }
        }
        for part in 0..parts {
            for k in 0..CELLS / 2 {
                let low = _mm_sub_epi16(whole[part][k], _mm_slli_epi16(high[part][k], 8));
                let (mut l, mut hh) = ([0u64; 2], [0u64; 2]);
                _mm_storeu_si128(l.as_mut_ptr() as *mut __m128i, low);
                _mm_storeu_si128(hh.as_mut_ptr() as *mut __m128i, high[part][k]);
                spread_sums(&l, &hh, part * CELLS + k * 2, chunk, tables, nb, out);
            }
        }
    }
}

/// One code register (64 cells) per sub-vector and block. A 256-entry table is four registers:
/// `vpermi2b` looks the low 7 bits of each code up in the first two and in the last two, and
/// bit 7 picks one of the results. A byte table is loaded once for the run's blocks (the
/// tables of a few heads outgrow the L1 cache, and reloading them per block made the scan wait
/// on L2). Sums as in [`sums_loads`]: u16 lanes summed whole and by high bytes (cells 2k and
/// 2k + 1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn sums_vbmi(codes: &[u8], stride: usize, nb: usize, tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    check(codes, stride, nb, tabs, g * gs * TABLE, g, gs, out);
    for k in 0..g {
        let t = tabs.as_ptr().add(k * gs * TABLE);
        let o = out.as_mut_ptr().add(k * nb * BLOCK);
        let c = codes.as_ptr();
        match nb {
            1 => sums_vbmi_blocks::<1>(c, stride, t, gs, o),
            2 => sums_vbmi_blocks::<2>(c, stride, t, gs, o),
            3 => sums_vbmi_blocks::<3>(c, stride, t, gs, o),
            _ => sums_vbmi_blocks::<4>(c, stride, t, gs, o),
        }
    }
}

/// `B` blocks of one byte table for [`sums_vbmi`]: codes of block b at `codes + b * stride`, tables
/// at `t` (`gs * 256` bytes), sums to `o` (`BLOCK` a block). The caller checked the lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2")]
#[inline]
unsafe fn sums_vbmi_blocks<const B: usize>(codes: *const u8, stride: usize, t: *const u8, gs: usize, o: *mut u16) {
    use std::arch::x86_64::*;
    let mut whole = [_mm512_setzero_si512(); B];
    let mut high = [_mm512_setzero_si512(); B];
    for i in 0..gs {
        let tb = t.add(i * TABLE);
        let t0 = _mm512_loadu_si512(tb as *const _);
        let t1 = _mm512_loadu_si512(tb.add(64) as *const _);
        let t2 = _mm512_loadu_si512(tb.add(128) as *const _);
        let t3 = _mm512_loadu_si512(tb.add(192) as *const _);
        for b in 0..B {
            let c = _mm512_loadu_si512(codes.add(b * stride + i * BLOCK) as *const _);
            let r = _mm512_mask_blend_epi8(_mm512_movepi8_mask(c), _mm512_permutex2var_epi8(t0, c, t1), _mm512_permutex2var_epi8(t2, c, t3));
            whole[b] = _mm512_add_epi16(whole[b], r);
            high[b] = _mm512_add_epi16(high[b], _mm512_srli_epi16(r, 8));
        }
    }
    // u16 lane k holds cell 2k (low sums) and 2k + 1 (high sums): interleave them back
    static EVEN_ODD: [u16; 64] = {
        let mut x = [0u16; 64];
        let mut k = 0;
        while k < 32 {
            x[2 * k] = k as u16;
            x[2 * k + 1] = 32 + k as u16;
            k += 1;
        }
        x
    };
    let first = _mm512_loadu_si512(EVEN_ODD.as_ptr() as *const _);
    let second = _mm512_loadu_si512(EVEN_ODD.as_ptr().add(32) as *const _);
    for b in 0..B {
        let low = _mm512_sub_epi16(whole[b], _mm512_slli_epi16(high[b], 8));
        let o = o.add(b * BLOCK);
        _mm512_storeu_si512(o as *mut _, _mm512_permutex2var_epi16(low, first, high[b]));
        _mm512_storeu_si512(o.add(32) as *mut _, _mm512_permutex2var_epi16(low, second, high[b]));
    }
}

/// NEON: a 256-entry byte table is sixteen 16-byte registers, four `tbl` lookups of 64
/// entries each; a lookup gives 0 for an index past its 64, so the code less 0, 64, 128 and
/// 192 (wrapping) finds its entry in exactly one of the four, and the results are ORed. A
/// sub-vector's table is loaded once for the run's blocks; each 16 cells widen into two u16
/// sums of 8.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn sums_neon(codes: &[u8], stride: usize, nb: usize, tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    check(codes, stride, nb, tabs, g * gs * TABLE, g, gs, out);
    for k in 0..g {
        let t = tabs.as_ptr().add(k * gs * TABLE);
        let o = out.as_mut_ptr().add(k * nb * BLOCK);
        let c = codes.as_ptr();
        match nb {
            1 => sums_neon_blocks::<1>(c, stride, t, gs, o),
            2 => sums_neon_blocks::<2>(c, stride, t, gs, o),
            3 => sums_neon_blocks::<3>(c, stride, t, gs, o),
            _ => sums_neon_blocks::<4>(c, stride, t, gs, o),
        }
    }
}

/// `B` blocks of one byte table for [`sums_neon`]: codes of block b at `codes + b * stride`,
/// tables at `t` (`gs * 256` bytes), sums to `o` (`BLOCK` a block). The caller checked the
/// lengths.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[inline]
unsafe fn sums_neon_blocks<const B: usize>(codes: *const u8, stride: usize, t: *const u8, gs: usize, o: *mut u16) {
    use std::arch::aarch64::*;
    // per block, 16 cells at a time: cells 0-7 and 8-15 of each
    let mut acc = [[[vdupq_n_u16(0); 2]; BLOCK / 16]; B];
    let quarter = vdupq_n_u8(64);
    for i in 0..gs {
        let tb = t.add(i * TABLE);
        let tabs = [vld1q_u8_x4(tb), vld1q_u8_x4(tb.add(64)), vld1q_u8_x4(tb.add(128)), vld1q_u8_x4(tb.add(192))];
        for (b, acc) in acc.iter_mut().enumerate() {
            let cb = codes.add(b * stride + i * BLOCK);
            for (q, a) in acc.iter_mut().enumerate() {
                let c0 = vld1q_u8(cb.add(q * 16));
                let c1 = vsubq_u8(c0, quarter);
                let c2 = vsubq_u8(c1, quarter);
                let c3 = vsubq_u8(c2, quarter);
                let r = vorrq_u8(
                    vorrq_u8(vqtbl4q_u8(tabs[0], c0), vqtbl4q_u8(tabs[1], c1)),
                    vorrq_u8(vqtbl4q_u8(tabs[2], c2), vqtbl4q_u8(tabs[3], c3)),
                );
                a[0] = vaddw_u8(a[0], vget_low_u8(r));
                a[1] = vaddw_high_u8(a[1], r);
            }
        }
    }
    for (b, acc) in acc.iter().enumerate() {
        for (q, a) in acc.iter().enumerate() {
            vst1q_u16(o.add(b * BLOCK + q * 16), a[0]);
            vst1q_u16(o.add(b * BLOCK + q * 16 + 8), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// Planar tables (head, sub-vector, entry) moved into `kernel`'s layout.
    fn pack(kernel: Kernel, planar: &[u8], g: usize, gs: usize) -> Vec<u8> {
        let mut out = vec![0u8; kernel.table_bytes(g, gs)];
        for h in 0..g {
            for i in 0..gs {
                for c in 0..TABLE {
                    out[kernel.at(gs, h, i, c)] = planar[(h * gs + i) * TABLE + c];
                }
            }
        }
        out
    }

    #[test]
    fn simd_sums_equal_the_portable_ones() {
        let mut seed = 0x0fed_cba9_8765_4321u64;
        for (g, gs, m) in [(1, 64, 256), (3, 64, 256), (4, 32, 256), (2, 16, 256), (3, 64, 64), (5, 16, 200), (8, 32, 256), (7, 3, 256), (2, 1, 17), (6, 13, 100), (1, 256, 256), (11, 8, 256), (16, 4, 256)] {
            // blocks of other KV heads between this head's: a stride longer than its codes
            let stride = BLOCK * gs * 2 + 64;
            let codes: Vec<u8> = (0..(RUN - 1) * stride + BLOCK * gs).map(|_| (rng(&mut seed) % m as u64) as u8).collect();
            let planar: Vec<u8> = (0..g * gs * TABLE).map(|_| rng(&mut seed) as u8).collect();
            for nb in 1..=RUN {
                let mut a = vec![0u16; g * nb * BLOCK];
                sums_portable(&codes, stride, nb, &planar, g, gs, &mut a);
                for level in Level::ALL {
                    let kernel = Kernel::for_level(level);
                    let tabs = pack(kernel, &planar, g, gs);
                    let mut b = vec![1u16; g * nb * BLOCK];
                    sums(kernel, &codes, stride, nb, &tabs, g, gs, &mut b);
                    assert_eq!(a, b, "g {g} gs {gs} m {m} nb {nb} with {kernel:?}");
                    for (h, blk, cell) in (0..g).flat_map(|h| (0..nb).flat_map(move |blk| (0..BLOCK).map(move |cell| (h, blk, cell)))) {
                        let one = cell_sum(kernel, &tabs, gs, h, |i| codes[blk * stride + i * BLOCK + cell]);
                        assert_eq!(one, a[(h * nb + blk) * BLOCK + cell], "g {g} gs {gs} m {m} with {kernel:?}, block {blk} cell {cell} alone");
                    }
                }
            }
        }
        // the largest sums do not overflow, and codes with bit 7 set read the upper half
        let gs = MAX_SUBVECTORS;
        let codes: Vec<u8> = (0..BLOCK * gs).map(|k| if k % 2 == 0 { 0xff } else { 0x80 }).collect();
        let planar = vec![255u8; 2 * gs * TABLE];
        for level in Level::ALL {
            let kernel = Kernel::for_level(level);
            let mut out = vec![0u16; 2 * BLOCK];
            sums(kernel, &codes, BLOCK * gs, 1, &pack(kernel, &planar, 2, gs), 2, gs, &mut out);
            assert!(out.iter().all(|&s| s as usize == 255 * gs), "{kernel:?}");
        }
    }

    #[test]
    fn every_level_has_its_kernel() {
        assert_eq!(Kernel::for_level(Level::Portable), Kernel::Portable);
        for level in [Level::Neon, Level::Sse41, Level::Avx2, Level::Avx512] {
            let want = match level.usable() {
                Level::Portable => Kernel::Portable,
                Level::Neon => Kernel::Neon,
                Level::Sse41 => Kernel::Sse41,
                Level::Avx2 => Kernel::Avx2,
                Level::Avx512 => if has_vbmi() { Kernel::Vbmi } else { Kernel::Avx2 },
            };
            assert_eq!(Kernel::for_level(level), want);
        }
    }

    #[test]
    fn quantized_tables_score_within_the_rounding_bound() {
        let mut seed = 77u64;
        for (g, gs, m) in [(3, 64, 256), (2, 32, 64), (5, 16, 40)] {
            let t: Vec<f32> = (0..g * gs * m).map(|k| (rng(&mut seed) % 20001) as f32 / 1000.0 - 10.0 + (k / m) as f32 * 0.01).collect();
            let codes: Vec<u8> = (0..BLOCK * gs).map(|_| (rng(&mut seed) % m as u64) as u8).collect();
            for level in Level::ALL {
                let kernel = Kernel::for_level(level);
                let (mut q, mut bias, mut step) = (Vec::new(), Vec::new(), Vec::new());
                quantize_tables(kernel, &t, m, g, gs, &mut q, &mut bias, &mut step);
                assert_eq!(q.len(), kernel.table_bytes(PLANES * g, gs));
                let mut s = vec![0u16; PLANES * g * BLOCK];
                sums(kernel, &codes, BLOCK * gs, 1, &q, PLANES * g, gs, &mut s);
                for h in 0..g {
                    for cell in 0..BLOCK {
                        let exact: f32 = (0..gs).map(|i| t[(h * gs + i) * m + codes[i * BLOCK + cell] as usize]).sum();
                        let got = score(bias[h], step[h], s[2 * h * BLOCK + cell], s[(2 * h + 1) * BLOCK + cell]);
                        assert!((got - exact).abs() <= gs as f32 * step[h] / 2.0 * 1.001 + 1e-3, "{kernel:?} head {h} cell {cell}: {got} vs {exact}");
                    }
                }
            }
        }
    }

    #[test]
    fn products_quantize_as_their_tables_do() {
        let mut seed = 5u64;
        let val = |s: &mut u64| (rng(s) % 4001) as f32 / 1000.0 - 2.0;
        for (g, gs, m, n_books) in [(3, 64, 256, 1), (2, 16, 100, 16), (1, 5, 17, 1), (5, 8, 256, 8), (9, 3, 200, 1)] {
            let books: Vec<Vec<f32>> = (0..n_books).map(|_| (0..m).map(|_| val(&mut seed)).collect()).collect();
            let mut q: Vec<f32> = (0..g * gs).map(|_| val(&mut seed)).collect();
            q[1] = 0.0;
            q[2] = -0.0;
            let book = |i: usize| if n_books == 1 { 0 } else { i % n_books };
            let t: Vec<f32> = (0..g * gs).flat_map(|k| books[book(k % gs)].iter().map(|&c| q[k] * c).collect::<Vec<_>>()).collect();
            let refs: Vec<&[f32]> = books.iter().map(|b| &b[..]).collect();
            for level in Level::ALL {
                let kernel = Kernel::for_level(level);
                // outputs that held other tables before: every byte is written or zeroed
                let stale = |len: usize| vec![0xa5u8; len + 3];
                let len = kernel.table_bytes(PLANES * g, gs);
                let (mut a, mut ab, mut astep) = (stale(len), vec![1.0], vec![2.0]);
                quantize_tables(kernel, &t, m, g, gs, &mut a, &mut ab, &mut astep);
                let (mut b, mut bb, mut bstep) = (stale(len / 2), vec![1.0], vec![2.0]);
                quantize_products(kernel, &q, g, gs, &refs, book, &mut b, &mut bb, &mut bstep);
                assert!(a == b && ab == bb && astep == bstep, "g {g} gs {gs} m {m} with {kernel:?}");
                // the SIMD builds give the portable bytes (and the portable one zero padding)
                let (mut p, mut pb, mut pstep) = (Vec::new(), Vec::new(), Vec::new());
                quantize_products(Kernel::Portable, &q, g, gs, &refs, book, &mut p, &mut pb, &mut pstep);
                assert!(pb == bb && pstep == bstep);
                // the same entries in the kernel's layout, and 0 in every padding byte
                let mut want = vec![0u8; len];
                for k in 0..PLANES * g {
                    for i in 0..gs {
                        for c in 0..m {
                            want[kernel.at(gs, k, i, c)] = p[Kernel::Portable.at(gs, k, i, c)];
                        }
                    }
                }
                assert!(b == want, "g {g} gs {gs} m {m}: {kernel:?} tables are not the portable ones in its layout");
            }
        }
    }

    #[test]
    fn locate_covers_every_byte_once() {
        let (n, per) = (130, 6);
        let mut seen = vec![false; bytes_for(n, per)];
        for cell in 0..n {
            for i in 0..per {
                let b = locate(cell, i, per);
                assert!(!seen[b]);
                seen[b] = true;
            }
        }
        assert_eq!(seen.iter().filter(|&&s| s).count(), n * per);
    }
}
