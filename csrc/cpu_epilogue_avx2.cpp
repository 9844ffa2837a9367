// The AVX2 + FMA copy of the CPU epilogue's row kernels (cpu_epilogue_rows.h), chosen at run time
// on CPUs that have them (cpu_epilogue.cpp): the setuptools build compiles every C++ file with the
// same flags, so the instruction set is selected here, for this file only, with GCC's target
// pragma, the macros -mavx2 -mfma -mf16c would define (sleef.h and ATen's headers test them) and
// ATen's CPU_CAPABILITY macros (as torch compiles its own kernels once per capability). Elsewhere
// (another compiler, another architecture) this copy is baseline code and says so
// (vectorized_for_avx2).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#ifndef __AVX2__
#pragma GCC target("avx,avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#define ARCFACE_CPU_ISA avx2
#include "cpu_epilogue_rows.h"
