# Cross build for aarch64 Linux with clang --target=aarch64-linux-gnu, on the GCC cross
# toolchain's libstdc++ and C runtime (apt-get install clang lld g++-aarch64-linux-gnu qemu-user),
# linked by lld when it is installed, else by aarch64-linux-gnu-ld; tests run under qemu-aarch64.
set(CMAKE_C_COMPILER clang)
set(CMAKE_CXX_COMPILER clang++)
set(CMAKE_C_COMPILER_TARGET aarch64-linux-gnu)
set(CMAKE_CXX_COMPILER_TARGET aarch64-linux-gnu)
find_program(KMF_LLD ld.lld)
if(KMF_LLD)
  foreach(kind EXE SHARED MODULE)
    set(CMAKE_${kind}_LINKER_FLAGS_INIT -fuse-ld=lld)
  endforeach()
endif()
include(${CMAKE_CURRENT_LIST_DIR}/aarch64-common.cmake)
