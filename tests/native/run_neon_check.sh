#!/usr/bin/env bash
# Cross-builds tests/native/neon_check.cpp for aarch64 and runs it under qemu-user:
# the NEON kernel against the portable one, without Python and without an ARM machine.
# Needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu qemu-user).
# Usage: run_neon_check.sh [--quick]   (BUILD_DIR overrides where the binary goes)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [[ -n "${BUILD_DIR:-}" ]]; then
  build="$BUILD_DIR"
else
  build="$(mktemp -d)"
  trap 'rm -rf "$build"' EXIT
fi
CXX="${CXX_AARCH64:-aarch64-linux-gnu-g++}"
QEMU="${QEMU_AARCH64:-qemu-aarch64}"
flags=(-O2 -std=c++17 -static -Wall -Wextra -Wno-unused-parameter -I"$root/csrc")
# every kernel-side file the check needs; dispatch.cpp to check "neon" is registered
srcs=(pack.cpp tables.cpp lut_gemm_generic.cpp lut_gemm_neon.cpp dispatch.cpp)
objs=() pids=()
for s in "${srcs[@]}"; do
  o="$build/${s%.cpp}.o"
  nice -n 19 "$CXX" "${flags[@]}" -c "$root/csrc/$s" -o "$o" &
  objs+=("$o") pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed compile stops here
nice -n 19 "$CXX" "${flags[@]}" "$here/neon_check.cpp" "${objs[@]}" -o "$build/neon_check"
# LUTHIER_ISA unset: the check also asserts that "neon" is the default ISA
env -u LUTHIER_ISA nice -n 19 "$QEMU" "$build/neon_check" "$@"
