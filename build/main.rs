//! Build script: fetch the pinned llama.cpp (when missing), apply the patch series to a copy,
//! build it with CMake in Release, generate bindings, and place the tools and shared libraries
//! next to libhcattn.so in target/<profile>/.
//!
//! Environment:
//! - `HCATTN_LLAMA_SRC`: use this pristine llama.cpp tree instead of vendor/llama.cpp.
//! - `HCATTN_LLAMA_NATIVE=0`: build llama.cpp for a portable target instead of this CPU
//!   (x86-64-v3 on x86, the compiler's default on Arm).
//! - `HCATTN_CUDA_ARCHS`: CUDA architectures with the `cuda` feature (default 90).
//! - `HCATTN_BUILD_JOBS`: parallel compile jobs (default: what cargo gives the script).

#[path = "fetch.rs"]
mod fetch;
#[path = "tree.rs"]
mod tree;

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The llama.cpp targets a user and the tests need.
const TARGETS: &[&str] = &[
    "llama-cli",
    "llama-completion",
    "llama-server",
    "llama-perplexity",
    "llama-bench",
    "llama-batched-bench",
    "test-llama-archs",
];

fn main() {
    if let Err(msg) = run() {
        // A panic is the way a build script fails; the message is what the user reads.
        panic!("\n\nhcattn build failed:\n{msg}\n");
    }
}

fn run() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    // OUT_DIR is target/<profile>/build/hcattn-<hash>/out
    let profile_dir = out_dir.ancestors().nth(3).ok_or("unexpected OUT_DIR layout")?.to_path_buf();
    let target_dir = profile_dir.parent().ok_or("unexpected OUT_DIR layout")?.to_path_buf();
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some() && llama_cuda()?;

    for p in ["build", "patches", "vendor/llama-cpp.pin"] {
        println!("cargo:rerun-if-changed={}", manifest.join(p).display());
    }
    for v in ["HCATTN_LLAMA_SRC", "HCATTN_LLAMA_NATIVE", "HCATTN_CUDA_ARCHS", "HCATTN_BUILD_JOBS", "HCATTN_LLAMA_CUDA", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let pin = fetch::Pin::read(&manifest.join("vendor/llama-cpp.pin"))?;
    let pristine = match env::var_os("HCATTN_LLAMA_SRC") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            fetch::check_tree(&dir).map_err(|e| {
                format!("HCATTN_LLAMA_SRC={} is not a usable llama.cpp tree: {e}\n\
                         Point it at the vendor/llama.cpp folder of {} {}, or unset it to fetch that tree.",
                        dir.display(), pin.package, pin.version)
            })?;
            dir
        }
        None => fetch::ensure_vendored(&pin, &manifest.join("vendor/llama.cpp"))?,
    };

    // One llama.cpp build per feature set, shared by every cargo profile: it is always Release.
    let flavour = if cuda { "cuda" } else { "cpu" };
    let work = target_dir.join("llama-cpp");
    let src = work.join("src");
    let build = work.join(format!("build-{flavour}"));
    tree::materialize_patched(&pristine, &manifest.join("patches"), &work.join("stage"), &src)?;

    cmake_build(&src, &build, &pin, cuda)?;

    let bin = build.join("bin");
    println!("cargo:rustc-link-search=native={}", bin.display());
    println!("cargo:rustc-link-lib=dylib=llama");
    // gguf_* and ggml_* calls of the generated models (src/llama/generated.rs)
    println!("cargo:rustc-link-lib=dylib=ggml-base");
    // tests and examples run from target/<profile>/deps: let them find libllama where it was built
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN:{}", bin.display());
    println!("cargo:include={}", src.join("include").display());

    bindings(&src, &out_dir)?;
    place_outputs(&bin, &profile_dir)?;
    Ok(())
}

/// With the `cuda` feature: whether llama.cpp is built with its CUDA backend. It needs nvcc; the
/// hc GPU tier does not (cudarc loads the driver and NVRTC when the program runs), so without
/// nvcc the Rust side is still built for the GPU tier, against a CPU llama.cpp, with a warning.
/// HCATTN_LLAMA_CUDA=0 or 1 decides instead (1 fails the build when nvcc is missing).
fn llama_cuda() -> Result<bool, String> {
    let nvcc = which("nvcc")
        || env::var_os("CUDA_PATH").is_some_and(|p| Path::new(&p).join("bin/nvcc").exists())
        || Path::new("/usr/local/cuda/bin/nvcc").exists();
    match env::var("HCATTN_LLAMA_CUDA").ok().as_deref() {
        Some("0") => Ok(false),
        Some("1") if !nvcc => Err("HCATTN_LLAMA_CUDA=1 but nvcc was not found (PATH, CUDA_PATH, /usr/local/cuda)".into()),
        Some("1") => Ok(true),
        Some(v) => Err(format!("HCATTN_LLAMA_CUDA={v}: accepted 0 or 1")),
        None if nvcc => Ok(true),
        None => {
            println!("cargo:warning=feature cuda: nvcc not found, so llama.cpp is built for the CPU; the hc GPU tier is built and loads CUDA when it runs");
            Ok(false)
        }
    }
}

fn cmake_build(src: &Path, build: &Path, pin: &fetch::Pin, cuda: bool) -> Result<(), String> {
    let native = env::var("HCATTN_LLAMA_NATIVE").map(|v| v != "0").unwrap_or(true);
    let mut args: Vec<String> = vec![
        "-DCMAKE_BUILD_TYPE=Release".into(),
        "-DBUILD_SHARED_LIBS=ON".into(),
        format!("-DGGML_NATIVE={}", if native { "ON" } else { "OFF" }),
        format!("-DGGML_CUDA={}", if cuda { "ON" } else { "OFF" }),
        "-DLLAMA_BUILD_COMMON=ON".into(),
        "-DLLAMA_BUILD_TOOLS=ON".into(),
        "-DLLAMA_BUILD_SERVER=ON".into(), // llama-cli is built on the server library
        "-DLLAMA_BUILD_TESTS=ON".into(),  // test-llama-archs writes the generated test models
        "-DLLAMA_BUILD_EXAMPLES=ON".into(), // llama-batched-bench
        "-DLLAMA_BUILD_APP=OFF".into(),
        // never download the web UI during a build
        "-DLLAMA_USE_PREBUILT_UI=OFF".into(),
        "-DLLAMA_BUILD_UI=OFF".into(),
        "-DLLAMA_OPENSSL=OFF".into(),
        format!("-DLLAMA_BUILD_NUMBER={}", pin.build_number),
        format!("-DLLAMA_BUILD_COMMIT={}", pin.commit),
        // the tools are copied next to libhcattn.so and must find their libraries there
        "-DCMAKE_BUILD_RPATH=$ORIGIN".into(),
    ];
    if cuda {
        let archs = env::var("HCATTN_CUDA_ARCHS").unwrap_or_else(|_| "90".into());
        args.push(format!("-DCMAKE_CUDA_ARCHITECTURES={archs}"));
        args.push("-DGGML_CUDA_FA_ALL_QUANTS=OFF".into());
    }
    if which("ccache") {
        args.push("-DCMAKE_C_COMPILER_LAUNCHER=ccache".into());
        args.push("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache".into());
    }
    let ninja = which("ninja");
    if !which("cmake") {
        return Err("cmake not found: install it (Debian: apt-get install cmake; 3.24 or newer is best)".into());
    }

    fs::create_dir_all(build).map_err(|e| format!("cannot create {}: {e}", build.display()))?;
    let log_path = build.join("hcattn-build.log");
    let stamp = build.join("hcattn-configure.args");
    let wanted = args.join("\n");
    let configured = fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str())
        && build.join("CMakeCache.txt").exists();
    if !configured {
        let mut cmd = Command::new("cmake");
        cmd.arg("-S").arg(src).arg("-B").arg(build);
        if ninja {
            cmd.arg("-G").arg("Ninja");
        }
        cmd.args(&args);
        run_logged(cmd, &log_path, "configuring llama.cpp with CMake")?;
        fs::write(&stamp, &wanted).map_err(|e| e.to_string())?;
    }

    let jobs = env::var("HCATTN_BUILD_JOBS").or_else(|_| env::var("NUM_JOBS")).unwrap_or_else(|_| "2".into());
    let mut cmd = Command::new("cmake");
    // ccache keys on paths relative to the source tree, so another checkout reuses the objects
    cmd.env("CCACHE_BASEDIR", src);
    cmd.arg("--build").arg(build).arg("--parallel").arg(&jobs).arg("--target").args(TARGETS);
    println!("cargo:warning=building llama.cpp ({} jobs; a cold build takes several minutes), log: {}", jobs, log_path.display());
    run_logged(cmd, &log_path, "building llama.cpp")
}

fn run_logged(mut cmd: Command, log_path: &Path, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    let mut log = out.stdout.clone();
    log.extend_from_slice(&out.stderr);
    let _ = fs::write(log_path, &log);
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&log);
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(format!("{what} failed ({}); full log: {}\n{}", out.status, log_path.display(), tail.join("\n")))
}

fn which(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

fn bindings(src: &Path, out_dir: &Path) -> Result<(), String> {
    let include = src.join("include");
    let ggml_include = src.join("ggml/include");
    let b = bindgen::Builder::default()
        .header(include.join("llama.h").display().to_string())
        .clang_arg(format!("-I{}", include.display()))
        .clang_arg(format!("-I{}", ggml_include.display()))
        .allowlist_function("llama_.*")
        .allowlist_type("llama_.*")
        .allowlist_var("LLAMA_.*")
        .allowlist_function("ggml_backend_load_all")
        // gguf metadata and tensor data for models generated in memory (llama_model_init_from_user)
        .allowlist_function("gguf_(init_empty|free|set_val_.*|set_arr_str|set_arr_data)")
        .allowlist_function("ggml_(nelements|get_name|backend_tensor_set)")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .map_err(|e| format!("bindgen on {}: {e} (bindgen needs libclang: apt-get install libclang-dev)", include.display()))?;
    b.write_to_file(out_dir.join("llama_sys.rs")).map_err(|e| e.to_string())
}

/// Copy the tools and shared libraries next to libhcattn.so, where they find each other
/// through their $ORIGIN rpath. Only files that changed are copied.
fn place_outputs(bin: &Path, profile_dir: &Path) -> Result<(), String> {
    let entries = fs::read_dir(bin).map_err(|e| format!("{}: {e}", bin.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let wanted = TARGETS.contains(&name.as_str()) || name.contains(".so");
        if !wanted {
            continue;
        }
        let from = entry.path();
        let to = profile_dir.join(&name);
        let meta = fs::symlink_metadata(&from).map_err(|e| e.to_string())?;
        if meta.file_type().is_symlink() {
            let link = fs::read_link(&from).map_err(|e| e.to_string())?;
            if fs::read_link(&to).ok().as_ref() != Some(&link) {
                let _ = fs::remove_file(&to);
                std::os::unix::fs::symlink(&link, &to).map_err(|e| format!("{}: {e}", to.display()))?;
            }
        } else if tree::differs(&from, &to) {
            let _ = fs::remove_file(&to);
            fs::copy(&from, &to).map_err(|e| format!("copy {} -> {}: {e}", from.display(), to.display()))?;
        }
    }
    Ok(())
}
