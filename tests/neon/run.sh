#!/bin/sh
# Build the algorithm core's unit tests (tests/neon/src/lib.rs) for aarch64 and run them under
# qemu-user: each NEON kernel is compared with the portable reference, the test binary checks
# that it detected NEON, and the rest runs as an Arm build compiles it.
# Needs: rustup's aarch64-unknown-linux-gnu target, and Debian's gcc-aarch64-linux-gnu (linker
# and C runtime) and qemu-user (.ci/run installs all three).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target=aarch64-unknown-linux-gnu
if ! rustup target list --installed | grep -qx "$target"; then
    echo "tests/neon: adding the Rust target $target"
    rustup target add "$target"
fi
for tool in aarch64-linux-gnu-gcc qemu-aarch64; do
    command -v "$tool" >/dev/null || { echo "tests/neon: $tool not found (Debian: apt-get install gcc-aarch64-linux-gnu qemu-user)" >&2; exit 1; }
done
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# Skipped: the huge-page test reads /proc/self/smaps, which qemu-user 7 passes through from the
# host process, at host addresses, not the guest's.
exec cargo test --release --manifest-path "$here/Cargo.toml" --target "$target" --target-dir "$here/../../target/neon" "$@" \
    -- --skip error::tests::large_stores_are_eligible_for_huge_pages
