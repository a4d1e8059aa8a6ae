#!/usr/bin/env bash
# The GPU check: runs in one go on a machine with an NVIDIA GPU, nvcc and CMake, but no Rust
# toolchain and no network. It uses the kit tests/gpu/pack.sh made on an x86-64 machine
# (target/gpu-kit: the hcattn tool built with --features cuda, and the patched llama.cpp
# source), builds libllama with CUDA here, then:
#   1. kernels: `hcattn gpu-check` runs every kernel on generated inputs against the host
#      references (src/gpu/layout.rs, src/gpu/select.rs, the CPU tier);
#   2. exact mode equals stock on the GPU, and device=cuda matches the CPU tier's quality:
#      `hcattn compare` on a generated SmolLM2-shaped model, all layers on the GPU;
#   3. speed and memory: `hcattn bench` decode tokens/s and fast-tier bytes per token, stock
#      f16 against hc on the CPU and GPU tiers, SmolLM2-shaped at 8K and 32K and
#      Llama-3-8B-shaped at the lengths in LLAMA_DEPTHS (default 32768 131072).
# Everything lands in $OUT (default /tmp/hcattn-gpu-out): logs, JSON and summary.md.
# Environment: KIT, OUT, WORK (build folder), HCATTN_CUDA_ARCHS (default 90), STAGES
# (default "build kernels exact bench"; "threads" adds the CPU tier at 4, 8 and 16 threads),
# LLAMA_DEPTHS, CPU_ONLY=1 (plumbing check on a machine
# without a GPU: CPU build, the GPU stages expect the fallback).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
KIT=${KIT:-$root/target/gpu-kit}
OUT=${OUT:-/tmp/hcattn-gpu-out}
WORK=${WORK:-/tmp/hcattn-gpu-work}
ARCHS=${HCATTN_CUDA_ARCHS:-90}
STAGES=${STAGES:-build kernels exact bench}
LLAMA_DEPTHS=${LLAMA_DEPTHS:-32768 131072}
CPU_ONLY=${CPU_ONLY:-0}
mkdir -p "$OUT" "$WORK"
summary=$OUT/summary.md
: >"$summary"
say() { echo "== $*" | tee -a "$summary"; }
fail() { echo "FAILED: $*" | tee -a "$summary"; exit 1; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

[[ -x $KIT/hcattn && -f $KIT/llama-src.tar.xz ]] || fail "no kit at $KIT: run tests/gpu/pack.sh on the build machine and carry target/gpu-kit"
for tool in cmake tar; do command -v $tool >/dev/null || fail "$tool is missing"; done
if [[ $CPU_ONLY != 1 ]]; then
    command -v nvidia-smi >/dev/null || fail "nvidia-smi is missing: no NVIDIA driver"
    command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]] || fail "nvcc is missing"
    export PATH=$PATH:/usr/local/cuda/bin
    # NVRTC for the hc kernels, cudart/cuBLAS for llama.cpp
    export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
fi
say "kit: $(du -sh "$KIT" | cut -f1), stages: $STAGES, $(nproc) cores"

bin=$WORK/build/bin
if has build; then
    t0=$(date +%s)
    rm -rf "$WORK/src" && mkdir -p "$WORK/src"
    tar -C "$WORK/src" -xJf "$KIT/llama-src.tar.xz"
    cuda=ON
    [[ $CPU_ONLY == 1 ]] && cuda=OFF
    gen=()
    command -v ninja >/dev/null && gen=(-G Ninja)
    if command -v ccache >/dev/null; then
        gen+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
        export CCACHE_BASEDIR=$WORK/src
    fi
    cmake -S "$WORK/src" -B "$WORK/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_NATIVE=ON -DGGML_CUDA=$cuda -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DGGML_CUDA_FA_ALL_QUANTS=OFF \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_RPATH='$ORIGIN' \
        >"$OUT/cmake-configure.log" 2>&1 || fail "cmake configure (see cmake-configure.log)"
    cmake --build "$WORK/build" --parallel "$(nproc)" --target llama >"$OUT/cmake-build.log" 2>&1 || fail "building libllama (see cmake-build.log)"
    say "libllama (CUDA $cuda, archs $ARCHS) built in $(( $(date +%s) - t0 )) s"
fi
[[ -f $bin/libllama.so ]] || fail "no libllama.so in $bin (run the build stage)"
# the tool finds the CUDA libllama next to itself ($ORIGIN in its rpath)
cp "$KIT/hcattn" "$bin/hcattn"
hc=$bin/hcattn
ngl=99
[[ $CPU_ONLY == 1 ]] && ngl=0

if has kernels; then
    say "kernels against the host references"
    if [[ $CPU_ONLY == 1 ]]; then
        if "$hc" gpu-check >"$OUT/gpu-check.log" 2>&1; then fail "gpu-check passed without a GPU"; fi
        grep -q "no CUDA driver\|no GPU tier" "$OUT/gpu-check.log" || fail "gpu-check without a GPU did not say why"
        say "no GPU: gpu-check refused with a reason, as it should"
    else
        "$hc" gpu-check 2>&1 | tee "$OUT/gpu-check.log" | tee -a "$summary" || fail "gpu-check"
    fi
fi


if has exact; then
    say "exact mode and GPU-tier quality (compare, gen:smollm2, --ngl $ngl)"
    "$hc" compare -m gen:smollm2 --ngl $ngl --ctx 2048 --score 64 \
        --configs f16 exact cpu12.5 hc:preset=cpu12.5,device=cuda --json "$OUT/compare.json" \
        >"$OUT/compare.md" 2>"$OUT/compare.log" || fail "compare (see compare.log)"
    cat "$OUT/compare.md" >>"$summary"
    grep -q "hc: GPU tier on\|device=cuda:0: " "$OUT/compare.log" || fail "no log line about the GPU tier"
    if [[ $CPU_ONLY != 1 ]]; then grep -q "hc: GPU tier on" "$OUT/compare.log" || fail "the GPU tier did not open: $(grep 'device=cuda' "$OUT/compare.log" | head -1)"; fi
    if ! python3 - "$OUT/compare.json" <<'PY' | tee -a "$summary"; then fail "exact mode or GPU-tier quality off (see above)"; fi
import json, sys
rows = {r["config"]["name"]: r for r in json.load(open(sys.argv[1]))}
exact = rows["hc exact"] if "hc exact" in rows else next(r for n, r in rows.items() if "exact" in n)
cpu = next(r for n, r in rows.items() if n.endswith("cpu12.5"))
gpu = next(r for n, r in rows.items() if "device=cuda" in n)
print(f"exact: mean KLD {exact['kld_mean']:.2e}, top-1 {exact['top1']*100:.1f}%")
print(f"cpu12.5: CPU tier KLD {cpu['kld_mean']:.4f} top-1 {cpu['top1']*100:.1f}%; GPU tier KLD {gpu['kld_mean']:.4f} top-1 {gpu['top1']*100:.1f}%")
# random weights give flat distributions whose argmax flips at near-ties, so exactness is
# judged by the KL divergence; top-1 is reported
ok = exact["kld_mean"] <= 1e-3 and abs(gpu["kld_mean"] - cpu["kld_mean"]) <= 0.1 * cpu["kld_mean"] + 1e-3
sys.exit(0 if ok else 1)
PY
fi

if has bench; then
    say "decode speed and fast-tier bytes per token (bench)"
    "$hc" bench -m gen:smollm2 --ngl $ngl --depths 8192 32768 --n-prompt 512 --n-gen 64 \
        --configs f16 cpu12.5 hc:preset=cpu12.5,device=cuda hc:keys=pq,pq_dim=4,pq_centroids=256,tau=0.9,renorm=1,device=cuda \
        --json "$OUT/bench-smollm2.json" >"$OUT/bench-smollm2.md" 2>"$OUT/bench-smollm2.log" || fail "bench gen:smollm2 (see its log)"
    cat "$OUT/bench-smollm2.md" >>"$summary"
    # Llama-3-8B-shaped: hc fills the context with anchored prefill (linear; a quadratic CPU
    # prefill of 128K tokens would take hours), stock with its own GPU prefill
    "$hc" bench -m gen:llama3-8b --ngl $ngl --depths $LLAMA_DEPTHS --n-prompt 512 --n-gen 32 \
        --configs f16 hc:preset=cpu12.5,prefill=anchor:1024,device=cuda \
        --json "$OUT/bench-llama3-8b.json" >"$OUT/bench-llama3-8b.md" 2>"$OUT/bench-llama3-8b.log" || fail "bench gen:llama3-8b (see its log)"
    cat "$OUT/bench-llama3-8b.md" >>"$summary"
fi
if has threads; then
    # the CPU tier's thread scaling, which a 2-core build machine cannot show (optional stage)
    for t in 4 8 16; do
        say "CPU tier with $t threads (bench, gen:smollm2, no GPU layers)"
        "$hc" bench -m gen:smollm2 --ngl 0 -t $t --depths 8192 --n-prompt 512 --n-gen 64 --configs f16 cpu12.5 \
            --json "$OUT/bench-threads-$t.json" >"$OUT/bench-threads-$t.md" 2>"$OUT/bench-threads-$t.log" || fail "bench -t $t"
        cat "$OUT/bench-threads-$t.md" >>"$summary"
    done
fi
say "done"
