#!/usr/bin/env bash
# Makes the kit that tests/gpu/check.sh runs on a GPU machine (no Rust, no network there):
#   target/gpu-kit/hcattn             the tool, built here with --features cuda
#   target/gpu-kit/llama-src.tar.xz   the patched llama.cpp tree, what a CUDA build of libllama needs
# Run from the repository root on an x86-64 machine, after or instead of a normal build.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --features cuda
kit=target/gpu-kit
rm -rf "$kit"
mkdir -p "$kit"
cp target/release/hcattn "$kit/"
# the tree build.rs patched (target/llama-cpp/src), without what a libllama build never reads
tar -C target/llama-cpp/src -cJf "$kit/llama-src.tar.xz" \
    --exclude='./models' --exclude='./docs' --exclude='./media' --exclude='./gguf-py' \
    --exclude='./examples' --exclude='./tests' --exclude='./benches' --exclude='./conversion' \
    --exclude='./scripts' --exclude='./.git' --exclude='./tools/server/public*' \
    .
du -sh "$kit"/*
echo "kit ready: $kit (carry it to the GPU machine and run tests/gpu/check.sh there)"
