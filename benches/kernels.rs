//! Micro-benchmarks of the decode kernels (and the prompt's exact block kernel), at the sizes
//! of one SmolLM2-135M layer (3 KV heads of 64 dims, 3 query heads per KV head) and 8192
//! visible tokens:
//! `cargo bench --bench kernels` (criterion; `-- --quick` for a short run). Kernels with SIMD
//! versions run at each instruction-set level; a level the CPU lacks is skipped.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use half::f16;

use hcattn::attention::{exact_block_with, BlockScratch, Scale};
use hcattn::approx::{softmax, softmax_with, union_sum_with, value_sums, weighted_sum_with, Pick};
use hcattn::levels::{softmax_in_chunks, ChunkScratch, HeadLevels};
use hcattn::codebook::{Codebook, KMeans};
use hcattn::keys::{KeyStore, Prep};
use hcattn::options::{KeyCodec, Scope};
use hcattn::scan;
use hcattn::scan8::{self, Kernel};
use hcattn::select::{Histogram, TopP};
use hcattn::simd::Level;

const N: usize = 8192;
const DK: usize = 64;
const G: usize = 3;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Attention-like probabilities: a few strong tokens over a long tail.
fn probabilities(r: &mut Rng) -> Vec<f32> {
    let mut l: Vec<f32> = (0..N).map(|_| r.next() * 6.0 + if r.next() < 0.01 { 6.0 } else { 0.0 }).collect();
    softmax(&mut l, None);
    l
}

/// The levels this CPU runs.
fn levels() -> impl Iterator<Item = Level> {
    Level::ALL.into_iter().filter(|l| l.usable() == *l)
}

fn kernels(c: &mut Criterion) {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);

    // 4-bit table scan: one KV head's codes of N cells for its G query heads
    let gs = DK; // pq_dim 1
    let codes: Vec<u8> = (0..scan::bytes_for(N, gs)).map(|_| (r.next() * 256.0) as u8).collect();
    let tabs: Vec<u8> = (0..G * gs * 16).map(|_| (r.next() * 256.0) as u8).collect();
    let mut sums = vec![0u16; G * scan::BLOCK];
    let mut grp = c.benchmark_group("scan");
    grp.throughput(Throughput::Elements((N * G) as u64));
    for level in levels() {
        grp.bench_function(format!("4bit_{}", level.name()), |b| {
            b.iter(|| {
                for blk in codes.chunks_exact(gs * 16) {
                    scan::sums_with(level, black_box(blk), &tabs, G, gs, &mut sums);
                }
                black_box(&sums);
            })
        });
    }

    // 8-bit table scan (cpu25: one 256-centroid book): the same N cells, G query heads; the
    // levels' kernels, and the f32 gather per cell that 8-bit codes had before
    let m = scan8::TABLE;
    let codes8: Vec<u8> = (0..scan8::bytes_for(N, gs)).map(|_| (r.next() * 256.0) as u8).collect();
    let t32: Vec<f32> = (0..G * gs * m).map(|_| r.next() * 2.0 - 1.0).collect();
    let mut sums8 = vec![0u16; scan8::PLANES * G * scan8::RUN * scan8::BLOCK];
    let mut scores = vec![0f32; G * scan8::BLOCK];
    grp.bench_function("8bit_f32_gather", |b| {
        b.iter(|| {
            for blk in codes8.chunks_exact(gs * scan8::BLOCK) {
                for cell in 0..scan8::BLOCK {
                    for h in 0..G {
                        let t = &t32[h * gs * m..(h + 1) * gs * m];
                        let mut s = 0.0f32;
                        for i in 0..gs {
                            s += t[i * m + black_box(blk)[i * scan8::BLOCK + cell] as usize];
                        }
                        scores[h * scan8::BLOCK + cell] = s;
                    }
                }
                black_box(&scores);
            }
        })
    });
    let mut kernels: Vec<Kernel> = levels().map(Kernel::for_level).collect();
    kernels.dedup();
    for kernel in kernels {
        let (mut tabs8, mut bias, mut step) = (Vec::new(), Vec::new(), Vec::new());
        scan8::quantize_tables(kernel, &t32, m, G, gs, &mut tabs8, &mut bias, &mut step);
        // runs of blocks as the key store scans them, and one block at a time
        let blk = gs * scan8::BLOCK;
        grp.bench_function(format!("8bit_{kernel:?}").to_lowercase(), |b| {
            b.iter(|| {
                for run in codes8.chunks(scan8::RUN * blk) {
                    scan8::sums(kernel, black_box(run), blk, run.len() / blk, &tabs8, scan8::PLANES * G, gs, &mut sums8);
                }
                black_box(&sums8);
            })
        });
        grp.bench_function(format!("8bit_{kernel:?}_one_block").to_lowercase(), |b| {
            b.iter(|| {
                for one in codes8.chunks_exact(blk) {
                    scan8::sums(kernel, black_box(one), blk, 1, &tabs8, scan8::PLANES * G, gs, &mut sums8);
                }
                black_box(&sums8);
            })
        });
        // the tables of one token's G query heads, built once per KV head and layer
        grp.bench_function(format!("8bit_{kernel:?}_quantize_tables").to_lowercase(), |b| {
            b.iter(|| scan8::quantize_tables(kernel, black_box(&t32), m, G, gs, &mut tabs8, &mut bias, &mut step))
        });
    }
    grp.finish();

    // the key store's whole scoring step for one KV head (what a decode work item runs):
    // building the query's tables, then scoring N coded cells, at the process's level
    let mut grp = c.benchmark_group("keys");
    grp.throughput(Throughput::Elements((N * G) as u64));
    let heads_kv = 3;
    for (name, centroids, scope) in [("cpu25", 256, Scope::Layer), ("cpu12.5", 16, Scope::Group)] {
        let mut st = KeyStore::new(KeyCodec::Pq { dim: 1, centroids, scope }, N, heads_kv, DK, 1, 0).unwrap();
        let books = scope.books_per_layer(DK, 1);
        st.set_codebooks(
            (0..books)
                .map(|_| std::sync::Arc::new(Codebook::new(1, (0..centroids).map(|_| r.next() * 4.0 - 2.0).collect()).unwrap()))
                .collect(),
        )
        .unwrap();
        st.reserve(0..N);
        for cell in 0..N {
            let k: Vec<f32> = (0..heads_kv * DK).map(|_| r.next() * 4.0 - 2.0).collect();
            // SAFETY: the cell was reserved and no other thread runs
            unsafe { st.write_exact(cell, &k) };
        }
        st.settle(|_| false).unwrap();
        let q: Vec<f32> = (0..G * DK).map(|_| r.next() * 2.0 - 1.0).collect();
        let cells: Vec<(i32, u32)> = (0..N as u32).map(|c| (c as i32, c)).collect();
        let mut prep = Prep::default();
        let mut out = vec![0f32; G * N];
        grp.bench_function(format!("{name}_prepare"), |b| b.iter(|| st.prepare(black_box(&q), G, &mut prep)));
        st.prepare(&q, G, &mut prep);
        // SAFETY: no thread writes the store
        grp.bench_function(format!("{name}_scores"), |b| b.iter(|| unsafe { st.scores(0, &mut prep, G, black_box(&cells), &mut out, N) }));
    }
    grp.finish();

    // softmax and selection of one head
    let p = probabilities(&mut r);
    let mut top = TopP::default();
    let mut sel = Vec::new();
    let mut grp = c.benchmark_group("select");
    grp.throughput(Throughput::Elements(N as u64));
    // SSE4.1 and NEON run the portable softmax
    let softmax_levels = || levels().filter(|l| !matches!(l, Level::Sse41 | Level::Neon));
    for level in softmax_levels() {
        grp.bench_function(format!("softmax_{}", level.name()), |b| {
            let mut l: Vec<f32> = (0..N).map(|_| r.next() * 8.0).collect();
            b.iter(|| softmax_with(level, black_box(&mut l), None))
        });
    }
    // the 4-bit decode's softmax from the scan's levels (about 600 levels between the lowest
    // and highest sum, as SmolLM2's heads have 370 to 770 at 32768 tokens): counts, one exp
    // per level and the probabilities' lookup, against softmax above; then its top-p cut from
    // the counts, against the histogram's below
    let lv: Vec<u16> = (0..N).map(|_| 2000 + ((r.next() + r.next() + r.next() + r.next()) * 150.0) as u16).collect();
    let raw = vec![0f32; N];
    let scale = Scale { kq_scale: 0.125, softcap: 0.0 };
    for level in softmax_levels() {
        let (mut q, mut head, mut scratch) = (vec![0f32; N], HeadLevels::default(), ChunkScratch::default());
        grp.bench_function(format!("softmax_from_levels_{}", level.name()), |b| {
            b.iter(|| softmax_in_chunks(level, black_box(&lv), &raw, -20.0, 0.01, scale, None, N, &mut head, &mut scratch, &mut q))
        });
        grp.bench_function(format!("top_p_0.9_from_levels_{}", level.name()), |b| b.iter(|| head.cut_top_p(0.9, std::iter::once((0, black_box(&lv[..]))))));
    }
    for level in levels() {
        let mut top = TopP::at(level);
        grp.bench_function(format!("top_p_0.9_{}", level.name()), |b| b.iter(|| top.select(black_box(&p), 0.9, &mut sel)));
    }
    // its two halves: the histogram, then the search and collection
    let mut hist = Histogram::default();
    grp.bench_function("histogram", |b| b.iter(|| hist.build(black_box(&p))));
    grp.bench_function("top_p_0.9_given_histogram", |b| b.iter(|| top.select_with(black_box(&p), &hist, 0.9, &mut sel)));
    grp.bench_function("top_k_15pct", |b| b.iter(|| top.top_k(black_box(&p), N * 15 / 100, &mut sel)));
    grp.bench_function("top_p_sorted_reference", |b| b.iter(|| hcattn::select::top_p_sorted(black_box(&p), 0.9)));
    grp.finish();

    // value sum over 15% of the tokens
    let rows: Vec<Vec<f16>> = (0..N).map(|_| (0..DK).map(|_| f16::from_f32(r.next() - 0.5)).collect()).collect();
    let cells: Vec<(i32, u32)> = (0..N as u32).map(|c| (c as i32, c)).collect();
    top.top_k(&p, N * 15 / 100, &mut sel);
    let mut out = vec![0f32; DK];
    let mut grp = c.benchmark_group("values");
    grp.throughput(Throughput::Elements(sel.len() as u64));
    for level in levels() {
        grp.bench_function(format!("sum_{}", level.name()), |b| {
            b.iter(|| weighted_sum_with(level, &p, black_box(&sel), 1.0, &cells, |c| &rows[c as usize], &mut out))
        });
    }
    // the same sum for the 3 query heads of a KV head: one pass per head, or one pass over
    // the union of their selections (rows in cache here, so this shows the compute only)
    let ps: Vec<Vec<f32>> = (0..G).map(|_| probabilities(&mut r)).collect();
    let hists: Vec<Histogram> = ps
        .iter()
        .map(|p| {
            let mut h = Histogram::default();
            h.build(p);
            h
        })
        .collect();
    let picks: Vec<Pick> = (0..G).map(|k| Pick { p: &ps[k], cut: top.cut_top_k_with(&ps[k], &hists[k], N * 15 / 100) }).collect();
    let sels: Vec<Vec<u32>> = (0..G)
        .map(|k| {
            let mut s = Vec::new();
            top.top_k_with(&ps[k], &hists[k], N * 15 / 100, &mut s);
            s
        })
        .collect();
    let mut outs = vec![0f32; G * DK];
    let mut mass = vec![0f64; G];
    for level in levels() {
        grp.bench_function(format!("3_heads_one_pass_each_{}", level.name()), |b| {
            b.iter(|| {
                for (k, o) in outs.chunks_exact_mut(DK).enumerate() {
                    weighted_sum_with(level, &ps[k], black_box(&sels[k]), 1.0, &cells, |c| &rows[c as usize], o);
                }
            })
        });
        grp.bench_function(format!("3_heads_union_{}", level.name()), |b| {
            b.iter(|| union_sum_with(level, black_box(&picks), &cells, |c| &rows[c as usize], &mut outs, &mut mass))
        });
    }
    // what the decode runs: the same sums chunk by chunk (1024 cells), then added in order
    let probs_all: Vec<f32> = ps.concat();
    let cuts: Vec<_> = picks.iter().map(|k| k.cut).collect();
    let (mut parts, mut part_mass) = (Vec::new(), Vec::new());
    for level in levels() {
        grp.bench_function(format!("3_heads_by_chunk_{}", level.name()), |b| {
            b.iter(|| value_sums(level, black_box(&probs_all), &cuts, &cells, true, |c| &rows[c as usize], &mut outs, &mut parts, &mut part_mass, &mut sel))
        });
    }
    grp.finish();

    // the prompt's exact kernel: the last 32-token block of an 8192-token prompt, one KV head
    // (its 3 query heads), causal
    let keys: Vec<Vec<f16>> = (0..N).map(|_| (0..DK).map(|_| f16::from_f32(r.next() * 2.0 - 1.0)).collect()).collect();
    let vals: Vec<Vec<f16>> = (0..N).map(|_| (0..DK).map(|_| f16::from_f32(r.next() * 2.0 - 1.0)).collect()).collect();
    let cells: Vec<(i32, u32)> = (0..N as u32).map(|c| (c as i32, c)).collect();
    let q: Vec<f32> = (0..32 * G * DK).map(|_| r.next() * 2.0 - 1.0).collect();
    let ranges: Vec<(usize, usize)> = (0..32).map(|t| (0, N - 31 + t)).collect();
    let scale = Scale { kq_scale: 0.125, softcap: 0.0 };
    let mut scratch = BlockScratch::default();
    let mut grp = c.benchmark_group("prefill_block");
    grp.throughput(Throughput::Elements((32 * N) as u64));
    for level in levels() {
        grp.bench_function(format!("32_tokens_3_heads_{}", level.name()), |b| {
            b.iter(|| {
                let (key, val) = (|c: u32| &keys[c as usize][..], |c: u32| &vals[c as usize][..]);
                exact_block_with(level, black_box(&q), G, DK, DK, &cells, &ranges, key, val, scale, None, &mut scratch, |_, o| {
                    black_box(o);
                })
            })
        });
    }
    grp.finish();

    // encoding new keys: nearest of 16 centroids per dimension
    let data: Vec<f32> = (0..4096).map(|_| r.next() * 2.0 - 1.0).collect();
    let book = KMeans::new(16, 1).fit(&data, &mut |_, _| {}).unwrap();
    let key: Vec<f32> = (0..G * DK).map(|_| r.next() * 2.0 - 1.0).collect();
    let mut codes = vec![0u32; G * DK];
    let mut grp = c.benchmark_group("encode");
    grp.throughput(Throughput::Elements(1));
    grp.bench_function("one_token_4bit", |b| b.iter(|| book.encode(black_box(&key), &mut codes)));
    grp.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
