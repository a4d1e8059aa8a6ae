//! Which instruction set the CPU kernels use, chosen once per process.
//!
//! The best level the CPU has is detected at first use; the environment variable
//! `HCATTN_SIMD` (`portable`, `neon`, `sse4.1`, `avx2` or `avx512`) can only lower it, so that
//! one binary can compare its kernels end to end (and a user can avoid AVX-512 where it slows
//! the clock).
//! Each kernel also has a `*_with(level, ..)` form for tests and micro-benchmarks; asked for a
//! level the CPU lacks, it runs the best one the CPU has below it.

use std::sync::OnceLock;

/// Kernel instruction sets, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// plain Rust, the reference every SIMD kernel is tested against
    Portable,
    /// Arm's Advanced SIMD (aarch64 only). It sits below the x86 levels in the order only so
    /// that asking an x86 CPU for it gives the portable kernels, and an Arm CPU for AVX2 gives
    /// it.
    Neon,
    /// SSSE3 and SSE4.1 (x86 without AVX2: CPUs before Haswell, and Pentium, Celeron and Atom
    /// parts up to 2021): byte shuffles for the 4-bit scan, 4-lane f32 vectors, f16
    /// converted by integer operations (no F16C)
    Sse41,
    /// AVX2 with FMA and F16C
    Avx2,
    /// AVX-512 F, BW and VL, on top of the AVX2 set
    Avx512,
}

impl Level {
    pub const ALL: [Level; 5] = [Level::Portable, Level::Neon, Level::Sse41, Level::Avx2, Level::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Neon => "neon",
            Level::Sse41 => "sse4.1",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// A level by its name, case and dots aside (`sse41` is `sse4.1`).
    pub fn parse(s: &str) -> Option<Level> {
        let bare = |n: &str| n.trim().to_ascii_lowercase().replace('.', "");
        Level::ALL.into_iter().find(|l| bare(l.name()) == bare(s))
    }

    /// The highest level this CPU runs.
    pub fn detected() -> Level {
        static DETECTED: OnceLock<Level> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                // the AVX2 level also runs the SSE4.1 kernels (the 4-bit scan for odd gs)
                if has!("avx2") && has!("fma") && has!("f16c") && has!("ssse3") && has!("sse4.1") {
                    if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                        return Level::Avx512;
                    }
                    return Level::Avx2;
                }
                if has!("ssse3") && has!("sse4.1") {
                    return Level::Sse41;
                }
            }
            #[cfg(target_arch = "aarch64")]
            if std::arch::is_aarch64_feature_detected!("neon") {
                return Level::Neon;
            }
            Level::Portable
        })
    }

    /// `self`, or the best level below it that the CPU runs.
    pub fn usable(self) -> Level {
        let l = self.min(Level::detected());
        // an x86 CPU has no Neon: the level below it is the portable one
        if l == Level::Neon && Level::detected() != Level::Neon {
            return Level::Portable;
        }
        l
    }
}

/// The level the kernels use: the detected one, lowered by `HCATTN_SIMD` when it is set.
pub fn level() -> Level {
    static CHOSEN: OnceLock<Level> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = Level::detected();
        match std::env::var("HCATTN_SIMD") {
            Err(_) => best,
            Ok(s) => match Level::parse(&s) {
                Some(l) => l.usable(),
                None => {
                    eprintln!("hcattn: HCATTN_SIMD={s:?} is not one of portable, neon, sse4.1, avx2, avx512; using {}", best.name());
                    best
                }
            },
        }
    })
}

/// f32 vectors for kernels written once for several widths ([`F32x16`] for AVX-512,
/// [`F32x8`] for AVX2, [`F32x4`] for SSE4.1 on x86 and for NEON on Arm). Each method is an
/// intrinsic or two, always inlined: a kernel generic over `Lanes` is itself inlined into a
/// `#[target_feature]` function of the matching level.
///
/// # Safety
/// Every method needs a CPU with the type's level (AVX-512 F/BW/VL, AVX2 with FMA, SSE4.1, or
/// NEON); `load`, `store` and `visible_or` read or write WIDTH elements at their pointers.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::missing_safety_doc)] // the trait's section covers every method
pub trait Lanes: Copy {
    /// f32 lanes in a vector
    const WIDTH: usize;
    /// vectors of a register block (4 rows of it and its inputs fit the register file)
    const BLOCK: usize;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(p: *mut f32, x: Self);
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn sub(a: Self, b: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    /// a * b + c
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    /// e^x with the polynomial and clamp of `attention::exp`
    unsafe fn exp(x: Self) -> Self;
    /// -inf lanes to 0, the others as they are
    unsafe fn neg_inf_to_zero(x: Self) -> Self;
    /// per lane i: `x` where a[i] <= at < b[i], else `other` (a and b: WIDTH i32s)
    unsafe fn visible_or(a: *const i32, b: *const i32, at: i32, x: Self, other: Self) -> Self;
    /// `dst[i] = src[i]` as f32, over the shorter of the two (exact). By default `half`'s
    /// slice conversion, which uses F16C or Arm's FP16 where the CPU has them.
    #[inline(always)]
    unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let n = src.len().min(dst.len());
        src[..n].convert_to_f32_slice(&mut dst[..n])
    }
}

/// Constants of the exp polynomial shared by the vector versions (see `attention::exp`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const EXP_POLY: [f32; 6] = [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// 16 f32 lanes (AVX-512).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct F32x16(std::arch::x86_64::__m512);

#[cfg(target_arch = "x86_64")]
impl Lanes for F32x16 {
    const WIDTH: usize = 16;
    const BLOCK: usize = 4;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        F32x16(std::arch::x86_64::_mm512_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        F32x16(std::arch::x86_64::_mm512_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, x: Self) {
        std::arch::x86_64::_mm512_storeu_ps(p, x.0)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        F32x16(std::arch::x86_64::_mm512_add_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        F32x16(std::arch::x86_64::_mm512_sub_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        F32x16(std::arch::x86_64::_mm512_mul_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        F32x16(std::arch::x86_64::_mm512_max_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        F32x16(std::arch::x86_64::_mm512_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn exp(x: Self) -> Self {
        use std::arch::x86_64::*;
        let x = _mm512_min_ps(_mm512_max_ps(x.0, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
        let n = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), _mm512_set1_ps(0.5));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(n);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in EXP_POLY {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        F32x16(_mm512_scalef_ps(p, n))
    }
    #[inline(always)]
    unsafe fn neg_inf_to_zero(x: Self) -> Self {
        use std::arch::x86_64::*;
        let m = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x.0, _mm512_set1_ps(f32::NEG_INFINITY));
        F32x16(_mm512_mask_mov_ps(x.0, m, _mm512_setzero_ps()))
    }
    #[inline(always)]
    unsafe fn visible_or(a: *const i32, b: *const i32, at: i32, x: Self, other: Self) -> Self {
        use std::arch::x86_64::*;
        let at = _mm512_set1_epi32(at);
        let vis =
            _mm512_cmple_epi32_mask(_mm512_loadu_si512(a as *const _), at) & _mm512_cmplt_epi32_mask(at, _mm512_loadu_si512(b as *const _));
        F32x16(_mm512_mask_mov_ps(other.0, vis, x.0))
    }
    /// F16C's conversion inline, 16 and then 8 at a time (see [`f16_to_f32_f16c`]).
    #[inline(always)]
    unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        let n = src.len().min(dst.len());
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(d.add(i), _mm512_cvtph_ps(_mm256_loadu_si256(s.add(i) as *const __m256i)));
            i += 16;
        }
        f16_to_f32_f16c(&src[i..n], &mut dst[i..n]);
    }
}

/// 8 f32 lanes (AVX2 with FMA).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct F32x8(std::arch::x86_64::__m256);

#[cfg(target_arch = "x86_64")]
impl Lanes for F32x8 {
    const WIDTH: usize = 8;
    const BLOCK: usize = 2;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        F32x8(std::arch::x86_64::_mm256_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        F32x8(std::arch::x86_64::_mm256_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, x: Self) {
        std::arch::x86_64::_mm256_storeu_ps(p, x.0)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        F32x8(std::arch::x86_64::_mm256_add_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        F32x8(std::arch::x86_64::_mm256_sub_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        F32x8(std::arch::x86_64::_mm256_mul_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        F32x8(std::arch::x86_64::_mm256_max_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        F32x8(std::arch::x86_64::_mm256_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn exp(x: Self) -> Self {
        use std::arch::x86_64::*;
        let x = _mm256_min_ps(_mm256_max_ps(x.0, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in EXP_POLY {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        // 2^n from the exponent bits: n is in [-126, 127] after the clamp
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
        F32x8(_mm256_mul_ps(p, two_n))
    }
    #[inline(always)]
    unsafe fn neg_inf_to_zero(x: Self) -> Self {
        use std::arch::x86_64::*;
        let m = _mm256_cmp_ps::<_CMP_EQ_OQ>(x.0, _mm256_set1_ps(f32::NEG_INFINITY));
        F32x8(_mm256_blendv_ps(x.0, _mm256_setzero_ps(), m))
    }
    #[inline(always)]
    unsafe fn visible_or(a: *const i32, b: *const i32, at: i32, x: Self, other: Self) -> Self {
        use std::arch::x86_64::*;
        let at = _mm256_set1_epi32(at);
        let (a, b) = (_mm256_loadu_si256(a as *const __m256i), _mm256_loadu_si256(b as *const __m256i));
        // a <= at and at < b
        let vis = _mm256_andnot_si256(_mm256_cmpgt_epi32(a, at), _mm256_cmpgt_epi32(b, at));
        F32x8(_mm256_blendv_ps(other.0, x.0, _mm256_castsi256_ps(vis)))
    }
    /// [`f16_to_f32_f16c`]: F16C's conversion inline. `half`'s slice conversion, used
    /// before, is a call per 8 values through a copy; it had 2.6% of a `perf` profile of
    /// `hcattn bench --depths 8192 --configs cpu25`. The prompt kernel's micro-benchmark
    /// moved within noise (AVX2, 3.52–5.22 ms against 3.60–5.06 ms, three runs each).
    #[inline(always)]
    unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
        f16_to_f32_f16c(src, dst)
    }
}

/// `dst[i] = src[i]` as f32 over the shorter of the two, 8 at a time with F16C's `vcvtph2ps`
/// (exact, as `f16::to_f32` is), the last few one at a time.
///
/// # Safety
/// The CPU has AVX and F16C; inlined only into functions that enable them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16_to_f32_f16c(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(_mm_loadu_si128(s.add(i) as *const __m128i)));
        i += 8;
    }
    for (d, s) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *d = s.to_f32();
    }
}

/// 4 f32 lanes (SSE4.1, for x86 CPUs without AVX2). There is no FMA at this level: `fmadd` is
/// a multiply and an add, two roundings, as the portable code does them.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct F32x4(std::arch::x86_64::__m128);

#[cfg(target_arch = "x86_64")]
impl Lanes for F32x4 {
    const WIDTH: usize = 4;
    // 16 registers, as AVX2 has
    const BLOCK: usize = 2;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        F32x4(std::arch::x86_64::_mm_set1_ps(x))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        F32x4(std::arch::x86_64::_mm_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, x: Self) {
        std::arch::x86_64::_mm_storeu_ps(p, x.0)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        F32x4(std::arch::x86_64::_mm_add_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        F32x4(std::arch::x86_64::_mm_sub_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        F32x4(std::arch::x86_64::_mm_mul_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        F32x4(std::arch::x86_64::_mm_max_ps(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        use std::arch::x86_64::*;
        F32x4(_mm_add_ps(_mm_mul_ps(a.0, b.0), c.0))
    }
    #[inline(always)]
    unsafe fn exp(x: Self) -> Self {
        use std::arch::x86_64::*;
        // the scalar exp's operations in its order (it has no FMA either), so the same bits
        let x = _mm_min_ps(_mm_max_ps(x.0, _mm_set1_ps(-87.0)), _mm_set1_ps(88.0));
        let n = _mm_floor_ps(_mm_add_ps(_mm_mul_ps(x, _mm_set1_ps(std::f32::consts::LOG2_E)), _mm_set1_ps(0.5)));
        let r = _mm_sub_ps(x, _mm_mul_ps(n, _mm_set1_ps(0.693_145_75)));
        let r = _mm_sub_ps(r, _mm_mul_ps(n, _mm_set1_ps(1.428_606_8e-6)));
        let mut p = _mm_set1_ps(1.0 / 720.0);
        for c in EXP_POLY {
            p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(c));
        }
        // 2^n from the exponent bits: n is in [-126, 127] after the clamp
        let two_n = _mm_castsi128_ps(_mm_slli_epi32::<23>(_mm_add_epi32(_mm_cvtps_epi32(n), _mm_set1_epi32(127))));
        F32x4(_mm_mul_ps(p, two_n))
    }
    #[inline(always)]
    unsafe fn neg_inf_to_zero(x: Self) -> Self {
        use std::arch::x86_64::*;
        let m = _mm_cmpeq_ps(x.0, _mm_set1_ps(f32::NEG_INFINITY));
        F32x4(_mm_andnot_ps(m, x.0))
    }
    #[inline(always)]
    unsafe fn visible_or(a: *const i32, b: *const i32, at: i32, x: Self, other: Self) -> Self {
        use std::arch::x86_64::*;
        let at = _mm_set1_epi32(at);
        let (a, b) = (_mm_loadu_si128(a as *const __m128i), _mm_loadu_si128(b as *const __m128i));
        // a <= at and at < b
        let vis = _mm_andnot_si128(_mm_cmpgt_epi32(a, at), _mm_cmpgt_epi32(b, at));
        F32x4(_mm_blendv_ps(other.0, x.0, _mm_castsi128_ps(vis)))
    }
    /// [`f16x8_to_f32_sse41`], so that this level never uses F16C (which an SSE4.1 CPU may
    /// lack, and `half` would then convert one value at a time).
    #[inline(always)]
    unsafe fn f16_to_f32(src: &[half::f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            let (lo, hi) = f16x8_to_f32_sse41(src.as_ptr().add(i));
            std::arch::x86_64::_mm_storeu_ps(dst.as_mut_ptr().add(i), lo);
            std::arch::x86_64::_mm_storeu_ps(dst.as_mut_ptr().add(i + 4), hi);
            i += 8;
        }
        for (d, s) in dst[i..n].iter_mut().zip(&src[i..n]) {
            *d = s.to_f32();
        }
    }
}

/// Eight f16 values at `p` as two vectors of four f32, for x86 CPUs without F16C: integer
/// operations on the bits, exact (as `f16::to_f32` is) for every finite value, infinities
/// included; a NaN stays a NaN.
///
/// # Safety
/// Reads 16 bytes at `p`; SSE4.1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
#[inline]
pub(crate) unsafe fn f16x8_to_f32_sse41(p: *const half::f16) -> (std::arch::x86_64::__m128, std::arch::x86_64::__m128) {
    use std::arch::x86_64::*;
    let h = _mm_loadu_si128(p as *const __m128i);
    let z = _mm_setzero_si128();
    (f16_bits_to_f32(_mm_unpacklo_epi16(h, z)), f16_bits_to_f32(_mm_unpackhi_epi16(h, z)))
}

/// Four f16 bit patterns (the low 16 bits of each 32-bit lane) as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,sse4.1")]
#[inline]
unsafe fn f16_bits_to_f32(h: std::arch::x86_64::__m128i) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    let sign = _mm_slli_epi32::<16>(_mm_and_si128(h, _mm_set1_epi32(0x8000)));
    // exponent and mantissa where an f32 has them; the exponent still biased by 15, not 127
    let em = _mm_slli_epi32::<13>(_mm_and_si128(h, _mm_set1_epi32(0x7fff)));
    let rebias = _mm_set1_epi32(112 << 23);
    // infinities and NaNs (exponent 31) go to exponent 255: 112 more
    let top = _mm_and_si128(_mm_cmpgt_epi32(em, _mm_set1_epi32(0x7bff << 13)), rebias);
    let normal = _mm_add_epi32(_mm_add_epi32(em, rebias), top);
    // zeros and subnormals (exponent 0) are m * 2^-24: 2^-14 * (1 + m / 2^10), less 2^-14,
    // exact by Sterbenz's lemma
    let tiny = _mm_cmplt_epi32(em, _mm_set1_epi32(0x0400 << 13));
    let sub = _mm_sub_ps(_mm_castsi128_ps(_mm_or_si128(em, _mm_set1_epi32(113 << 23))), _mm_set1_ps(1.0 / 16384.0));
    let r = _mm_blendv_ps(_mm_castsi128_ps(normal), sub, _mm_castsi128_ps(tiny));
    _mm_or_ps(r, _mm_castsi128_ps(sign))
}

/// 4 f32 lanes (NEON, which every aarch64 CPU has).
#[cfg(target_arch = "aarch64")]
#[derive(Clone, Copy)]
pub struct F32x4(std::arch::aarch64::float32x4_t);

#[cfg(target_arch = "aarch64")]
impl Lanes for F32x4 {
    const WIDTH: usize = 4;
    // 32 registers, as AVX-512 has: 4 keys by 4 vectors of accumulators and their inputs fit
    const BLOCK: usize = 4;
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        F32x4(std::arch::aarch64::vdupq_n_f32(x))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        F32x4(std::arch::aarch64::vld1q_f32(p))
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, x: Self) {
        std::arch::aarch64::vst1q_f32(p, x.0)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        F32x4(std::arch::aarch64::vaddq_f32(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn sub(a: Self, b: Self) -> Self {
        F32x4(std::arch::aarch64::vsubq_f32(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        F32x4(std::arch::aarch64::vmulq_f32(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        F32x4(std::arch::aarch64::vmaxq_f32(a.0, b.0))
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        // vfmaq_f32(c, a, b) = c + a * b, one rounding
        F32x4(std::arch::aarch64::vfmaq_f32(c.0, a.0, b.0))
    }
    #[inline(always)]
    unsafe fn exp(x: Self) -> Self {
        use std::arch::aarch64::*;
        let x = vminq_f32(vmaxq_f32(x.0, vdupq_n_f32(-87.0)), vdupq_n_f32(88.0));
        let n = vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5), x, vdupq_n_f32(std::f32::consts::LOG2_E)));
        // r = x - n * ln2, in two parts; vfmsq_f32(a, b, c) = a - b * c
        let r = vfmsq_f32(x, n, vdupq_n_f32(0.693_145_75));
        let r = vfmsq_f32(r, n, vdupq_n_f32(1.428_606_8e-6));
        let mut p = vdupq_n_f32(1.0 / 720.0);
        for c in EXP_POLY {
            p = vfmaq_f32(vdupq_n_f32(c), p, r);
        }
        // 2^n from the exponent bits: n is in [-126, 127] after the clamp
        let two_n = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127))));
        F32x4(vmulq_f32(p, two_n))
    }
    #[inline(always)]
    unsafe fn neg_inf_to_zero(x: Self) -> Self {
        use std::arch::aarch64::*;
        let m = vceqq_f32(x.0, vdupq_n_f32(f32::NEG_INFINITY));
        F32x4(vbslq_f32(m, vdupq_n_f32(0.0), x.0))
    }
    #[inline(always)]
    unsafe fn visible_or(a: *const i32, b: *const i32, at: i32, x: Self, other: Self) -> Self {
        use std::arch::aarch64::*;
        let at = vdupq_n_s32(at);
        // a <= at and at < b
        let vis = vandq_u32(vcleq_s32(vld1q_s32(a), at), vcltq_s32(at, vld1q_s32(b)));
        F32x4(vbslq_f32(vis, x.0, other.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_levels_never_exceed_the_cpu() {
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()), Some(l));
            assert!(l.usable() <= Level::detected());
            assert!(l.usable() <= l);
        }
        assert_eq!(Level::parse(" AVX2 "), Some(Level::Avx2));
        assert_eq!(Level::parse("sse"), None);
        assert_eq!(Level::parse("SSE41"), Some(Level::Sse41));
        assert!(level() <= Level::detected());
        // Neon is usable only where it is the detected level (Arm), never on x86
        assert_eq!(Level::Neon.usable() == Level::Neon, Level::detected() == Level::Neon);
        assert!(Level::Avx2.usable() != Level::Neon || Level::detected() == Level::Neon);
        // SSE4.1 is x86's: an Arm CPU asked for it runs NEON, an x86 one with it runs it
        #[cfg(target_arch = "aarch64")]
        assert_eq!(Level::Sse41.usable(), Level::detected());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(Level::Sse41.usable() == Level::Sse41, Level::detected() >= Level::Sse41);
    }

    /// Every one of the 65536 f16 bit patterns through the SSE4.1 conversion: the bits of
    /// `f16::to_f32` (exact) for every non-NaN, zeros, subnormals and infinities included, and
    /// a NaN for a NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sse41_f16_conversion_is_exact_for_every_value() {
        if Level::detected() < Level::Sse41 {
            return;
        }
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        for (i, eight) in all.chunks_exact(8).enumerate() {
            let mut got = [0f32; 8];
            // SAFETY: the CPU has SSE4.1 (checked above); `eight` holds 8 values.
            unsafe {
                let (lo, hi) = f16x8_to_f32_sse41(eight.as_ptr());
                std::arch::x86_64::_mm_storeu_ps(got.as_mut_ptr(), lo);
                std::arch::x86_64::_mm_storeu_ps(got.as_mut_ptr().add(4), hi);
            }
            for (k, (h, y)) in eight.iter().zip(got).enumerate() {
                let want = h.to_f32();
                if want.is_nan() {
                    assert!(y.is_nan(), "bits {:#06x}: {y}", i * 8 + k);
                } else {
                    assert_eq!(y.to_bits(), want.to_bits(), "bits {:#06x}: {y} vs {want}", i * 8 + k);
                }
            }
        }
    }

    /// Each width's slice conversion against `f16::to_f32`: every f16 bit pattern, in slices
    /// of every length from 0 to 40 (whole vectors and the tails after them), and a
    /// destination shorter than the source; the lanes past the shorter length are left alone.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn every_width_converts_f16_slices_exactly() {
        let all: Vec<half::f16> = (0..=u16::MAX).map(half::f16::from_bits).collect();
        fn check<L: Lanes>(all: &[half::f16]) {
            let same = |y: f32, h: half::f16| if h.is_nan() { y.is_nan() } else { y.to_bits() == h.to_f32().to_bits() };
            let mut dst = vec![-7.0f32; all.len()];
            // SAFETY: run only where the level was detected (below)
            unsafe { L::f16_to_f32(all, &mut dst) };
            for (h, y) in all.iter().zip(&dst) {
                assert!(same(*y, *h), "width {}: bits {:#06x} gave {y}", L::WIDTH, h.to_bits());
            }
            let mut at = 0;
            for len in (0..=40).cycle().take(400) {
                let src = &all[at..at + len];
                let mut dst = [-7.0f32; 41];
                let short = len.saturating_sub(3);
                // SAFETY: as above
                unsafe { L::f16_to_f32(src, &mut dst[..short]) };
                for (j, y) in dst.iter().enumerate() {
                    if j < short {
                        assert!(same(*y, src[j]), "width {}: length {len}, lane {j}: {y}", L::WIDTH);
                    } else {
                        assert_eq!(*y, -7.0, "width {}: length {len} wrote lane {j}", L::WIDTH);
                    }
                }
                at += len + 1;
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            if Level::detected() >= Level::Sse41 {
                check::<F32x4>(&all);
            }
            if Level::detected() >= Level::Avx2 {
                check::<F32x8>(&all);
            }
            if Level::detected() >= Level::Avx512 {
                check::<F32x16>(&all);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if Level::detected() == Level::Neon {
            check::<F32x4>(&all);
        }
    }

    /// Every aarch64 Linux CPU has NEON (the ABI requires it), so the NEON kernels' tests, run
    /// under qemu by `tests/neon/run.sh`, compare NEON with the portable code, not portable with
    /// itself.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn aarch64_detects_neon() {
        assert_eq!(Level::detected(), Level::Neon);
        assert_eq!(Level::Avx512.usable(), Level::Neon);
    }

    /// Every lane of each width's exp against the scalar one (the same polynomial, so equal up
    /// to the FMA's rounding; SSE4.1 has no FMA and gives its bits), -inf and the clamps
    /// included.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn vector_exp_matches_the_scalar_one() {
        let mut xs: Vec<f32> = (0..4000).map(|i| -90.0 + i as f32 * 0.0447).collect();
        xs.extend([f32::NEG_INFINITY, -87.0, 0.0, 88.0, 100.0, -1e-7, 1e-7]);
        while !xs.len().is_multiple_of(16) {
            xs.push(0.5);
        }
        // rel: the relative difference allowed (0 where the vector code does the scalar one's
        // operations, without FMA)
        fn check<L: Lanes>(xs: &[f32], rel: f32) {
            let mut got = vec![0f32; xs.len()];
            for (x, o) in xs
                .chunks_exact(L::WIDTH)
                .zip(got.chunks_exact_mut(L::WIDTH))
            {
                // SAFETY: run only where the level was detected (below)
                unsafe { L::store(o.as_mut_ptr(), L::exp(L::load(x.as_ptr()))) };
            }
            for (x, y) in xs.iter().zip(&got) {
                let want = crate::attention::exp(*x);
                assert!((y - want).abs() <= want * rel, "exp({x}): {y} vs {want}");
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            if Level::detected() >= Level::Sse41 {
                check::<F32x4>(&xs, 0.0);
            }
            if Level::detected() >= Level::Avx2 {
                check::<F32x8>(&xs, 1e-6);
            }
            if Level::detected() >= Level::Avx512 {
                check::<F32x16>(&xs, 1e-6);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if Level::detected() == Level::Neon {
            check::<F32x4>(&xs, 1e-6);
        }
    }
}
