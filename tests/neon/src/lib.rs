//! The main crate's algorithm core (every kernel and what the decode runs, none of the llama.cpp
//! side) with its unit tests, as a crate without a build script, so that it cross-builds for
//! aarch64 and its tests run under qemu-user: the NEON kernels against the portable ones, and
//! the rest as an Arm build compiles it. Module names match the main crate's, so that each
//! `crate::` path resolves the same in both.

// what only the backend (not included) reads
#![allow(dead_code)]

#[path = "../../../src/approx.rs"]
pub mod approx;
#[path = "../../../src/attention.rs"]
pub mod attention;
#[path = "../../../src/codebook.rs"]
pub mod codebook;
#[path = "../../../src/error.rs"]
pub mod error;
#[path = "../../../src/keys.rs"]
pub mod keys;
#[path = "../../../src/levels.rs"]
pub mod levels;
#[path = "../../../src/options.rs"]
pub mod options;
#[path = "../../../src/scan.rs"]
pub mod scan;
#[path = "../../../src/scan8.rs"]
pub mod scan8;
#[path = "../../../src/select.rs"]
pub mod select;
#[path = "../../../src/simd.rs"]
pub mod simd;
