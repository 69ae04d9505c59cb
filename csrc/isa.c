/* isa.c — which SIMD tier runs: the best one this CPU and OS support, unless forced. */
#include "sasq.h"

static int cpu_has(sasq_isa isa) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (isa) {
    case SASQ_ISA_SCALAR: return 1;
    case SASQ_ISA_AVX2: return __builtin_cpu_supports("avx2") != 0;
    case SASQ_ISA_AVX512VNNI:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vnni");
    }
    return 0;
#else
    return isa == SASQ_ISA_SCALAR;
#endif
}

int sasq_isa_available(sasq_isa isa) { return cpu_has(isa); }

sasq_isa sasq_isa_best(void) {
    if (cpu_has(SASQ_ISA_AVX512VNNI)) return SASQ_ISA_AVX512VNNI;
    if (cpu_has(SASQ_ISA_AVX2)) return SASQ_ISA_AVX2;
    return SASQ_ISA_SCALAR;
}

static int current = -1; /* -1: not chosen yet */

sasq_isa sasq_get_isa(void) {
    if (current < 0) current = (int)sasq_isa_best();
    return (sasq_isa)current;
}

int sasq_set_isa(sasq_isa isa) {
    if (!cpu_has(isa)) return -1;
    current = (int)isa;
    return 0;
}
