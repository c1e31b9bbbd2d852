#!/usr/bin/env bash
# Cross-compiles the core, its CTest driver (kernels against long-double truth; every half code
# and rounding midpoint, and the hardware half conversions against the portable bit code) and,
# where the tree has it, the C API example, for aarch64 Linux with GCC and with clang, and runs
# them under qemu-aarch64 (CMAKE_CROSSCOMPILING_EMULATOR, set by csrc/tests/toolchains/), with
# csrc/tests/run_ctest.sh's aarch64 builds, warnings as errors:
#   aarch64-gcc-fp16, aarch64-clang-fp16  -march=armv8.2-a+fp16, run on qemu -cpu max
#   aarch64-gcc-v8, aarch64-clang-v8      -march=armv8-a, run on qemu -cpu cortex-a53 (ARMv8.0)
# (clang: --target=aarch64-linux-gnu with lld, on the GCC cross toolchain's libstdc++).
# Usage: csrc/tests/cross_aarch64.sh [build ...]   (default: all four; about 2 minutes on 2 cores)
# Installs what is missing (g++-aarch64-linux-gnu qemu-user clang lld) with apt-get when run as
# root; elsewhere install them first. Environment: as csrc/tests/run_ctest.sh (CMAKE, JOBS via
# CMAKE_BUILD_PARALLEL_LEVEL); KMF_TEST_SMALL=1 shrinks the test sizes.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
declare -A PACKAGE=([aarch64-linux-gnu-g++]=g++-aarch64-linux-gnu [qemu-aarch64]=qemu-user [clang++]=clang [ld.lld]=lld)
missing=()
for tool in "${!PACKAGE[@]}"; do
  command -v "$tool" >/dev/null || missing+=("${PACKAGE[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "cross_aarch64.sh: missing ${missing[*]} (apt-get install ${missing[*]}, as root)" >&2
    exit 1
  fi
  echo "== cross_aarch64.sh: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
builds=("$@")
[ ${#builds[@]} -gt 0 ] || builds=(aarch64-gcc-fp16 aarch64-clang-v8 aarch64-gcc-v8 aarch64-clang-fp16)
exec bash "$HERE/run_ctest.sh" "${builds[@]}"
