# Shared part of the aarch64 Linux cross toolchain files (aarch64-gcc.cmake, aarch64-clang.cmake):
# the target, the Debian/Ubuntu cross sysroot, and qemu-aarch64 as the emulator that CTest (and
# add_test commands) run the target's executables under.
#   KMF_AARCH64_SYSROOT  the target's libraries (default /usr/aarch64-linux-gnu, from
#                        apt-get install g++-aarch64-linux-gnu)
#   KMF_QEMU_CPU         qemu's CPU model (default max: every extension qemu emulates, fp16 included;
#                        cortex-a53 checks that a plain armv8-a build runs on an ARMv8.0 core)
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(KMF_AARCH64_SYSROOT /usr/aarch64-linux-gnu CACHE PATH "aarch64 libraries for the linker and qemu-aarch64 -L")
set(KMF_QEMU_CPU max CACHE STRING "qemu-aarch64 -cpu model for the tests")
find_program(KMF_QEMU_AARCH64 qemu-aarch64 REQUIRED)
set(CMAKE_CROSSCOMPILING_EMULATOR ${KMF_QEMU_AARCH64} -L ${KMF_AARCH64_SYSROOT} -cpu ${KMF_QEMU_CPU})
set(CMAKE_FIND_ROOT_PATH ${KMF_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
