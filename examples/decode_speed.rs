//! Quick decode-speed probe: prefill N tokens of random ids, then time 16 decode steps, stock vs hc.
use std::time::Instant;
use hcattn::llama::{Batch, Context, ContextOptions, Model};

fn main() {
    hcattn::llama::register_hc().unwrap();
    let path = hcattn::models::fetch(&hcattn::models::SMOLLM2).unwrap();
    let model = Model::load(&path).unwrap();
    let depth: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(4096);
    for backend in [None, Some("hc")] {
        let o = ContextOptions { n_ctx: (depth + 64) as u32, n_batch: 512, n_ubatch: 512, kv_backend: backend.map(String::from), ..Default::default() };
        let mut ctx = Context::new(&model, &o).unwrap();
        let t0 = Instant::now();
        for start in (0..depth).step_by(512) {
            let mut b = Batch::default();
            for i in start..(start + 512).min(depth) {
                b.add((i % 1000) as i32 + 100, i as i32, &[0], i + 1 == depth);
            }
            ctx.decode(&b).unwrap();
        }
        let tp = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for k in 0..16 {
            let mut b = Batch::default();
            b.add(200 + k, (depth + k as usize) as i32, &[0], true);
            ctx.decode(&b).unwrap();
        }
        let td = t1.elapsed().as_secs_f64();
        println!("{:?}: prefill {:.1} t/s, decode {:.2} t/s", backend, depth as f64 / tp, 16.0 / td);
    }
}
