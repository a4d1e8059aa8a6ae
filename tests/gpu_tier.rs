//! What of the GPU tier can be checked without a GPU: the kernels compile (clang's CUDA front
//! end, to PTX), `device=cuda` without a usable GPU serves from the CPU tier with the same
//! results, and the generated models the GPU check uses load and decode. The kernels' results
//! are checked on a GPU by tests/gpu/check.sh (`hcattn gpu-check`).

mod common;
use common::hc_small as hc;
use common::*;

use std::path::Path;
use std::process::Command;

use hcattn::llama::{Context, ContextOptions, Model};

#[test]
fn kernels_compile_to_ptx() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("hcattn-kernels-{}.ptx", std::process::id()));
    let run = Command::new("clang++")
        .args(["-x", "cuda", "--cuda-device-only", "-nocudainc", "-nocudalib", "--cuda-gpu-arch=sm_80"])
        .args(["-Xclang", "-target-feature", "-Xclang", "+ptx70", "-Wall", "-Werror", "-S", "-include"])
        .arg(root.join("tests/gpu/clang_shim.h"))
        .arg("-o")
        .arg(&out)
        .arg(root.join("kernels/hc.cu"))
        .output()
        .expect("clang++ runs (Debian: apt-get install clang)");
    assert!(run.status.success(), "kernels/hc.cu does not compile:\n{}", String::from_utf8_lossy(&run.stderr));
    let ptx = std::fs::read_to_string(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    for k in ["hc_pack", "hc_encode", "hc_tables", "hc_score", "hc_override", "hc_softmax", "hc_cut", "hc_layer_k", "hc_compact"] {
        assert!(ptx.contains(&format!(".entry {k}(")), "no kernel {k} in the PTX");
    }
}

#[test]
fn device_cuda_without_a_gpu_gives_the_cpu_tiers_results() {
    register();
    let model = load(&generated("llama"));
    let prompt = tokens(150, model.n_vocab(), 9);
    let gpu_here = Path::new("/dev/nvidiactl").exists() && hcattn::gpu::BUILT;
    for base in ["preset=cpu12.5,fit_tokens=64", "keys=pq,pq_dim=2,pq_centroids=256,tau=0.9,fit_tokens=64"] {
        let (t_cpu, l_cpu) = greedy(&mut Context::new(&model, &hc(base)).unwrap(), &prompt, 12);
        let (t_dev, l_dev) = greedy(&mut Context::new(&model, &hc(&format!("{base},device=cuda"))).unwrap(), &prompt, 12);
        if gpu_here {
            // the GPU's exp and summation order differ in the last bits
            assert!(nmse(&l_cpu[0], &l_dev[0]) < 1e-3, "{base}");
        } else {
            assert_eq!((t_cpu, l_cpu), (t_dev, l_dev), "{base}: the fallback is the CPU tier itself");
        }
    }
    // options the GPU tier does not serve fall back too
    let (t_exact, _) = greedy(&mut Context::new(&model, &hc("keys=f16")).unwrap(), &prompt, 8);
    let (t_dev, _) = greedy(&mut Context::new(&model, &hc("keys=f16,device=cuda:3")).unwrap(), &prompt, 8);
    assert_eq!(t_exact, t_dev);
    let e = Context::new(&model, &hc("preset=cpu12.5,device=gpu")).err().unwrap().to_string();
    assert!(e.contains("device") && e.contains("cpu, cuda, cuda:N"), "{e}");
}

#[test]
fn generated_models_decode_and_exact_hc_equals_stock() {
    register();
    let model = Model::load_with(Path::new("gen:tiny"), 0).unwrap();
    assert_eq!(model.n_vocab(), 512);
    let prompt = tokens(100, model.n_vocab(), 4);
    let stock = ContextOptions { n_ctx: 256, n_batch: 256, n_ubatch: 32, ..Default::default() };
    let (t_stock, l_stock) = greedy(&mut Context::new(&model, &stock).unwrap(), &prompt, 8);
    let (t_hc, l_hc) = greedy(&mut Context::new(&model, &hc("")).unwrap(), &prompt, 8);
    assert_eq!(t_stock, t_hc);
    assert!(l_stock.iter().flatten().all(|x| x.is_finite()));
    assert!(nmse(&l_stock[0], &l_hc[0]) < 1e-6, "{}", nmse(&l_stock[0], &l_hc[0]));
    // the same seed gives the same model
    let again = Model::load_with(Path::new("gen:tiny"), 0).unwrap();
    let (t_again, _) = greedy(&mut Context::new(&again, &stock).unwrap(), &prompt, 8);
    assert_eq!(t_stock, t_again);
    let e = Model::load_with(Path::new("gen:llama9"), 0).err().unwrap().to_string();
    assert!(e.contains("gen:llama9") && e.contains("llama3-8b"), "{e}");
}
