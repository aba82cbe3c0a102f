/* Cortex-M4/M7 DSP-extension helpers shared by the int8 and N:M kernels. */
#ifndef GR_DSP_H
#define GR_DSP_H
#if defined(__ARM_FEATURE_DSP)
#include <stdint.h>
#include <string.h>

/* bytes 1 and 3 sign-extended into two halfwords: SXTB16 with its operand rotated by 8
 * (gcc 12's arm_acle.h has no __ror, and gcc does not fold a C rotate into SXTB16) */
static inline int32_t sxtb16_ror8(uint32_t v) {
    int32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
    return r;
}

/* four int8 as one word; Cortex-M4/M7 load unaligned words in one instruction */
static inline uint32_t load4(const int8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* two words and advance by 8 bytes in one LDRD (gcc pairs adjacent loads only sometimes);
 * p must be 4-byte aligned */
#define LDRD_POST(p, a, b) __asm__("ldrd %0, %1, [%2], #8" : "=r"(a), "=r"(b), "+r"(p) : : "memory")
#endif
#endif
