//! Fast table scans for 4-bit PQ codes (16-centroid codebooks).
//!
//! Codes are kept in blocks of [`BLOCK`] cells. Inside a block, each sub-vector position takes
//! 16 bytes: byte k holds the code of cell k in its low nibble and of cell k + 16 in its high
//! nibble. A KV head's sub-vectors are contiguous, so one scan streams `16 * gs` bytes per
//! block and head.
//!
//! A query's f32 tables (one 16-entry table per sub-vector) are quantized to u8 with one step
//! per query head, so that a byte shuffle looks up 32 codes at once and u16 lanes sum them:
//! score = bias + step * sum. The rounding error of a score is at most `gs * step / 2`, with
//! step = (largest table range) / 255. [`sums_portable`] is the reference the SIMD versions
//! (SSE4.1, AVX2, AVX-512, NEON) are tested against; all give the same integers.

use crate::simd::Level;

/// Cells per code block.
pub const BLOCK: usize = 32;

/// Most sub-vectors per head the u16 sums hold without overflow (gs * 255 <= 65535).
pub const MAX_SUBVECTORS: usize = 256;

/// Byte offset and nibble shift of code `i` (of `per` per cell) of `cell`.
#[inline(always)]
pub fn locate(cell: usize, i: usize, per: usize) -> (usize, u32) {
    ((cell / BLOCK) * per * 16 + i * 16 + cell % 16, if cell % BLOCK >= 16 { 4 } else { 0 })
}

/// Bytes that hold the codes of `n_cells` cells of `per` codes each.
pub fn bytes_for(n_cells: usize, per: usize) -> usize {
    n_cells.div_ceil(BLOCK) * per * 16
}

/// Quantize one head's f32 tables (`gs` x 16) to u8: returns (bias, step) with
/// table[i][c] ~ min_i + step * q[i][c] and bias = sum of min_i.
pub fn quantize_tables(t: &[f32], q: &mut [u8]) -> (f32, f32) {
    let mut bias = 0.0f32;
    let mut range = 0.0f32;
    for row in t.chunks_exact(16) {
        let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        bias += lo;
        range = range.max(hi - lo);
    }
    let step = if range > 0.0 && range.is_finite() { range / 255.0 } else { 1.0 };
    let inv = 1.0 / step;
    for (row, qrow) in t.chunks_exact(16).zip(q.chunks_exact_mut(16)) {
        let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
        for (x, o) in row.iter().zip(qrow) {
            *o = ((x - lo) * inv).round().clamp(0.0, 255.0) as u8;
        }
    }
    (bias, step)
}

/// u8-table sums of the 32 cells of one block for `g` query heads: `codes` is the block's
/// `16 * gs` bytes of one KV head, `tabs` the g heads' quantized tables (`gs * 16` each),
/// `out[h * 32 + cell]`.
#[inline]
pub fn sums(codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    sums_with(crate::simd::level(), codes, tabs, g, gs, out)
}

/// [`sums`] at a chosen instruction-set level (lowered to what the CPU and `gs` allow).
pub fn sums_with(level: Level, codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    {
        let level = level.usable();
        if level >= Level::Avx512 && gs.is_multiple_of(4) {
            // SAFETY: AVX-512 F/BW is present (`usable` checked it); lengths are checked inside.
            return unsafe { sums_avx512(codes, tabs, g, gs, out) };
        }
        if level >= Level::Avx2 && gs.is_multiple_of(2) {
            // SAFETY: AVX2 is present (`usable` checked it); the lengths are checked inside.
            return unsafe { sums_avx2(codes, tabs, g, gs, out) };
        }
        // also AVX2 for odd gs, and AVX-512 for gs not a multiple of 4
        if level >= Level::Sse41 {
            // SAFETY: SSSE3 and SSE4.1 are present (`usable` checked them: every level from
            // Sse41 up has them); the lengths are checked inside.
            return unsafe { sums_sse41(codes, tabs, g, gs, out) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    if level.usable() == Level::Neon {
        // SAFETY: the CPU has NEON (`usable` checked it); the lengths are checked inside.
        return unsafe { sums_neon(codes, tabs, g, gs, out) };
    }
    let _ = level;
    sums_portable(codes, tabs, g, gs, out)
}

/// The reference for [`sums`].
pub fn sums_portable(codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    assert!(codes.len() >= 16 * gs && tabs.len() >= g * gs * 16 && out.len() >= g * BLOCK && gs <= MAX_SUBVECTORS);
    for h in 0..g {
        let t = &tabs[h * gs * 16..(h + 1) * gs * 16];
        for cell in 0..BLOCK {
            let shift = if cell >= 16 { 4 } else { 0 };
            let mut s = 0u32;
            for i in 0..gs {
                let code = (codes[i * 16 + cell % 16] >> shift) & 0x0f;
                s += t[i * 16 + code as usize] as u32;
            }
            out[h * BLOCK + cell] = s as u16;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sums_avx2(codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    use std::arch::x86_64::*;
    assert!(codes.len() >= 16 * gs && tabs.len() >= g * gs * 16 && out.len() >= g * BLOCK && gs <= MAX_SUBVECTORS && gs.is_multiple_of(2));
    let nib = _mm256_set1_epi8(0x0f);
    let low_byte = _mm256_set1_epi16(0x00ff);
    for h in 0..g {
        let t = tabs.as_ptr().add(h * gs * 16);
        // u16 lanes: cells 2k / 2k+1 of the low nibbles, 16+2k / 17+2k of the high ones; the
        // two 128-bit halves hold even and odd sub-vectors and are added at the end
        let (mut a0, mut a1, mut a2, mut a3) = (_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256());
        for pair in 0..gs / 2 {
            let c = _mm256_loadu_si256(codes.as_ptr().add(pair * 32) as *const __m256i);
            let lo = _mm256_and_si256(c, nib);
            let hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), nib);
            let tab = _mm256_loadu_si256(t.add(pair * 32) as *const __m256i);
            let rl = _mm256_shuffle_epi8(tab, lo);
            let rh = _mm256_shuffle_epi8(tab, hi);
            a0 = _mm256_add_epi16(a0, _mm256_and_si256(rl, low_byte));
            a1 = _mm256_add_epi16(a1, _mm256_srli_epi16(rl, 8));
            a2 = _mm256_add_epi16(a2, _mm256_and_si256(rh, low_byte));
            a3 = _mm256_add_epi16(a3, _mm256_srli_epi16(rh, 8));
        }
        let fold = |a: __m256i| _mm_add_epi16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        let (s0, s1, s2, s3) = (fold(a0), fold(a1), fold(a2), fold(a3));
        let o = out.as_mut_ptr().add(h * BLOCK) as *mut __m128i;
        _mm_storeu_si128(o, _mm_unpacklo_epi16(s0, s1));
        _mm_storeu_si128(o.add(1), _mm_unpackhi_epi16(s0, s1));
        _mm_storeu_si128(o.add(2), _mm_unpacklo_epi16(s2, s3));
        _mm_storeu_si128(o.add(3), _mm_unpackhi_epi16(s2, s3));
    }
}

/// Four sub-vectors (one per 128-bit lane) per step, up to four query heads per pass over the
/// codes so that their nibbles are split once. Each shuffle result is added whole as u16
/// lanes (low byte plus 256 times the high byte, wrapping) and its high bytes on their own;
/// the low bytes' sum is recovered at the end as whole minus 256 times high. That is exact
/// because every true sum is below 2^16 (`gs * 255 <= 65535`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn sums_avx512(codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    assert!(codes.len() >= 16 * gs && tabs.len() >= g * gs * 16 && out.len() >= g * BLOCK && gs <= MAX_SUBVECTORS && gs.is_multiple_of(4));
    let mut h = 0;
    while h < g {
        let t = tabs.as_ptr().add(h * gs * 16);
        let o = out.as_mut_ptr().add(h * BLOCK);
        match g - h {
            1 => sums_avx512_heads::<1>(codes.as_ptr(), t, gs, o),
            2 => sums_avx512_heads::<2>(codes.as_ptr(), t, gs, o),
            3 => sums_avx512_heads::<3>(codes.as_ptr(), t, gs, o),
            _ => sums_avx512_heads::<4>(codes.as_ptr(), t, gs, o),
        }
        h += 4;
    }
}

/// `G` heads of [`sums_avx512`]: tables at `t` (`gs * 16` bytes a head), sums to `o`
/// (`BLOCK` a head). The caller checked the lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
unsafe fn sums_avx512_heads<const G: usize>(codes: *const u8, t: *const u8, gs: usize, o: *mut u16) {
    use std::arch::x86_64::*;
    let nib = _mm512_set1_epi8(0x0f);
    // per head: whole and high-byte sums of the low nibbles' lookups, then of the high ones'
    let mut acc = [[_mm512_setzero_si512(); 4]; G];
    for quad in 0..gs / 4 {
        let c = _mm512_loadu_si512(codes.add(quad * 64) as *const _);
        let lo = _mm512_and_si512(c, nib);
        let hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), nib);
        for (h, a) in acc.iter_mut().enumerate() {
            let tab = _mm512_loadu_si512(t.add(h * gs * 16 + quad * 64) as *const _);
            let rl = _mm512_shuffle_epi8(tab, lo);
            let rh = _mm512_shuffle_epi8(tab, hi);
            a[0] = _mm512_add_epi16(a[0], rl);
            a[1] = _mm512_add_epi16(a[1], _mm512_srli_epi16(rl, 8));
            a[2] = _mm512_add_epi16(a[2], rh);
            a[3] = _mm512_add_epi16(a[3], _mm512_srli_epi16(rh, 8));
        }
    }
    let fold = |a: __m512i| {
        let x = _mm256_add_epi16(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
        _mm_add_epi16(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1))
    };
    for (h, a) in acc.iter().enumerate() {
        let (w0, s1, w2, s3) = (fold(a[0]), fold(a[1]), fold(a[2]), fold(a[3]));
        let s0 = _mm_sub_epi16(w0, _mm_slli_epi16(s1, 8));
        let s2 = _mm_sub_epi16(w2, _mm_slli_epi16(s3, 8));
        let o = o.add(h * BLOCK) as *mut __m128i;
        _mm_storeu_si128(o, _mm_unpacklo_epi16(s0, s1));
        _mm_storeu_si128(o.add(1), _mm_unpackhi_epi16(s0, s1));
        _mm_storeu_si128(o.add(2), _mm_unpacklo_epi16(s2, s3));
        _mm_storeu_si128(o.add(3), _mm_unpackhi_epi16(s2, s3));
    }
}

/// SSSE3/SSE4.1: `pshufb` looks up the 16 cells of a sub-vector's low nibbles, then of its high
/// ones, in one 16-byte table each. Sums as in [`sums_avx512_heads`]: each lookup added whole as
/// u16 lanes and its high bytes on their own, the low bytes' sums recovered at the end. Up to
/// [`SSE_HEADS`] query heads a pass over the codes, so that their nibbles are split once. Any
/// `gs` up to [`MAX_SUBVECTORS`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
unsafe fn sums_sse41(codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    assert!(codes.len() >= 16 * gs && tabs.len() >= g * gs * 16 && out.len() >= g * BLOCK && gs <= MAX_SUBVECTORS);
    let mut h = 0;
    while h < g {
        let t = tabs.as_ptr().add(h * gs * 16);
        let o = out.as_mut_ptr().add(h * BLOCK);
        match g - h {
            1 => sums_sse41_heads::<1>(codes.as_ptr(), t, gs, o),
            2 => sums_sse41_heads::<2>(codes.as_ptr(), t, gs, o),
            _ => sums_sse41_heads::<SSE_HEADS>(codes.as_ptr(), t, gs, o),
        }
        h += SSE_HEADS;
    }
}

/// Query heads a pass of [`sums_sse41`]: 4 sums a head, so 3 heads' 12 sums, the nibble mask,
/// the two nibble vectors and a table take the 16 registers (AVX-512 and NEON, with 32, take
/// 4 heads).
#[cfg(target_arch = "x86_64")]
const SSE_HEADS: usize = 3;

/// `G` heads of [`sums_sse41`]: tables at `t` (`gs * 16` bytes a head), sums to `o` (`BLOCK` a
/// head). The caller checked the lengths.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
#[inline]
unsafe fn sums_sse41_heads<const G: usize>(codes: *const u8, t: *const u8, gs: usize, o: *mut u16) {
    use std::arch::x86_64::*;
    let nib = _mm_set1_epi8(0x0f);
    // per head: whole and high-byte sums of the low nibbles' lookups, then of the high ones'
    let mut acc = [[_mm_setzero_si128(); 4]; G];
    for i in 0..gs {
        let c = _mm_loadu_si128(codes.add(i * 16) as *const __m128i);
        let lo = _mm_and_si128(c, nib);
        let hi = _mm_and_si128(_mm_srli_epi16(c, 4), nib);
        for (h, a) in acc.iter_mut().enumerate() {
            let tab = _mm_loadu_si128(t.add(h * gs * 16 + i * 16) as *const __m128i);
            let rl = _mm_shuffle_epi8(tab, lo);
            let rh = _mm_shuffle_epi8(tab, hi);
            a[0] = _mm_add_epi16(a[0], rl);
            a[1] = _mm_add_epi16(a[1], _mm_srli_epi16(rl, 8));
            a[2] = _mm_add_epi16(a[2], rh);
            a[3] = _mm_add_epi16(a[3], _mm_srli_epi16(rh, 8));
        }
    }
    for (h, a) in acc.iter().enumerate() {
        // even cells: whole less 256 times odd; then interleaved back into cell order
        let (s1, s3) = (a[1], a[3]);
        let s0 = _mm_sub_epi16(a[0], _mm_slli_epi16(s1, 8));
        let s2 = _mm_sub_epi16(a[2], _mm_slli_epi16(s3, 8));
        let o = o.add(h * BLOCK) as *mut __m128i;
        _mm_storeu_si128(o, _mm_unpacklo_epi16(s0, s1));
        _mm_storeu_si128(o.add(1), _mm_unpackhi_epi16(s0, s1));
        _mm_storeu_si128(o.add(2), _mm_unpacklo_epi16(s2, s3));
        _mm_storeu_si128(o.add(3), _mm_unpackhi_epi16(s2, s3));
    }
}

/// NEON: `tbl` looks up the 16 cells of a sub-vector's low nibbles, then of its high ones, in
/// one 16-byte table each; the bytes widen into u16 sums of 8 cells. Up to four query heads
/// take each pass over the codes, so that their nibbles are split once (4 heads use 16 of the
/// 32 vector registers for sums). Any `gs` up to [`MAX_SUBVECTORS`].
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn sums_neon(codes: &[u8], tabs: &[u8], g: usize, gs: usize, out: &mut [u16]) {
    assert!(codes.len() >= 16 * gs && tabs.len() >= g * gs * 16 && out.len() >= g * BLOCK && gs <= MAX_SUBVECTORS);
    let mut h = 0;
    while h < g {
        let t = tabs.as_ptr().add(h * gs * 16);
        let o = out.as_mut_ptr().add(h * BLOCK);
        match g - h {
            1 => sums_neon_heads::<1>(codes.as_ptr(), t, gs, o),
            2 => sums_neon_heads::<2>(codes.as_ptr(), t, gs, o),
            3 => sums_neon_heads::<3>(codes.as_ptr(), t, gs, o),
            _ => sums_neon_heads::<4>(codes.as_ptr(), t, gs, o),
        }
        h += 4;
    }
}

/// `G` heads of [`sums_neon`]: tables at `t` (`gs * 16` bytes a head), sums to `o` (`BLOCK` a
/// head). The caller checked the lengths.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[inline]
unsafe fn sums_neon_heads<const G: usize>(codes: *const u8, t: *const u8, gs: usize, o: *mut u16) {
    use std::arch::aarch64::*;
    let nib = vdupq_n_u8(0x0f);
    // per head: cells 0-7, 8-15 (low nibbles), 16-23, 24-31 (high nibbles)
    let mut acc = [[vdupq_n_u16(0); 4]; G];
    for i in 0..gs {
        let c = vld1q_u8(codes.add(i * 16));
        let lo = vandq_u8(c, nib);
        let hi = vshrq_n_u8::<4>(c);
        for (h, a) in acc.iter_mut().enumerate() {
            let tab = vld1q_u8(t.add(h * gs * 16 + i * 16));
            let rl = vqtbl1q_u8(tab, lo);
            let rh = vqtbl1q_u8(tab, hi);
            a[0] = vaddw_u8(a[0], vget_low_u8(rl));
            a[1] = vaddw_high_u8(a[1], rl);
            a[2] = vaddw_u8(a[2], vget_low_u8(rh));
            a[3] = vaddw_high_u8(a[3], rh);
        }
    }
    for (h, a) in acc.iter().enumerate() {
        for (k, v) in a.iter().enumerate() {
            vst1q_u16(o.add(h * BLOCK + k * 8), *v);
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

    #[test]
    fn simd_sums_equal_the_portable_ones() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        for (g, gs) in [(1, 2), (3, 64), (4, 32), (2, 128), (1, 256), (5, 4), (7, 12), (8, 64), (2, 6), (3, 5), (6, 1)] {
            let codes: Vec<u8> = (0..16 * gs).map(|_| rng(&mut seed) as u8).collect();
            let tabs: Vec<u8> = (0..g * gs * 16).map(|_| rng(&mut seed) as u8).collect();
            let mut a = vec![0u16; g * BLOCK];
            sums_portable(&codes, &tabs, g, gs, &mut a);
            for level in Level::ALL {
                let mut b = vec![1u16; g * BLOCK];
                sums_with(level, &codes, &tabs, g, gs, &mut b);
                assert_eq!(a, b, "g {g} gs {gs} at {:?}", level.usable());
            }
        }
        // the largest sums do not overflow
        let gs = MAX_SUBVECTORS;
        let (codes, tabs) = (vec![0xffu8; 16 * gs], vec![255u8; gs * 16]);
        for level in Level::ALL {
            let mut out = vec![0u16; BLOCK];
            sums_with(level, &codes, &tabs, 1, gs, &mut out);
            assert!(out.iter().all(|&s| s as usize == 255 * gs), "{level:?}");
        }
    }

    #[test]
    fn quantized_tables_score_within_the_rounding_bound() {
        let mut seed = 99u64;
        let gs = 64;
        let t: Vec<f32> = (0..gs * 16).map(|i| (rng(&mut seed) % 20001) as f32 / 1000.0 - 10.0 + (i / 16) as f32 * 0.01).collect();
        let mut q = vec![0u8; gs * 16];
        let (bias, step) = quantize_tables(&t, &mut q);
        let codes: Vec<u8> = (0..16 * gs).map(|_| rng(&mut seed) as u8).collect();
        let mut s = vec![0u16; BLOCK];
        sums_portable(&codes, &q, 1, gs, &mut s);
        for cell in 0..BLOCK {
            let exact: f32 = (0..gs)
                .map(|i| {
                    let (byte, shift) = locate(cell, i, gs);
                    t[i * 16 + ((codes[byte] >> shift) & 0x0f) as usize]
                })
                .sum();
            let got = bias + step * s[cell] as f32;
            assert!((got - exact).abs() <= gs as f32 * step / 2.0 * 1.001 + 1e-4, "cell {cell}: {got} vs {exact}");
        }
    }
}
