//! Which instruction set the CPU kernels use, chosen once per process.
//!
//! The best level the CPU has is detected at first use; the environment variable
//! `HCATTN_SIMD` (`portable`, `avx2` or `avx512`) can only lower it, so that one binary can
//! compare its kernels end to end (and a user can avoid AVX-512 where it slows the clock).
//! Each kernel also has a `*_with(level, ..)` form for tests and micro-benchmarks; asked for a
//! level the CPU lacks, it runs the best one the CPU has below it.

use std::sync::OnceLock;

/// Kernel instruction sets, in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// plain Rust, the reference every SIMD kernel is tested against
    Portable,
    /// AVX2 with FMA and F16C
    Avx2,
    /// AVX-512 F, BW and VL, on top of the AVX2 set
    Avx512,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Portable, Level::Avx2, Level::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s.trim().to_ascii_lowercase())
    }

    /// The highest level this CPU runs.
    pub fn detected() -> Level {
        static DETECTED: OnceLock<Level> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") && has!("f16c") {
                    if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                        return Level::Avx512;
                    }
                    return Level::Avx2;
                }
            }
            Level::Portable
        })
    }

    /// `self`, or the best level below it that the CPU runs.
    pub fn usable(self) -> Level {
        self.min(Level::detected())
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
                    eprintln!("hcattn: HCATTN_SIMD={s:?} is not one of portable, avx2, avx512; using {}", best.name());
                    best
                }
            },
        }
    })
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
        assert!(level() <= Level::detected());
    }
}
