//! Fast table scans for 8-bit PQ codes (codebooks of 17 to 256 centroids).
//!
//! Codes are kept in blocks of [`BLOCK`] cells. Inside a block, each sub-vector position takes
//! 64 bytes, byte k the code of cell k. A KV head's sub-vectors are contiguous, so one scan
//! streams `64 * gs` bytes per block and head.
//!
//! As in [`crate::scan`], a query's f32 tables are quantized to u8 with one step per query head
//! (score = bias + step * sum, rounding error at most `gs * step / 2`) and u16 lanes sum them.
//! Each table has [`TABLE`] entries whatever the codebook size (the rest is padding), so that a
//! code indexes it directly. Where the tables lie depends on the kernel that reads them
//! ([`Kernel::at`]): one head after another for the portable and AVX-512 VBMI kernels (a
//! sub-vector's table is four 64-byte registers), four heads interleaved per entry for the AVX2
//! one (one 32-bit gather fetches an entry of four heads). Every kernel gives the same integers
//! as [`sums_portable`], the reference.

use crate::simd::Level;

/// Cells per code block.
pub const BLOCK: usize = 64;

/// Entries of one sub-vector's quantized table.
pub const TABLE: usize = 256;

/// Most sub-vectors per head the u16 sums hold without overflow (gs * 255 <= 65535).
pub const MAX_SUBVECTORS: usize = 256;

/// Query heads whose tables the AVX2 layout interleaves.
const INTERLEAVE: usize = 4;

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
    /// 32-bit gathers of four heads' entries at once
    Avx2,
    /// two-register byte permutes (`vpermi2b`), 64 cells per lookup
    Vbmi,
}

impl Kernel {
    /// The kernel for an instruction-set level, lowered to what the CPU has: AVX-512 without
    /// VBMI (before Ice Lake and Zen 4) runs the AVX2 kernel.
    pub fn for_level(level: Level) -> Kernel {
        match level.usable() {
            Level::Portable => Kernel::Portable,
            Level::Avx2 => Kernel::Avx2,
            Level::Avx512 if has_vbmi() => Kernel::Vbmi,
            Level::Avx512 => Kernel::Avx2,
        }
    }

    /// The kernel the process-wide level ([`crate::simd::level`]) gives.
    pub fn chosen() -> Kernel {
        Kernel::for_level(crate::simd::level())
    }

    /// Bytes of the quantized tables of `g` heads of `gs` sub-vectors.
    pub fn table_bytes(self, g: usize, gs: usize) -> usize {
        match self {
            Kernel::Avx2 => g.div_ceil(INTERLEAVE) * INTERLEAVE * gs * TABLE,
            _ => g * gs * TABLE,
        }
    }

    /// Index of head `h`'s entry for `code` of sub-vector `i` in the quantized tables.
    #[inline(always)]
    pub fn at(self, gs: usize, h: usize, i: usize, code: usize) -> usize {
        match self {
            Kernel::Avx2 => ((h / INTERLEAVE) * gs * TABLE + i * TABLE + code) * INTERLEAVE + h % INTERLEAVE,
            _ => (h * gs + i) * TABLE + code,
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

/// Quantize `g` heads' f32 tables (`gs` x `m` each, `m` <= [`TABLE`]) to u8 in `kernel`'s
/// layout: `out` gets `kernel.table_bytes(g, gs)` bytes, padding entries 0, and `bias` and
/// `step` one value per head, with table[h][i][c] ~ min_i + step[h] * q and bias[h] = sum of
/// min_i. The result does not depend on the kernel's instruction set, only its layout.
#[allow(clippy::too_many_arguments)]
pub fn quantize_tables(kernel: Kernel, t: &[f32], m: usize, g: usize, gs: usize, out: &mut Vec<u8>, bias: &mut Vec<f32>, step: &mut Vec<f32>) {
    assert!(m <= TABLE && gs <= MAX_SUBVECTORS && t.len() >= g * gs * m);
    out.clear();
    out.resize(kernel.table_bytes(g, gs), 0);
    bias.clear();
    step.clear();
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
        // SAFETY: a SIMD kernel comes only from `Kernel::for_level`, which checked that the
        // CPU has AVX2 at least.
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
    out.clear();
    out.resize(kernel.table_bytes(g, gs), 0);
    bias.clear();
    step.clear();
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable {
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
    let mut lo = [0.0f32; MAX_SUBVECTORS];
    for h in 0..g {
        let th = &t[h * gs * m..(h + 1) * gs * m];
        let mut b = 0.0f32;
        let mut range = 0.0f32;
        for (row, l) in th.chunks_exact(m).zip(lo.iter_mut()) {
            let (mn, mx) = min_max(row);
            *l = mn;
            b += mn;
            range = range.max(mx - mn);
        }
        let inv = push_step(range, b, bias, step);
        for (i, (row, &l)) in th.chunks_exact(m).zip(&lo).enumerate() {
            store_row(kernel, out, kernel.at(gs, h, i, 0), m, row.iter().copied(), l, inv);
        }
    }
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
    let mut lo = [0.0f32; MAX_SUBVECTORS];
    for h in 0..g {
        let qh = &q[h * gs..(h + 1) * gs];
        let mut b = 0.0f32;
        let mut range = 0.0f32;
        for (i, (&x, l)) in qh.iter().zip(lo.iter_mut()).enumerate() {
            let (cmin, cmax) = ext[book(i)];
            let (u, v) = (x * cmin, x * cmax);
            let (mn, mx) = if u < v { (u, v) } else { (v, u) };
            *l = mn;
            b += mn;
            range = range.max(mx - mn);
        }
        let inv = push_step(range, b, bias, step);
        for (i, (&x, &l)) in qh.iter().zip(&lo).enumerate() {
            store_row(kernel, out, kernel.at(gs, h, i, 0), m, books[book(i)].iter().map(|&c| x * c), l, inv);
        }
    }
}

/// The step that spreads the largest row range over 0..=255 (1 when there is none), pushed
/// with the bias; returns its inverse.
#[inline(always)]
fn push_step(range: f32, b: f32, bias: &mut Vec<f32>, step: &mut Vec<f32>) -> f32 {
    let s = if range > 0.0 && range.is_finite() { range / 255.0 } else { 1.0 };
    bias.push(b);
    step.push(s);
    1.0 / s
}

/// Quantize one row's values (less `lo`, times `inv`) to the entries of the table that starts
/// at `base` (its `m` entries one byte apart, or INTERLEAVE in the AVX2 layout). Rounded by
/// adding 2^23, whose float has a unit step, and keeping the low byte, so that the loop
/// vectorises (`round` is a libm call on the baseline target and a saturating cast to u8 goes
/// one lane at a time); the comparisons clamp to 0..=255, NaN to 0.
#[inline(always)]
fn store_row(kernel: Kernel, out: &mut [u8], base: usize, m: usize, row: impl Iterator<Item = f32>, lo: f32, inv: f32) {
    let q = |x: f32| {
        let y = (x - lo) * inv;
        let y = if y > 0.0 { y } else { 0.0 };
        let y = if y < 255.0 { y } else { 255.0 };
        (y + 8_388_608.0).to_bits() as u8
    };
    match kernel {
        Kernel::Avx2 => {
            for (o, x) in out[base..].iter_mut().step_by(INTERLEAVE).zip(row) {
                *o = q(x);
            }
        }
        _ => {
            for (o, x) in out[base..base + m].iter_mut().zip(row) {
                *o = q(x);
            }
        }
    }
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

/// u8-table sum of one cell for head `h`: `code(i)` is the cell's code of sub-vector i (the
/// scans give the same integer for the cell).
#[inline]
pub fn cell_sum(kernel: Kernel, tabs: &[u8], gs: usize, h: usize, code: impl Fn(usize) -> u8) -> u16 {
    (0..gs).map(|i| tabs[kernel.at(gs, h, i, code(i) as usize)] as u32).sum::<u32>() as u16
}

/// u8-table sums of the 64 cells of one block for `g` query heads: `codes` is the block's
/// `64 * gs` bytes of one KV head, `tabs` the heads' quantized tables in `kernel`'s layout,
/// `out[h * 64 + cell]`.
pub fn sums(kernel: Kernel, codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: a Vbmi or Avx2 kernel comes only from `Kernel::for_level`, which checked
        // that the CPU has its features; the lengths are checked inside.
        Kernel::Vbmi => return unsafe { sums_vbmi(codes, tabs, g, gs, out) },
        Kernel::Avx2 => return unsafe { sums_avx2(codes, tabs, g, gs, out) },
        Kernel::Portable => {}
    }
    sums_portable(codes, tabs, g, gs, out)
}

/// The reference for [`sums`] (tables in the portable layout).
pub fn sums_portable(codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    assert!(codes.len() >= BLOCK * gs && tabs.len() >= g * gs * TABLE && out.len() >= g * BLOCK && gs <= MAX_SUBVECTORS);
    for h in 0..g {
        let t = &tabs[h * gs * TABLE..(h + 1) * gs * TABLE];
        for cell in 0..BLOCK {
            let s: u32 = (0..gs).map(|i| t[i * TABLE + codes[i * BLOCK + cell] as usize] as u32).sum();
            out[h * BLOCK + cell] = s as u16;
        }
    }
}

/// 32 cells per pass over the sub-vectors, four 8-cell gathers per sub-vector, each fetching
/// an entry of up to four heads (a u32 whose byte k is head k's). The u16 halves of the
/// gathered lanes are summed whole (head 0 plus 256 times head 1, wrapping; heads 2 and 3
/// likewise) and by their high bytes (heads 1 and 3); heads 0 and 2 come out as whole minus 256
/// times high, exact because every true sum is below 2^16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sums_avx2(codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    use std::arch::x86_64::*;
    assert!(
        codes.len() >= BLOCK * gs && tabs.len() >= Kernel::Avx2.table_bytes(g, gs) && out.len() >= g * BLOCK && gs <= MAX_SUBVECTORS
    );
    for chunk in 0..g.div_ceil(INTERLEAVE) {
        let t = tabs.as_ptr().add(chunk * INTERLEAVE * gs * TABLE) as *const i32;
        let heads = (g - chunk * INTERLEAVE).min(INTERLEAVE);
        for half in 0..BLOCK / 32 {
            let mut whole = [_mm256_setzero_si256(); 4];
            let mut high = [_mm256_setzero_si256(); 4];
            for i in 0..gs {
                let cp = codes.as_ptr().add(i * BLOCK + half * 32);
                let c0 = _mm_loadu_si128(cp as *const __m128i);
                let c1 = _mm_loadu_si128(cp.add(16) as *const __m128i);
                let idx = [
                    _mm256_cvtepu8_epi32(c0),
                    _mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8)),
                    _mm256_cvtepu8_epi32(c1),
                    _mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8)),
                ];
                // entries are whole u32s: a gather never reads past the table
                let row = t.add(i * TABLE);
                for k in 0..4 {
                    let r = _mm256_i32gather_epi32::<4>(row, idx[k]);
                    whole[k] = _mm256_add_epi16(whole[k], r);
                    high[k] = _mm256_add_epi16(high[k], _mm256_srli_epi16(r, 8));
                }
            }
            for k in 0..4 {
                let low = _mm256_sub_epi16(whole[k], _mm256_slli_epi16(high[k], 8));
                let (mut l, mut hh) = ([0u32; 8], [0u32; 8]);
                _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, low);
                _mm256_storeu_si256(hh.as_mut_ptr() as *mut __m256i, high[k]);
                for (cell, (&l, &hh)) in l.iter().zip(&hh).enumerate() {
                    let per_head = [l as u16, hh as u16, (l >> 16) as u16, (hh >> 16) as u16];
                    let at = half * 32 + k * 8 + cell;
                    for (h, &s) in per_head.iter().enumerate().take(heads) {
                        out[(chunk * INTERLEAVE + h) * BLOCK + at] = s;
                    }
                }
            }
        }
    }
}

/// One code register (64 cells) per sub-vector, up to four query heads per pass over the codes.
/// A 256-entry table is four registers: `vpermi2b` looks the low 7 bits of each code up in the
/// first two and in the last two, and bit 7 picks one of the results. Sums as in the AVX2
/// kernel: u16 lanes summed whole and by high bytes (cells 2k and 2k + 1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2")]
unsafe fn sums_vbmi(codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    assert!(codes.len() >= BLOCK * gs && tabs.len() >= g * gs * TABLE && out.len() >= g * BLOCK && gs <= MAX_SUBVECTORS);
    let mut h = 0;
    while h < g {
        let t = tabs.as_ptr().add(h * gs * TABLE);
        let o = out.as_mut_ptr().add(h * BLOCK);
        match g - h {
            1 => sums_vbmi_heads::<1>(codes.as_ptr(), t, gs, o),
            2 => sums_vbmi_heads::<2>(codes.as_ptr(), t, gs, o),
            3 => sums_vbmi_heads::<3>(codes.as_ptr(), t, gs, o),
            _ => sums_vbmi_heads::<4>(codes.as_ptr(), t, gs, o),
        }
        h += 4;
    }
}

/// `G` heads of [`sums_vbmi`]: tables at `t` (`gs * 256` bytes a head), sums to `o` (`BLOCK`
/// a head). The caller checked the lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2")]
#[inline]
unsafe fn sums_vbmi_heads<const G: usize>(codes: *const u8, t: *const u8, gs: usize, o: *mut u16) {
    use std::arch::x86_64::*;
    let mut whole = [_mm512_setzero_si512(); G];
    let mut high = [_mm512_setzero_si512(); G];
    for i in 0..gs {
        let c = _mm512_loadu_si512(codes.add(i * BLOCK) as *const _);
        let top = _mm512_movepi8_mask(c);
        for h in 0..G {
            let tb = t.add((h * gs + i) * TABLE);
            let t0 = _mm512_loadu_si512(tb as *const _);
            let t1 = _mm512_loadu_si512(tb.add(64) as *const _);
            let t2 = _mm512_loadu_si512(tb.add(128) as *const _);
            let t3 = _mm512_loadu_si512(tb.add(192) as *const _);
            let r = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(t0, c, t1), _mm512_permutex2var_epi8(t2, c, t3));
            whole[h] = _mm512_add_epi16(whole[h], r);
            high[h] = _mm512_add_epi16(high[h], _mm512_srli_epi16(r, 8));
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
    for h in 0..G {
        let low = _mm512_sub_epi16(whole[h], _mm512_slli_epi16(high[h], 8));
        let o = o.add(h * BLOCK);
        _mm512_storeu_si512(o as *mut _, _mm512_permutex2var_epi16(low, first, high[h]));
        _mm512_storeu_si512(o.add(32) as *mut _, _mm512_permutex2var_epi16(low, second, high[h]));
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
        for (g, gs, m) in [(1, 64, 256), (3, 64, 256), (4, 32, 256), (2, 16, 256), (3, 64, 64), (5, 16, 200), (8, 32, 256), (7, 3, 256), (2, 1, 17), (6, 13, 100), (1, 256, 256)] {
            let codes: Vec<u8> = (0..BLOCK * gs).map(|_| (rng(&mut seed) % m as u64) as u8).collect();
            let planar: Vec<u8> = (0..g * gs * TABLE).map(|_| rng(&mut seed) as u8).collect();
            let mut a = vec![0u16; g * BLOCK];
            sums_portable(&codes, &planar, g, gs, &mut a);
            for level in Level::ALL {
                let kernel = Kernel::for_level(level);
                let tabs = pack(kernel, &planar, g, gs);
                let mut b = vec![1u16; g * BLOCK];
                sums(kernel, &codes, &tabs, g, gs, &mut b);
                assert_eq!(a, b, "g {g} gs {gs} m {m} with {kernel:?}");
                for h in 0..g {
                    for cell in 0..BLOCK {
                        let one = cell_sum(kernel, &tabs, gs, h, |i| codes[i * BLOCK + cell]);
                        assert_eq!(one, a[h * BLOCK + cell], "g {g} gs {gs} m {m} with {kernel:?}, cell {cell} alone");
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
            sums(kernel, &codes, &pack(kernel, &planar, 2, gs), 2, gs, &mut out);
            assert!(out.iter().all(|&s| s as usize == 255 * gs), "{kernel:?}");
        }
    }

    #[test]
    fn every_level_has_its_kernel() {
        assert_eq!(Kernel::for_level(Level::Portable), Kernel::Portable);
        for level in [Level::Avx2, Level::Avx512] {
            let want = match level.usable() {
                Level::Portable => Kernel::Portable,
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
                assert_eq!(q.len(), kernel.table_bytes(g, gs));
                let mut s = vec![0u16; g * BLOCK];
                sums(kernel, &codes, &q, g, gs, &mut s);
                for h in 0..g {
                    for cell in 0..BLOCK {
                        let exact: f32 = (0..gs).map(|i| t[(h * gs + i) * m + codes[i * BLOCK + cell] as usize]).sum();
                        let got = bias[h] + step[h] * s[h * BLOCK + cell] as f32;
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
        for (g, gs, m, n_books) in [(3, 64, 256, 1), (2, 16, 100, 16), (1, 5, 17, 1)] {
            let books: Vec<Vec<f32>> = (0..n_books).map(|_| (0..m).map(|_| val(&mut seed)).collect()).collect();
            let mut q: Vec<f32> = (0..g * gs).map(|_| val(&mut seed)).collect();
            q[1] = 0.0;
            q[2] = -0.0;
            let book = |i: usize| if n_books == 1 { 0 } else { i % n_books };
            let t: Vec<f32> = (0..g * gs).flat_map(|k| books[book(k % gs)].iter().map(|&c| q[k] * c).collect::<Vec<_>>()).collect();
            let refs: Vec<&[f32]> = books.iter().map(|b| &b[..]).collect();
            for level in Level::ALL {
                let kernel = Kernel::for_level(level);
                let (mut a, mut ab, mut astep) = (Vec::new(), Vec::new(), Vec::new());
                quantize_tables(kernel, &t, m, g, gs, &mut a, &mut ab, &mut astep);
                let (mut b, mut bb, mut bstep) = (Vec::new(), Vec::new(), Vec::new());
                quantize_products(kernel, &q, g, gs, &refs, book, &mut b, &mut bb, &mut bstep);
                assert!(a == b && ab == bb && astep == bstep, "g {g} gs {gs} m {m} with {kernel:?}");
                if kernel == Kernel::Portable {
                    continue;
                }
                // the SIMD builds give the portable bytes
                let (mut p, mut pb, mut pstep) = (Vec::new(), Vec::new(), Vec::new());
                quantize_products(Kernel::Portable, &q, g, gs, &refs, book, &mut p, &mut pb, &mut pstep);
                assert!(pb == bb && pstep == bstep);
                for h in 0..g {
                    for i in 0..gs {
                        for c in 0..m {
                            assert_eq!(p[Kernel::Portable.at(gs, h, i, c)], b[kernel.at(gs, h, i, c)]);
                        }
                    }
                }
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
