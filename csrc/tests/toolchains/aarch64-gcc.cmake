# Cross build for aarch64 Linux with GCC (apt-get install g++-aarch64-linux-gnu qemu-user);
# tests run under qemu-aarch64. Example (csrc/tests/cross_aarch64.sh does this):
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=csrc/tests/toolchains/aarch64-gcc.cmake \
#         -DKMERGE_FAST_PYTHON=OFF -DKMERGE_FAST_BUILD_TESTS=ON -DKMERGE_FAST_NATIVE=OFF
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
include(${CMAKE_CURRENT_LIST_DIR}/aarch64-common.cmake)
