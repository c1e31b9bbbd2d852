#!/usr/bin/env bash
# Builds and runs the C++ tests of the core (csrc/tests, CTest; no Python):
#   plain     Release, -march=native like the Python module      -> build/ctest
#   portable  Release, no -march=native (the generic vector path) -> build/ctest-portable
#   sanitize  AddressSanitizer + UndefinedBehaviorSanitizer, -march=native, small sizes
#                                                                  -> build/ctest-sanitize
# and, cross-compiled for aarch64 Linux and run under qemu-aarch64 (csrc/tests/cross_aarch64.sh
# installs the tools and runs them; toolchain files in csrc/tests/toolchains/), -Werror,
# aarch64-{gcc,clang}-{fp16,v8}                                   -> build/ctest-aarch64-*
#   gcc: GCC; clang: clang with lld, on the GCC cross libstdc++
#   fp16: -march=armv8.2-a+fp16 run on qemu -cpu max; v8: -march=armv8-a run on -cpu cortex-a53
# Usage: csrc/tests/run_ctest.sh [plain] [portable] [sanitize] [aarch64-gcc-fp16] ...
#        (default: plain portable sanitize)
# Environment: CMAKE (default: cmake on PATH), CXX (the compiler), CMAKE_BUILD_PARALLEL_LEVEL.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CMAKE="${CMAKE:-$(command -v cmake || true)}"
if [ -z "$CMAKE" ]; then
  echo "run_ctest.sh: cmake not found (pip install cmake, or set CMAKE)" >&2
  exit 1
fi
CTEST="$(dirname "$CMAKE")/ctest"
[ -x "$CTEST" ] || CTEST="$(command -v ctest)"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
GEN=()
if NINJA="$(command -v ninja || true)" && [ -n "$NINJA" ]; then
  GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA")
fi

run() {
  local name="$1"; shift
  local dir="$ROOT/build/ctest-$name"
  [ "$name" = plain ] && dir="$ROOT/build/ctest"
  local t0=$SECONDS
  # A build folder made by another generator cannot be reused: start it afresh.
  local gen="Unix Makefiles"
  [ ${#GEN[@]} -eq 0 ] || gen=Ninja
  if [ -f "$dir/CMakeCache.txt" ] && ! grep -qx "CMAKE_GENERATOR:INTERNAL=$gen" "$dir/CMakeCache.txt"; then
    rm -rf "$dir"
  fi
  echo "== C++ core tests: $name ($dir)"
  "$CMAKE" -S "$ROOT" -B "$dir" "${GEN[@]}" -DKMERGE_FAST_BUILD_TESTS=ON -DKMERGE_FAST_PYTHON=OFF "$@" >"$dir.configure.log" 2>&1 ||
    { cat "$dir.configure.log"; return 1; }
  "$CMAKE" --build "$dir" --parallel "$JOBS"
  "$CTEST" --test-dir "$dir" --output-on-failure --parallel "$JOBS"
  echo "== $name: $((SECONDS - t0)) s"
}

# cross aarch64-COMPILER-LEVEL: a Release build for aarch64, warnings as errors.
cross() {
  local level="${1##*-}" compiler="${1#aarch64-}" march=armv8.2-a+fp16 cpu=max
  compiler="${compiler%-*}"
  [ "$level" = v8 ] && march=armv8-a cpu=cortex-a53
  run "$1" -DCMAKE_BUILD_TYPE=Release -DKMERGE_FAST_NATIVE=OFF -DKMERGE_FAST_SANITIZE=OFF \
    -DCMAKE_TOOLCHAIN_FILE="$ROOT/csrc/tests/toolchains/aarch64-$compiler.cmake" -DKMF_QEMU_CPU="$cpu" \
    -DCMAKE_CXX_FLAGS="-march=$march -Werror" -DCMAKE_C_FLAGS="-march=$march -Werror"
}

mkdir -p "$ROOT/build"
builds=("$@")
[ ${#builds[@]} -gt 0 ] || builds=(plain portable sanitize)
for b in "${builds[@]}"; do
  case "$b" in
    plain) run plain -DCMAKE_BUILD_TYPE=Release -DKMERGE_FAST_NATIVE=ON -DKMERGE_FAST_SANITIZE=OFF ;;
    portable) run portable -DCMAKE_BUILD_TYPE=Release -DKMERGE_FAST_NATIVE=OFF -DKMERGE_FAST_SANITIZE=OFF ;;
    sanitize) run sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKMERGE_FAST_NATIVE=ON -DKMERGE_FAST_SANITIZE=ON ;;
    aarch64-gcc-fp16 | aarch64-gcc-v8 | aarch64-clang-fp16 | aarch64-clang-v8) cross "$b" ;;
    *) echo "run_ctest.sh: unknown build '$b' (plain, portable, sanitize, aarch64-{gcc,clang}-{fp16,v8})" >&2; exit 2 ;;
  esac
done
