/* int8 kernels with TFLite / CMSIS-NN integer semantics: symmetric per-channel
 * int8 weights (zero point 0), asymmetric int8 activations, int32 accumulators and
 * bias (bias_q = round(b / (s_x * s_w[c]))), and a fixed-point requantization
 * multiplier + shift per output channel. */
#include <math.h>
#include <string.h>
#include "gr_kernels.h"

/* the MAC loops live in small functions of their own: inlined into their callers, gcc
 * runs out of registers and spills the accumulators inside the loop */
#if defined(__GNUC__)
#define GR_NOINLINE __attribute__((noinline))
#else
#define GR_NOINLINE
#endif

#if defined(__ARM_FEATURE_DSP)
/* Cortex-M4/M7 DSP extension: SXTB16 sign-extends bytes 0 and 2 (1 and 3 after a
 * rotate by 8) into two halfwords, SMLAD does two 16x16 multiply-accumulates, SMLABB /
 * SMLABT / SMLATB / SMLATT one with a chosen halfword of each operand. */
#include <arm_acle.h>
#define SMLABB(a, b, c) __smlabb((a), (b), (c))
#define SMLABT(a, b, c) __smlabt((a), (b), (c))
#define SMLATB(a, b, c) __smlatb((a), (b), (c))
#define SMLATT(a, b, c) __smlatt((a), (b), (c))
#include "gr_dsp.h"

#endif

void gr_quantize_f32_i8(const float *x, int8_t *y, int32_t n, float inv_scale, int32_t zp) {
    int32_t i;
    for (i = 0; i < n; i++) {
        float r = nearbyintf(x[i] * inv_scale) + (float)zp;  /* round half to even, like torch.round */
        y[i] = (int8_t)(r < -128.0f ? -128 : (r > 127.0f ? 127 : (int32_t)r));
    }
}

void gr_dequantize_i8_f32(const int8_t *x, float *y, int32_t n, float scale, int32_t zp) {
    int32_t i;
    for (i = 0; i < n; i++) y[i] = ((float)x[i] - (float)zp) * scale;
}

int32_t gr_requantize(int32_t acc, int32_t mult, int32_t shift) {
    int32_t total = 31 - shift;   /* the planner keeps 1 <= total <= 62 */
    int64_t prod = (int64_t)acc * mult + ((int64_t)1 << (total - 1));
    return (int32_t)(prod >> total);  /* arithmetic shift: floor, so ties round up */
}

/* gr_requantize (same value) plus the output zero point and clamp, with every constant
 * passed in: callers hoist them out of their pixel loops (int8 stores may alias *q, so
 * reading q there would reload it after every store) */
static inline int8_t requant_s8(int32_t acc, int32_t mult, int32_t total, int32_t ozp, int32_t lo, int32_t hi) {
    int64_t prod = (int64_t)acc * mult + ((int64_t)1 << (total - 1));
    /* the low word of prod >> total; for total >= 32 that is the high word shifted */
    int32_t r = (total >= 32 ? (int32_t)(prod >> 32) >> (total - 32) : (int32_t)(prod >> total)) + ozp;
    return (int8_t)(r < lo ? lo : (r > hi ? hi : r));
}

/* requantization constants of one output channel */
typedef struct {
    int32_t base, mult, total, ozp, lo, hi;
} channel_out;

/* pointwise conv, stride 1: one output channel's pixels 0 .. count - 1 (a multiple of 4),
 * four neighbouring pixels at a time; returns how many it wrote */
static GR_NOINLINE int32_t pointwise_rows_s8(const int8_t *xn, const int8_t *wo, int32_t cin, int32_t hw,
                                             int32_t count, const channel_out *co, int8_t *yo) {
    const int32_t mult = co->mult, total = co->total, ozp = co->ozp, lo = co->lo, hi = co->hi;
    int32_t p;
    for (p = 0; p + 3 < count; p += 4) {
        const int8_t *xp = xn + p;
        int32_t a0 = co->base, a1 = a0, a2 = a0, a3 = a0, c = 0;
#if defined(__ARM_FEATURE_DSP)
        /* four channels of four pixels per step: one word holds a channel's four
         * pixels; its even / odd halfwords meet the weights' halfwords in SMLAxy */
        for (; c + 3 < cin; c += 4, xp += 4 * hw) {
            uint32_t wv = load4(wo + c);
            int32_t w02 = __sxtb16(wv), w13 = sxtb16_ror8(wv);
            uint32_t xv = load4(xp);
            int32_t e = __sxtb16(xv), d = sxtb16_ror8(xv);   /* (p0, p2), (p1, p3) */
            a0 = SMLABB(w02, e, a0); a2 = SMLABT(w02, e, a2);
            a1 = SMLABB(w02, d, a1); a3 = SMLABT(w02, d, a3);
            xv = load4(xp + hw);
            e = __sxtb16(xv); d = sxtb16_ror8(xv);
            a0 = SMLABB(w13, e, a0); a2 = SMLABT(w13, e, a2);
            a1 = SMLABB(w13, d, a1); a3 = SMLABT(w13, d, a3);
            xv = load4(xp + 2 * hw);
            e = __sxtb16(xv); d = sxtb16_ror8(xv);
            a0 = SMLATB(w02, e, a0); a2 = SMLATT(w02, e, a2);
            a1 = SMLATB(w02, d, a1); a3 = SMLATT(w02, d, a3);
            xv = load4(xp + 3 * hw);
            e = __sxtb16(xv); d = sxtb16_ror8(xv);
            a0 = SMLATB(w13, e, a0); a2 = SMLATT(w13, e, a2);
            a1 = SMLATB(w13, d, a1); a3 = SMLATT(w13, d, a3);
        }
#endif
        for (; c < cin; c++, xp += hw) {
            int32_t wv = wo[c];
            a0 += wv * xp[0]; a1 += wv * xp[1]; a2 += wv * xp[2]; a3 += wv * xp[3];
        }
        yo[p] = requant_s8(a0, mult, total, ozp, lo, hi);
        yo[p + 1] = requant_s8(a1, mult, total, ozp, lo, hi);
        yo[p + 2] = requant_s8(a2, mult, total, ozp, lo, hi);
        yo[p + 3] = requant_s8(a3, mult, total, ozp, lo, hi);
    }
    return p;
}

/* 1x1, no padding, one group: a dot product over channels per output pixel.
 * sum_c w*(x - zp) = sum_c w*x - zp * sum_c w: the zero point leaves the loop */
static void pointwise_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x,
                         const int8_t *w, const int32_t *bias, int8_t *y) {
    const int32_t ozp = q->out_zp, lo = q->act_min, hi = q->act_max;
    int32_t hw = s->h * s->w, ohw = s->oh * s->ow, n, o, c, zp = q->in_zp;
    for (n = 0; n < s->n; n++) {
        const int8_t *xn = x + (size_t)n * s->c * hw;
        for (o = 0; o < s->oc; o++) {
            const int8_t *wo = w + (size_t)o * s->c;
            int8_t *yo = y + ((size_t)n * s->oc + o) * ohw;
            const int32_t mult = q->mult[o], total = 31 - q->shift[o];
            int32_t wsum = 0;
            for (c = 0; c < s->c; c++) wsum += wo[c];
            int32_t base = (bias ? bias[o] : 0) - zp * wsum, p = 0;
            if (s->sh == 1 && s->sw == 1) {
                /* stride 1: output pixel p reads input pixel p; four pixels share each weight load */
                channel_out co;
                co.base = base; co.mult = mult; co.total = total; co.ozp = ozp; co.lo = lo; co.hi = hi;
                p = pointwise_rows_s8(xn, wo, s->c, hw, hw, &co, yo);
            }
            for (; p < ohw; p++) {
                int32_t oy = p / s->ow, ox = p % s->ow;
                const int8_t *xp = xn + (size_t)oy * s->sh * s->w + (size_t)ox * s->sw;
                int32_t acc = base;
                for (c = 0; c < s->c; c++) acc += (int32_t)wo[c] * (int32_t)xp[(size_t)c * hw];
                yo[p] = requant_s8(acc, mult, total, ozp, lo, hi);
            }
        }
    }
}

/* `count` depthwise 3x3 outputs of one row whose windows lie inside the input; r0 is the
 * first window's top-left input, sw the horizontal stride, W the input row length */
static GR_NOINLINE void depthwise3x3_row_s8(const int8_t *r0, int32_t W, int32_t sw, const int8_t *wc,
                                            int32_t count, const channel_out *co, int8_t *yr) {
    const int32_t base = co->base, mult = co->mult, total = co->total;
    const int32_t ozp = co->ozp, lo = co->lo, hi = co->hi;
    int32_t i = 0;
#if defined(__ARM_FEATURE_DSP)
    if (sw == 1) {
        /* two outputs per step: one word holds a row's four inputs x0..x3; SMLAD takes the
         * (w0, w1) pair against (x0, x1) and (x1, x2), SMLABT w2 against x2 and x3 */
        const int32_t w01 = (int32_t)(((uint32_t)wc[0] & 0xffffu) | ((uint32_t)wc[1] << 16));
        const int32_t w34 = (int32_t)(((uint32_t)wc[3] & 0xffffu) | ((uint32_t)wc[4] << 16));
        const int32_t w67 = (int32_t)(((uint32_t)wc[6] & 0xffffu) | ((uint32_t)wc[7] << 16));
        const int32_t w2 = wc[2], w5 = wc[5], w8 = wc[8];
        for (; i + 1 < count; i += 2, r0 += 2) {
            int32_t a0 = base, a1 = base, e, d;
            uint32_t v;
#define DW_ROW(ROW, WP, WS)                                                                 \
            v = load4(r0 + (ROW)); e = __sxtb16(v); d = sxtb16_ror8(v);                      \
            a0 = __smlad(WP, (int32_t)(((uint32_t)e & 0xffffu) | ((uint32_t)d << 16)), a0);   \
            a1 = __smlad(WP, (int32_t)(((uint32_t)d & 0xffffu) | ((uint32_t)e & 0xffff0000u)), a1); \
            a0 = SMLABT(WS, e, a0); a1 = SMLABT(WS, d, a1);
            DW_ROW(0, w01, w2)
            DW_ROW(W, w34, w5)
            DW_ROW(2 * W, w67, w8)
#undef DW_ROW
            yr[i] = requant_s8(a0, mult, total, ozp, lo, hi);
            yr[i + 1] = requant_s8(a1, mult, total, ozp, lo, hi);
        }
    }
#endif
    for (; i < count; i++, r0 += sw) {
        const int8_t *r1 = r0 + W, *r2 = r1 + W;
        int32_t a = base;
        a += wc[0] * r0[0]; a += wc[1] * r0[1]; a += wc[2] * r0[2];
        a += wc[3] * r1[0]; a += wc[4] * r1[1]; a += wc[5] * r1[2];
        a += wc[6] * r2[0]; a += wc[7] * r2[1]; a += wc[8] * r2[2];
        yr[i] = requant_s8(a, mult, total, ozp, lo, hi);
    }
}

/* one channel of a depthwise 3x3, dilation 1: interior outputs use sum w*x - zp * sum w
 * (nine weights in registers), border outputs skip the padded taps (real value 0) */
static void depthwise3x3_channel_s8(const gr_conv_shape *s, const int8_t *xc, const int8_t *wc, int32_t b0,
                                    int32_t zp, int32_t mult, int32_t shift, int32_t ozp, int32_t lo,
                                    int32_t hi, int8_t *yc) {
    int32_t oy, ox, ky, kx;
    const int32_t w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5];
    const int32_t w6 = wc[6], w7 = wc[7], w8 = wc[8];
    const int32_t full = b0 - zp * (w0 + w1 + w2 + w3 + w4 + w5 + w6 + w7 + w8);
    /* outputs whose window lies inside the input columns: ox in [ox_a, ox_b) */
    int32_t ox_a = (s->pw + s->sw - 1) / s->sw, ox_b = s->w - 3 + s->pw < 0 ? 0 : (s->w - 3 + s->pw) / s->sw + 1;
    channel_out co;
    if (ox_b > s->ow) ox_b = s->ow;
    if (ox_a > ox_b) ox_a = ox_b;
    co.base = full; co.mult = mult; co.total = 31 - shift; co.ozp = ozp; co.lo = lo; co.hi = hi;
    for (oy = 0; oy < s->oh; oy++) {
        int32_t iy0 = oy * s->sh - s->ph, rows_in = iy0 >= 0 && iy0 + 2 < s->h;
        for (ox = 0; ox < s->ow; ox++) {
            int32_t ix0 = ox * s->sw - s->pw, acc;
            if (rows_in && ox == ox_a && ox_b > ox_a) {
                depthwise3x3_row_s8(xc + (size_t)iy0 * s->w + ix0, s->w, s->sw, wc, ox_b - ox_a, &co,
                                    yc + oy * s->ow + ox);
                ox = ox_b - 1;
                continue;
            }
            if (rows_in && ix0 >= 0 && ix0 + 2 < s->w) {
                const int8_t *r0 = xc + (size_t)iy0 * s->w + ix0, *r1 = r0 + s->w, *r2 = r1 + s->w;
                acc = full + w0 * r0[0] + w1 * r0[1] + w2 * r0[2] + w3 * r1[0] + w4 * r1[1] + w5 * r1[2]
                    + w6 * r2[0] + w7 * r2[1] + w8 * r2[2];
            } else {
                acc = b0;
                for (ky = 0; ky < 3; ky++) {
                    int32_t iy = iy0 + ky;
                    if (iy < 0 || iy >= s->h) continue;
                    for (kx = 0; kx < 3; kx++) {
                        int32_t ix = ix0 + kx;
                        if (ix >= 0 && ix < s->w)
                            acc += (int32_t)wc[ky * 3 + kx] * ((int32_t)xc[(size_t)iy * s->w + ix] - zp);
                    }
                }
            }
            yc[oy * s->ow + ox] = requant_s8(acc, mult, 31 - shift, ozp, lo, hi);
        }
    }
}

static void depthwise3x3_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x,
                            const int8_t *w, const int32_t *bias, int8_t *y) {
    int32_t n, c;
    for (n = 0; n < s->n; n++) for (c = 0; c < s->c; c++)
        depthwise3x3_channel_s8(s, x + ((size_t)n * s->c + c) * s->h * s->w, w + (size_t)c * 9,
                                bias ? bias[c] : 0, q->in_zp, q->mult[c], q->shift[c], q->out_zp,
                                q->act_min, q->act_max, y + ((size_t)n * s->oc + c) * s->oh * s->ow);
}

/* ---- kernels whose constants the code generator prepares: `base` is the bias with the
 * input zero point folded in (bias - in_zp * sum of the channel's weights), so no kernel
 * sums weights at run time. */

/* requantization of one channel for the fast paths: acc * mult + 2^(total - 1) as one
 * 64-bit multiply-accumulate whose high word, shifted by total - 32, is the result. Exact
 * for total >= 32 (the usual case: the channel's scale is below 0.5); rq_init returns 0
 * otherwise and the caller takes requant_s8 */
typedef struct {
    int32_t mult, rhi, sh;
    uint32_t rlo;
} rq_s8;

static inline int32_t rq_init(rq_s8 *r, int32_t mult, int32_t shift) {
    int32_t total = 31 - shift;
    r->mult = mult;
    r->sh = total - 32;
    r->rlo = total == 32 ? 0x80000000u : 0u;
    r->rhi = total > 32 ? (int32_t)1 << (total - 33) : 0;
    return total >= 32;
}

static inline int32_t rq_apply(int32_t acc, int32_t mult, uint32_t rlo, int32_t rhi, int32_t sh, int32_t ozp,
                               int32_t lo, int32_t hi) {
    int64_t p = (int64_t)(((uint64_t)(uint32_t)rhi << 32) | rlo) + (int64_t)acc * mult;
    int32_t r = ((int32_t)(p >> 32) >> sh) + ozp;
    r = r < lo ? lo : r;
    return r > hi ? hi : r;
}

/* four int8 as one word, on any target (the DSP build's load4 is in gr_dsp.h) */
static inline uint32_t word4(const int8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if defined(__ARM_FEATURE_DSP)
#define SX_LO(v) __sxtb16(v)
#define SX_HI(v) sxtb16_ror8(v)
#define DUAL(a, b, acc) __smlad((a), (b), (acc))
#define LOAD2(p, a, b) LDRD_POST(p, a, b)
#else
/* the same arithmetic in portable C: the host build runs the very same data layout */
static inline int32_t sx_lo(uint32_t v) {
    return (int32_t)(((uint32_t)(int32_t)(int8_t)(v & 0xff) & 0xffffu) | ((uint32_t)(int32_t)(int8_t)(v >> 16) << 16));
}
static inline int32_t dual(int32_t a, int32_t b, int32_t acc) {
    return acc + (int16_t)(a & 0xffff) * (int16_t)(b & 0xffff) + (a >> 16) * (b >> 16);
}
#define SX_LO(v) sx_lo(v)
#define SX_HI(v) sx_lo((v) >> 8)
#define DUAL(a, b, acc) dual((a), (b), (acc))
#define LOAD2(p, a, b) do { (a) = (p)[0]; (b) = (p)[1]; (p) += 2; } while (0)
#endif
/* halfword pairs (lo of a, lo of b) and (hi of a, hi of b) */
#define PACK_LO(a, b) ((int32_t)(((uint32_t)(a) & 0xffffu) | ((uint32_t)(b) << 16)))
#define PACK_HI(a, b) ((int32_t)(((uint32_t)(b) & 0xffff0000u) | ((uint32_t)(a) >> 16)))

/* Pointwise conv input for four output pixels as int16 channel pairs: word 4 * k + j holds
 * channels 2k and 2k + 1 of pixel j (zero past cin or past the last pixel). Contiguous
 * pixels (stride 1, all four real) take two word loads per channel pair. */
static GR_NOINLINE void pointwise_gather_s8(const gr_conv_shape *s, const int8_t *xn, int32_t p, int32_t end,
                                            int32_t cin4, int32_t *xs) {
    const int32_t hw = s->h * s->w, cin = s->c, ohw = end;
    int32_t c, j;
    if (s->sh == 1 && s->sw == 1 && p + 4 <= ohw) {
        const int8_t *xc = xn + p;
        for (c = 0; c + 1 < cin; c += 2, xc += 2 * hw, xs += 4) {
            uint32_t v0 = word4(xc), v1 = word4(xc + hw);
            int32_t e0 = SX_LO(v0), d0 = SX_HI(v0), e1 = SX_LO(v1), d1 = SX_HI(v1);
            xs[0] = PACK_LO(e0, e1); xs[1] = PACK_LO(d0, d1);
            xs[2] = PACK_HI(e0, e1); xs[3] = PACK_HI(d0, d1);
        }
        if (c < cin) {
            for (j = 0; j < 4; j++) xs[j] = (int32_t)((uint32_t)(int32_t)xc[j] & 0xffffu);
            xs += 4; c += 2;
        }
    } else {
        int32_t idx[4], n = ohw - p < 4 ? ohw - p : 4;
        for (j = 0; j < 4; j++) {
            int32_t q = p + (j < n ? j : 0);
            idx[j] = (q / s->ow) * s->sh * s->w + (q % s->ow) * s->sw;
        }
        for (c = 0; c < cin; c += 2, xs += 4)
            for (j = 0; j < 4; j++) {
                int32_t a = j < n ? xn[(size_t)c * hw + idx[j]] : 0;
                int32_t b = j < n && c + 1 < cin ? xn[(size_t)(c + 1) * hw + idx[j]] : 0;
                xs[j] = PACK_LO(a, b);
            }
    }
    for (; c < cin4; c += 2, xs += 4) xs[0] = xs[1] = xs[2] = xs[3] = 0;
}

/* four pixels of one output channel: w holds cin4 weights as groups (c0, c2, c1, c3), so
 * SXTB16 gives the pairs (c0, c1) and (c2, c3) that meet the gathered input pairs */
static GR_NOINLINE void pointwise_block_s8(const int32_t *xs, const int8_t *w, int32_t groups, int32_t *acc) {
    int32_t a0 = acc[0], a1 = a0, a2 = a0, a3 = a0, g;
    for (g = 0; g < groups; g++, w += 4) {
        uint32_t wv = word4(w);
        int32_t wa = SX_LO(wv), wb = SX_HI(wv), x0, x1;
        LOAD2(xs, x0, x1); a0 = DUAL(wa, x0, a0); a1 = DUAL(wa, x1, a1);
        LOAD2(xs, x0, x1); a2 = DUAL(wa, x0, a2); a3 = DUAL(wa, x1, a3);
        LOAD2(xs, x0, x1); a0 = DUAL(wb, x0, a0); a1 = DUAL(wb, x1, a1);
        LOAD2(xs, x0, x1); a2 = DUAL(wb, x0, a2); a3 = DUAL(wb, x1, a3);
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

/* one output row of a depthwise 3x3 over the zero-point-padded plane: row r0 (stride pw
 * bytes), horizontal stride sw. wp[k] = (w[3k], w[3k + 2]) as halfwords, wm = (w1, w4), w7. */
typedef struct {
    int32_t wp0, wp1, wp2, wm, w7, base;
} dw_taps;

#define DW_FAST(ACC) (int8_t)rq_apply((ACC), r->mult, r->rlo, r->rhi, r->sh, ozp, lo, hi)
#define DW_SLOW(ACC) requant_s8((ACC), mult, total, ozp, lo, hi)
/* stride 1: the word at r + k holds x_k .. x_k+3: its even bytes (x_k, x_k+2) meet (w0, w2)
 * for output k, its odd bytes (x_k+1, x_k+3) for output k + 1; the middle taps take one
 * SMLAxy each. Two outputs per three word loads. */
#define DW_ROW_S1(REQ)                                                                           \
    for (; ox + 1 < ow; ox += 2, r0 += 2) {                                                      \
        int32_t a0 = t->base, a1 = a0, e, d;                                                     \
        uint32_t v = word4(r0);                                                                  \
        e = SX_LO(v); d = SX_HI(v);                                                              \
        a0 = DUAL(t->wp0, e, a0); a1 = DUAL(t->wp0, d, a1);                                      \
        a0 = MID_B(t->wm, d, a0); a1 = MID_T(t->wm, e, a1);                                      \
        v = word4(r0 + d1);                                                                      \
        e = SX_LO(v); d = SX_HI(v);                                                              \
        a0 = DUAL(t->wp1, e, a0); a1 = DUAL(t->wp1, d, a1);                                      \
        a0 = MID_TB(t->wm, d, a0); a1 = MID_TT(t->wm, e, a1);                                    \
        v = word4(r0 + d2);                                                                      \
        e = SX_LO(v); d = SX_HI(v);                                                              \
        a0 = DUAL(t->wp2, e, a0); a1 = DUAL(t->wp2, d, a1);                                      \
        a0 = MID_B(t->w7, d, a0); a1 = MID_T(t->w7, e, a1);                                      \
        yr[ox] = REQ(a0); yr[ox + 1] = REQ(a1);                                                  \
    }
/* any stride (and stride 1's odd last output): one word load per row per output */
#define DW_ROW_ANY(REQ)                                                                          \
    for (; ox < ow; ox++, r0 += sw) {                                                            \
        int32_t a = t->base, e, d;                                                               \
        uint32_t v = word4(r0);                                                                  \
        e = SX_LO(v); d = SX_HI(v);                                                              \
        a = DUAL(t->wp0, e, a); a = MID_B(t->wm, d, a);                                          \
        v = word4(r0 + d1);                                                                      \
        e = SX_LO(v); d = SX_HI(v);                                                              \
        a = DUAL(t->wp1, e, a); a = MID_TB(t->wm, d, a);                                         \
        v = word4(r0 + d2);                                                                      \
        e = SX_LO(v); d = SX_HI(v);                                                              \
        a = DUAL(t->wp2, e, a); a = MID_B(t->w7, d, a);                                          \
        yr[ox] = REQ(a);                                                                         \
    }
#if defined(__ARM_FEATURE_DSP)
#define MID_B(w, x, a) SMLABB((w), (x), (a))
#define MID_T(w, x, a) SMLABT((w), (x), (a))
#define MID_TB(w, x, a) SMLATB((w), (x), (a))
#define MID_TT(w, x, a) SMLATT((w), (x), (a))
#else
#define MID_B(w, x, a) ((a) + (int16_t)((w) & 0xffff) * (int16_t)((x) & 0xffff))
#define MID_T(w, x, a) ((a) + (int16_t)((w) & 0xffff) * ((x) >> 16))
#define MID_TB(w, x, a) ((a) + ((w) >> 16) * (int16_t)((x) & 0xffff))
#define MID_TT(w, x, a) ((a) + ((w) >> 16) * ((x) >> 16))
#endif

static GR_NOINLINE void dw_row_fast_s8(const int8_t *r0, int32_t d1, int32_t d2, int32_t sw, int32_t ow, const dw_taps *t,
                                       const rq_s8 *r, int32_t ozp, int32_t lo, int32_t hi, int8_t *yr) {
    int32_t ox = 0;
    if (sw == 1) {
        DW_ROW_S1(DW_FAST)
    }
    DW_ROW_ANY(DW_FAST)
}

static GR_NOINLINE void dw_row_slow_s8(const int8_t *r0, int32_t d1, int32_t d2, int32_t sw, int32_t ow, const dw_taps *t,
                                       int32_t mult, int32_t total, int32_t ozp, int32_t lo, int32_t hi,
                                       int8_t *yr) {
    int32_t ox = 0;
    if (sw == 1) {
        DW_ROW_S1(DW_SLOW)
    }
    DW_ROW_ANY(DW_SLOW)
}

static void depthwise_pad_init(const gr_conv_shape *s, int32_t in_zp, int8_t *pad) {
    memset(pad, in_zp, (size_t)((s->oh - 1) * s->sh + 3) * ((s->ow - 1) * s->sw + 3) + 4);
}

static void dw_taps_init(dw_taps *t, const int8_t *wc, int32_t base) {
    t->wp0 = PACK_LO(wc[0], wc[2]); t->wp1 = PACK_LO(wc[3], wc[5]); t->wp2 = PACK_LO(wc[6], wc[8]);
    t->wm = PACK_LO(wc[1], wc[4]); t->w7 = wc[7]; t->base = base;
}

/* `rows` output rows of channel c: row i reads the padded rows at r0 + i * step, + d1, + d2 */
static void depthwise_rows_s8(const gr_conv_shape *s, const gr_quant_params *q, int32_t c, const dw_taps *t,
                              const int8_t *r0, int32_t d1, int32_t d2, int32_t step, int32_t rows, int8_t *yc) {
    const int32_t ozp = q->out_zp, lo = q->act_min, hi = q->act_max;
    int32_t i;
    rq_s8 r;
    if (rq_init(&r, q->mult[c], q->shift[c])) {
        for (i = 0; i < rows; i++, r0 += step, yc += s->ow)
            dw_row_fast_s8(r0, d1, d2, s->sw, s->ow, t, &r, ozp, lo, hi, yc);
    } else {
        for (i = 0; i < rows; i++, r0 += step, yc += s->ow)
            dw_row_slow_s8(r0, d1, d2, s->sw, s->ow, t, q->mult[c], 31 - q->shift[c], ozp, lo, hi, yc);
    }
}

/* one channel: plane xc into pad's interior (its border already holds the zero point), then
 * every output row from pad; base: the bias with the zero point folded in */
static void depthwise_plane_s8(const gr_conv_shape *s, const gr_quant_params *q, int32_t c, const int8_t *xc,
                               const int8_t *wc, int32_t base, int8_t *yc, int8_t *pad) {
    const int32_t ph = (s->oh - 1) * s->sh + 3, pw = (s->ow - 1) * s->sw + 3;
    const int32_t y0 = s->ph, x0 = s->pw;  /* where input pixel (0, 0) lands in pad */
    const int32_t rows = s->h < ph - y0 ? s->h : ph - y0, cols = s->w < pw - x0 ? s->w : pw - x0;
    int32_t iy;
    dw_taps t;
    for (iy = 0; iy < rows; iy++) memcpy(pad + (size_t)(iy + y0) * pw + x0, xc + (size_t)iy * s->w, (size_t)cols);
    dw_taps_init(&t, wc, base);
    depthwise_rows_s8(s, q, c, &t, pad, pw, 2 * pw, s->sh * pw, s->oh, yc);
}

/* Depthwise 3x3, dilation 1, any stride and padding. Each input plane is copied into
 * `pad` ((oh - 1) * sh + 3 rows of (ow - 1) * sw + 3 bytes, + 4), whose border holds the
 * input zero point (real 0, cancelled by the folded base), so every output takes the same
 * path. y may start at x (in place): output plane c covers input planes <= c only, and
 * plane c is in `pad` before output plane c is written. */
void gr_depthwise3x3_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x, const int8_t *w,
                        const int32_t *base, int8_t *y, int8_t *pad) {
    int32_t n, c;
    depthwise_pad_init(s, q->in_zp, pad);
    for (n = 0; n < s->n; n++) for (c = 0; c < s->c; c++) {
        const size_t plane = (size_t)n * s->c + c;
        depthwise_plane_s8(s, q, c, x + plane * s->h * s->w, w + (size_t)c * 9, base[c], y + plane * s->oh * s->ow,
                           pad);
    }
}

/* ---- pointwise convs over gathered four-pixel blocks, dense or N:M packed (the format
 * of gr_pw_weights, prepared by the code generator):
 * - GR_PW_DENSE: gr_pointwise_s8's weights; the gather holds int16 channel pairs;
 * - GR_PW_NM1 (n:m with n / m <= 1/4): one word per kept weight, the weight as int16 in the
 *   low half (SMLABB / SMLABT read it as it is) and the byte offset of its channel's
 *   gathered pixels (8 * channel) in the high half; the gather holds, per channel, the four
 *   pixels as int16 pairs (p0, p1), (p2, p3);
 * - GR_PW_NM24 (2:4): one word per group of four channels, bytes (wa, idx, wb, 0): SXTB16
 *   gives the kept pair (wa, wb) as int16, idx = 6 * (group % 4) + pattern picks the pair's
 *   gathered words; the gather holds, per group, the six channel pairs (0,1) (2,3) (0,2)
 *   (1,3) (0,3) (1,2) of the four pixels, so SMLAD takes a kept pair in one instruction.
 * Rows hold `count` words (1:M: padded with zero weights to the row with most kept ones). */
static const uint8_t nm24_pairs[6][2] = {{0, 1}, {2, 3}, {0, 2}, {1, 3}, {0, 3}, {1, 2}};

/* one channel's pixels p .. p + 3 of a 1x1 conv's input (zero past the last pixel) */
static inline void pixels4(const gr_conv_shape *s, const int8_t *xc, int32_t p, int32_t end, int32_t v[4]) {
    int32_t j;
    for (j = 0; j < 4; j++) {
        const int32_t q = p + j;
        v[j] = q < end ? xc[(q / s->ow) * s->sh * s->w + (q % s->ow) * s->sw] : 0;
    }
}

static GR_NOINLINE void nm1_gather_s8(const gr_conv_shape *s, const int8_t *xn, int32_t p, int32_t end,
                                      int32_t *xs) {
    const int32_t hw = s->h * s->w;
    int32_t c, v[4];
    if (s->sh == 1 && s->sw == 1 && p + 4 <= end) {
        const int8_t *xc = xn + p;
        for (c = 0; c < s->c; c++, xc += hw, xs += 2) {
            const uint32_t w4 = word4(xc);
            const int32_t e = SX_LO(w4), d = SX_HI(w4);   /* (p0, p2), (p1, p3) */
            xs[0] = PACK_LO(e, d); xs[1] = PACK_HI(e, d);
        }
        return;
    }
    for (c = 0; c < s->c; c++, xs += 2) {
        pixels4(s, xn + (size_t)c * hw, p, end, v);
        xs[0] = PACK_LO(v[0], v[1]); xs[1] = PACK_LO(v[2], v[3]);
    }
}

static GR_NOINLINE void nm24_gather_s8(const gr_conv_shape *s, const int8_t *xn, int32_t p, int32_t end,
                                       int32_t *xs) {
    const int32_t hw = s->h * s->w, fast = s->sh == 1 && s->sw == 1 && p + 4 <= end;
    int32_t c0, i, k;
    for (c0 = 0; c0 < s->c; c0 += 4) {
        int32_t e[4], d[4];   /* per channel: pixels (p0, p2) and (p1, p3) as int16 pairs */
        for (i = 0; i < 4; i++) {
            const int8_t *xc = xn + (size_t)(c0 + i) * hw;
            if (c0 + i >= s->c) {
                e[i] = d[i] = 0;
            } else if (fast) {
                const uint32_t w4 = word4(xc + p);
                e[i] = SX_LO(w4); d[i] = SX_HI(w4);
            } else {
                int32_t v[4];
                pixels4(s, xc, p, end, v);
                e[i] = PACK_LO(v[0], v[2]); d[i] = PACK_LO(v[1], v[3]);
            }
        }
        for (k = 0; k < 6; k++, xs += 4) {
            const int32_t a = nm24_pairs[k][0], b = nm24_pairs[k][1];
            xs[0] = PACK_LO(e[a], e[b]); xs[1] = PACK_LO(d[a], d[b]);
            xs[2] = PACK_HI(e[a], e[b]); xs[3] = PACK_HI(d[a], d[b]);
        }
    }
}

/* four pixels of one output channel, `count` entries */
#define NM1_STEP(E)                                                                             \
    {                                                                                           \
        const int32_t v = (int32_t)(E);                                                         \
        const int32_t *xp = (const int32_t *)(const void *)(xb + ((uint32_t)v >> 16));           \
        const int32_t x01 = xp[0], x23 = xp[1];                                                 \
        a0 = MID_B(v, x01, a0); a1 = MID_T(v, x01, a1);                                         \
        a2 = MID_B(v, x23, a2); a3 = MID_T(v, x23, a3);                                         \
    }
static GR_NOINLINE void nm1_block_s8(const int32_t *xs, const int8_t *w, int32_t count, int32_t *acc) {
    const uint32_t *e = (const uint32_t *)(const void *)w;
    const int8_t *xb = (const int8_t *)xs;
    int32_t a0 = acc[0], a1 = a0, a2 = a0, a3 = a0, t;
    for (t = 0; t + 3 < count; t += 4, e += 4) {
        NM1_STEP(e[0]) NM1_STEP(e[1]) NM1_STEP(e[2]) NM1_STEP(e[3])
    }
    for (; t < count; t++, e++) NM1_STEP(e[0])
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

#define NM24_STEP(E)                                                                            \
    {                                                                                           \
        const uint32_t v = (E);                                                                 \
        const int32_t wab = SX_LO(v);                                                           \
        const int32_t *xp = xg + (((v >> 8) & 0xffu) << 2);                                     \
        a0 = DUAL(wab, xp[0], a0); a1 = DUAL(wab, xp[1], a1);                                   \
        a2 = DUAL(wab, xp[2], a2); a3 = DUAL(wab, xp[3], a3);                                   \
    }
static GR_NOINLINE void nm24_block_s8(const int32_t *xs, const int8_t *w, int32_t count, int32_t *acc) {
    const uint32_t *e = (const uint32_t *)(const void *)w;
    const int32_t *xg = xs;
    int32_t a0 = acc[0], a1 = a0, a2 = a0, a3 = a0, g;
    for (g = 0; g + 3 < count; g += 4, e += 4, xg += 4 * 24) {
        NM24_STEP(e[0]) NM24_STEP(e[1]) NM24_STEP(e[2]) NM24_STEP(e[3])
    }
    for (; g < count; g++, e++) NM24_STEP(e[0])   /* idx counts from the last block of four */
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

typedef void (*pw_block_fn)(const int32_t *xs, const int8_t *w, int32_t count, int32_t *acc);

/* output channels o0 .. o1 - 1 of one gathered block of four pixels (cnt of them real):
 * channel o goes to yo + (o - o0) * ystride */
static GR_NOINLINE void pointwise_outputs_s8(const gr_quant_params *q, const gr_pw_weights *pw, const int32_t *xs,
                                 int32_t o0, int32_t o1, int32_t cnt, int8_t *yo, int32_t ystride) {
    const int32_t ozp = q->out_zp, lo = q->act_min, hi = q->act_max, count = pw->count, stride = pw->stride;
    const pw_block_fn block = pw->fmt == GR_PW_NM1 ? nm1_block_s8 : pw->fmt == GR_PW_NM24 ? nm24_block_s8
                                                                                         : pointwise_block_s8;
    const int8_t *wo = (const int8_t *)pw->w + (size_t)o0 * stride;
    int32_t o, j;
    for (o = o0; o < o1; o++, wo += stride, yo += ystride) {
        int32_t acc[4];
        rq_s8 r;
        acc[0] = pw->base[o];
        block(xs, wo, count, acc);
        if (rq_init(&r, q->mult[o], q->shift[o])) {
            if (cnt == 4) {
                yo[0] = (int8_t)rq_apply(acc[0], r.mult, r.rlo, r.rhi, r.sh, ozp, lo, hi);
                yo[1] = (int8_t)rq_apply(acc[1], r.mult, r.rlo, r.rhi, r.sh, ozp, lo, hi);
                yo[2] = (int8_t)rq_apply(acc[2], r.mult, r.rlo, r.rhi, r.sh, ozp, lo, hi);
                yo[3] = (int8_t)rq_apply(acc[3], r.mult, r.rlo, r.rhi, r.sh, ozp, lo, hi);
            } else {
                for (j = 0; j < cnt; j++) yo[j] = (int8_t)rq_apply(acc[j], r.mult, r.rlo, r.rhi, r.sh, ozp, lo, hi);
            }
        } else {
            for (j = 0; j < cnt; j++) yo[j] = requant_s8(acc[j], q->mult[o], 31 - q->shift[o], ozp, lo, hi);
        }
    }
}

/* output pixels p0 .. p1 - 1 of image xn, every channel: pixel p of channel o goes to
 * y[o * ystride + p - p0] */
static void pointwise_pass_s8(const gr_conv_shape *s, const gr_quant_params *q, const gr_pw_weights *pw,
                              const int8_t *xn, int32_t p0, int32_t p1, int8_t *y, int32_t ystride, int32_t *xs) {
    const int32_t cin4 = (s->c + 3) & ~3;
    int32_t p;
    for (p = p0; p < p1; p += 4) {
        if (pw->fmt == GR_PW_NM1) nm1_gather_s8(s, xn, p, p1, xs);
        else if (pw->fmt == GR_PW_NM24) nm24_gather_s8(s, xn, p, p1, xs);
        else pointwise_gather_s8(s, xn, p, p1, cin4, xs);
        pointwise_outputs_s8(q, pw, xs, 0, s->oc, p1 - p < 4 ? p1 - p : 4, y + (p - p0), ystride);
    }
}

/* 1x1, no padding, one group, any stride; pw dense or N:M (see above) */
void gr_pointwise_nm_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x, const gr_pw_weights *pw,
                        int8_t *y, int32_t *xs) {
    const int32_t ohw = s->oh * s->ow;
    int32_t n;
    for (n = 0; n < s->n; n++)
        pointwise_pass_s8(s, q, pw, x + (size_t)n * s->c * s->h * s->w, 0, ohw, y + (size_t)n * s->oc * ohw, ohw, xs);
}

void gr_pointwise_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x, const int8_t *w,
                     const int32_t *base, int8_t *y, int32_t *xs) {
    gr_pw_weights pw;
    pw.fmt = GR_PW_DENSE; pw.count = (s->c + 3) >> 2; pw.stride = (s->c + 3) & ~3; pw.w = w; pw.base = base;
    gr_pointwise_nm_s8(s, q, x, &pw, y, xs);
}

/* A pointwise (1x1, stride 1) expand conv followed by a depthwise 3x3, row by row: `ring`
 * holds three zero-point-padded rows of every expanded channel (size: gr_kernels.h); the
 * expand (gr_pointwise_nm_s8's gathered four-pixel blocks, dense or N:M weights, every
 * channel per gather) writes each input row the depthwise needs next straight into its
 * ring slot, and the depthwise (gr_depthwise3x3_s8's row path) reads its three rows from
 * there, so the expanded tensor never exists and no plane is copied. Same integer
 * arithmetic as the two kernels one after the other. xs: the pointwise's gather. */
void gr_pw_dw_s8(const gr_conv_shape *ps, const gr_quant_params *pq, const int8_t *x, const gr_pw_weights *pw,
                 const gr_conv_shape *ds, const gr_quant_params *dq, const int8_t *dw, const int32_t *dbase, int8_t *y,
                 int8_t *ring, int32_t *xs) {
    const int32_t w = ps->w, oc = ps->oc, dhw = ds->oh * ds->ow;
    const int32_t pitch = (ds->ow - 1) * ds->sw + 3 > ds->pw + w ? (ds->ow - 1) * ds->sw + 3 : ds->pw + w;
    const int32_t cs = 3 * pitch;   /* ring: [oc][3 slots][pitch] */
    int32_t n, oy, o;
    for (n = 0; n < ps->n; n++) {
        const int8_t *xn = x + (size_t)n * ps->c * ps->h * w;
        int32_t next = 0;   /* the next padded row to produce */
        memset(ring, dq->in_zp, (size_t)oc * cs + 4);
        for (oy = 0; oy < ds->oh; oy++) {
            const int32_t top = oy * ds->sh, s0 = top % 3;
            for (; next <= top + 2; next++) {
                int8_t *slot = ring + (size_t)(next % 3) * pitch;
                const int32_t iy = next - ds->ph;
                if (iy >= 0 && iy < ds->h) {
                    pointwise_pass_s8(ps, pq, pw, xn, iy * w, iy * w + w, slot + ds->pw, cs, xs);
                } else {
                    for (o = 0; o < oc; o++) memset(slot + (size_t)o * cs, dq->in_zp, (size_t)pitch);
                }
            }
            for (o = 0; o < oc; o++) {
                dw_taps t;
                dw_taps_init(&t, dw + (size_t)o * 9, dbase[o]);
                depthwise_rows_s8(ds, dq, o, &t, ring + (size_t)o * cs + (size_t)s0 * pitch,
                                  ((top + 1) % 3 - s0) * pitch, ((top + 2) % 3 - s0) * pitch, 0, 1,
                                  y + ((size_t)n * oc + o) * dhw + (size_t)oy * ds->ow);
            }
        }
    }
}

void gr_base_s8(const int32_t *bias, const int32_t *zterm, int32_t n, int32_t *base) {
    int32_t o;
    for (o = 0; o < n; o++) base[o] = (int32_t)((uint32_t)bias[o] + (uint32_t)zterm[o]);
}

/* Fully connected layer: y[i, j] = requant(base[j] + sum_t x[i, t] w[j, t]). The columns
 * go in groups of four (a last group of 1-2 in a group of two; absent columns have zero
 * weights and are not stored). A group's weights are interleaved by the code generator:
 * for each four t, four bytes of each of its columns, then the k % 4 tail column by
 * column, so one pointer walks them with LDRD. x and the weights are both contiguous along
 * t: SXTB16 of either gives (t, t + 2) and (t + 1, t + 3), which SMLAD pairs. */
static GR_NOINLINE void fc_cols4_s8(const int8_t *x, const int32_t *w, int32_t k, int32_t *acc) {
    int32_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], t, u;
    for (t = 0; t + 3 < k; t += 4) {
        uint32_t xv = word4(x + t);
        int32_t xe = SX_LO(xv), xd = SX_HI(xv), v0, v1;
        LOAD2(w, v0, v1);
        a0 = DUAL(xe, SX_LO(v0), a0); a0 = DUAL(xd, SX_HI(v0), a0);
        a1 = DUAL(xe, SX_LO(v1), a1); a1 = DUAL(xd, SX_HI(v1), a1);
        LOAD2(w, v0, v1);
        a2 = DUAL(xe, SX_LO(v0), a2); a2 = DUAL(xd, SX_HI(v0), a2);
        a3 = DUAL(xe, SX_LO(v1), a3); a3 = DUAL(xd, SX_HI(v1), a3);
    }
    if (t < k) {
        const int8_t *wt = (const int8_t *)w;
        const int32_t r = k - t;
        for (u = 0; u < r; u++) {
            const int32_t xv = x[t + u];
            a0 += xv * wt[u]; a1 += xv * wt[r + u]; a2 += xv * wt[2 * r + u]; a3 += xv * wt[3 * r + u];
        }
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

static GR_NOINLINE void fc_cols2_s8(const int8_t *x, const int32_t *w, int32_t k, int32_t *acc) {
    int32_t a0 = acc[0], a1 = acc[1], t, u;
    for (t = 0; t + 3 < k; t += 4) {
        uint32_t xv = word4(x + t);
        int32_t xe = SX_LO(xv), xd = SX_HI(xv), v0, v1;
        LOAD2(w, v0, v1);
        a0 = DUAL(xe, SX_LO(v0), a0); a0 = DUAL(xd, SX_HI(v0), a0);
        a1 = DUAL(xe, SX_LO(v1), a1); a1 = DUAL(xd, SX_HI(v1), a1);
    }
    if (t < k) {
        const int8_t *wt = (const int8_t *)w;
        const int32_t r = k - t;
        for (u = 0; u < r; u++) { a0 += x[t + u] * wt[u]; a1 += x[t + u] * wt[r + u]; }
    }
    acc[0] = a0; acc[1] = a1;
}

/* y8 = requant(acc) by q (gr_fc_s8), or yf = (float)acc * scale[j] (gr_fc_s8_f32) */
static void fc_s8(const gr_quant_params *q, const float *scale, const int8_t *x, const int8_t *w,
                  const int32_t *base, int8_t *y8, float *yf, int32_t m, int32_t k, int32_t n) {
    const int32_t ozp = q ? q->out_zp : 0, lo = q ? q->act_min : 0, hi = q ? q->act_max : 0;
    int32_t i, j, u;
    for (i = 0; i < m; i++, x += k) {
        const int8_t *wg = w;
        for (j = 0; j < n; ) {
            const int32_t cols = n - j >= 3 ? 4 : 2, cnt = n - j < cols ? n - j : cols;
            const size_t at = (size_t)i * n + j;
            int32_t acc[4];
            for (u = 0; u < cols; u++) acc[u] = u < cnt ? base[j + u] : 0;
            if (cols == 4) fc_cols4_s8(x, (const int32_t *)(const void *)wg, k, acc);
            else fc_cols2_s8(x, (const int32_t *)(const void *)wg, k, acc);
            if (scale) {
                for (u = 0; u < cnt; u++) yf[at + u] = (float)acc[u] * scale[j + u];
            } else {
                for (u = 0; u < cnt; u++) {
                    rq_s8 r;
                    y8[at + u] = rq_init(&r, q->mult[j + u], q->shift[j + u])
                        ? (int8_t)rq_apply(acc[u], r.mult, r.rlo, r.rhi, r.sh, ozp, lo, hi)
                        : requant_s8(acc[u], q->mult[j + u], 31 - q->shift[j + u], ozp, lo, hi);
                }
            }
            /* the next group starts 4-byte aligned: the tail is padded to a word */
            wg += (size_t)cols * (((size_t)k + 3) & ~(size_t)3);
            j += cnt;
        }
    }
}

/* w: the interleaved weights (4-byte aligned); base: n entries */
void gr_fc_s8(const gr_quant_params *q, const int8_t *x, const int8_t *w, const int32_t *base, int8_t *y,
              int32_t m, int32_t k, int32_t n) {
    fc_s8(q, NULL, x, w, base, y, NULL, m, k, n);
}

/* gr_fc_s8 with a float output (a layer whose readers compute in float): y[i, j] =
 * (float)acc * scale[j], one rounding, as the integer reference */
void gr_fc_s8_f32(const int8_t *x, const int8_t *w, const int32_t *base, const float *scale, float *y,
                  int32_t m, int32_t k, int32_t n) {
    fc_s8(NULL, scale, x, w, base, NULL, y, m, k, n);
}

/* an int8 conv with a float output: y = (float)(bias[o] + sum w * (x - in_zp)) * scale[o];
 * taps in the padding (real value 0) are skipped */
void gr_conv2d_s8_f32(const gr_conv_shape *s, int32_t in_zp, const int8_t *x, const int8_t *w,
                      const int32_t *bias, const float *scale, float *y) {
    const int32_t cin_g = s->c / s->groups, cout_g = s->oc / s->groups, plane = s->h * s->w;
    int32_t n, o, oy, ox, c, ky, kx;
    for (n = 0; n < s->n; n++) for (o = 0; o < s->oc; o++) {
        const int8_t *wo = w + (size_t)o * cin_g * s->kh * s->kw;
        const int8_t *xg = x + ((size_t)n * s->c + (size_t)(o / cout_g) * cin_g) * plane;
        float *yo = y + ((size_t)n * s->oc + o) * s->oh * s->ow;
        for (oy = 0; oy < s->oh; oy++) for (ox = 0; ox < s->ow; ox++) {
            const int32_t iy0 = oy * s->sh - s->ph, ix0 = ox * s->sw - s->pw;
            int32_t acc = bias ? bias[o] : 0;
            for (c = 0; c < cin_g; c++) {
                const int8_t *xc = xg + (size_t)c * plane, *wc = wo + (size_t)c * s->kh * s->kw;
                for (ky = 0; ky < s->kh; ky++) {
                    const int32_t iy = iy0 + ky * s->dh;
                    if (iy < 0 || iy >= s->h) continue;
                    for (kx = 0; kx < s->kw; kx++) {
                        const int32_t ix = ix0 + kx * s->dw;
                        if (ix >= 0 && ix < s->w) acc += (int32_t)wc[ky * s->kw + kx] * ((int32_t)xc[iy * s->w + ix] - in_zp);
                    }
                }
            }
            yo[oy * s->ow + ox] = (float)acc * scale[o];
        }
    }
}

/* four neighbouring outputs of a 3x3 conv whose windows are all inside the input
 * columns: out k reads input columns k * sw + 0..2 of nky rows of every channel */
#define BLOCK3X3_ROW(SW)                                                                    \
    do {                                                                                    \
        int32_t w0 = wr[0], w1 = wr[1], w2 = wr[2], v;                                      \
        v = xr[0]; a0 += w0 * v;                                                            \
        v = xr[1]; a0 += w1 * v;                                                            \
        v = xr[2]; a0 += w2 * v;                                                            \
        v = xr[SW]; a1 += w0 * v;                                                           \
        v = xr[SW + 1]; a1 += w1 * v;                                                       \
        v = xr[SW + 2]; a1 += w2 * v;                                                       \
        v = xr[2 * SW]; a2 += w0 * v;                                                       \
        v = xr[2 * SW + 1]; a2 += w1 * v;                                                   \
        v = xr[2 * SW + 2]; a2 += w2 * v;                                                   \
        v = xr[3 * SW]; a3 += w0 * v;                                                       \
        v = xr[3 * SW + 1]; a3 += w1 * v;                                                   \
        v = xr[3 * SW + 2]; a3 += w2 * v;                                                   \
    } while (0)

/* nblk blocks of four neighbouring outputs along a row, requantized into yr */
#define BLOCK3X3_FN(NAME, SW)                                                               \
static GR_NOINLINE void NAME(const int8_t *xc0, const int8_t *wc0, int32_t cin, int32_t nky, \
                             int32_t row, int32_t plane, int32_t nblk, const channel_out *co, \
                             int8_t *yr) {                                                  \
    const int32_t mult = co->mult, total = co->total, ozp = co->ozp, lo = co->lo, hi = co->hi; \
    int32_t blk, c, ky;                                                                     \
    for (blk = 0; blk < nblk; blk++, xc0 += 4 * (SW), yr += 4) {                            \
        const int8_t *xc = xc0, *wc = wc0;                                                  \
        int32_t a0 = co->base, a1 = a0, a2 = a0, a3 = a0;                                   \
        for (c = 0; c < cin; c++, xc += plane, wc += 9) {                                   \
            const int8_t *xr = xc, *wr = wc;                                                \
            for (ky = 0; ky < nky; ky++, xr += row, wr += 3) BLOCK3X3_ROW(SW);               \
        }                                                                                   \
        yr[0] = requant_s8(a0, mult, total, ozp, lo, hi);                                   \
        yr[1] = requant_s8(a1, mult, total, ozp, lo, hi);                                   \
        yr[2] = requant_s8(a2, mult, total, ozp, lo, hi);                                   \
        yr[3] = requant_s8(a3, mult, total, ozp, lo, hi);                                   \
    }                                                                                       \
}
BLOCK3X3_FN(block3x3_s1, 1)
BLOCK3X3_FN(block3x3_s2, 2)

/* one output of a 3x3 conv over the window columns kx0..kx0 + nkx - 1 (the rest padded) */
static GR_NOINLINE int32_t single3x3_s8(const int8_t *xc, const int8_t *wc, int32_t cin, int32_t nky,
                                        int32_t row, int32_t plane, int32_t kx0, int32_t nkx, int32_t a) {
    int32_t c, ky, kx;
    xc += kx0; wc += kx0;
    for (c = 0; c < cin; c++, xc += plane, wc += 9) {
        const int8_t *xr = xc, *wr = wc;
        if (nkx == 3)
            for (ky = 0; ky < nky; ky++, xr += row, wr += 3) { a += wr[0] * xr[0]; a += wr[1] * xr[1]; a += wr[2] * xr[2]; }
        else if (nkx == 2)
            for (ky = 0; ky < nky; ky++, xr += row, wr += 3) { a += wr[0] * xr[0]; a += wr[1] * xr[1]; }
        else
            for (ky = 0; ky < nky; ky++, xr += row, wr += 3) for (kx = 0; kx < nkx; kx++) a += wr[kx] * xr[kx];
    }
    return a;
}

/* 3x3, dilation 1, horizontal stride 1 or 2, any groups. The zero point leaves the MAC
 * loops: sum w*(x - zp) over the taps inside the input = sum w*x - zp * (sum of those taps'
 * weights), from per-tap weight sums; padded taps (real value 0) are skipped. */
static void conv3x3_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x,
                       const int8_t *w, const int32_t *bias, int8_t *y) {
    const int32_t ozp = q->out_zp, lo = q->act_min, hi = q->act_max;
    int32_t cin_g = s->c / s->groups, cout_g = s->oc / s->groups, plane = s->h * s->w;
    int32_t n, o, oy, ox, c, ky, kx, zp = q->in_zp, sw = s->sw, W = s->w;
    for (n = 0; n < s->n; n++) for (o = 0; o < s->oc; o++) {
        const int8_t *wo = w + (size_t)o * cin_g * 9;
        const int8_t *xg = x + ((size_t)n * s->c + (size_t)(o / cout_g) * cin_g) * plane;
        int8_t *yo = y + ((size_t)n * s->oc + o) * s->oh * s->ow;
        const int32_t b = bias ? bias[o] : 0, mult = q->mult[o], total = 31 - q->shift[o];
        int32_t tap[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
        for (c = 0; c < cin_g; c++) for (ky = 0; ky < 9; ky++) tap[ky] += wo[c * 9 + ky];
        for (oy = 0; oy < s->oh; oy++) {
            int32_t iy0 = oy * s->sh - s->ph, ky0 = iy0 < 0 ? -iy0 : 0, ky1 = s->h - iy0 < 3 ? s->h - iy0 : 3;
            int32_t full = 0;
            if (ky0 > 3) ky0 = 3;
            if (ky1 < ky0) ky1 = ky0;
            for (ky = ky0; ky < ky1; ky++) full += tap[ky * 3] + tap[ky * 3 + 1] + tap[ky * 3 + 2];
            full = b - zp * full;
            for (ox = 0; ox < s->ow; ox++) {
                int32_t ix0 = ox * sw - s->pw;
                const int8_t *xc = xg + (ptrdiff_t)(iy0 + ky0) * W + ix0, *wc = wo + ky0 * 3;
                if (ix0 >= 0 && (sw == 1 || sw == 2)) {
                    /* a run of 4-output blocks whose windows are all inside the input columns */
                    int32_t nblk = 0;
                    while (ox + 4 * nblk + 3 < s->ow && ix0 + 4 * nblk * sw + 3 * sw + 2 < W) nblk++;
                    if (nblk > 0) {
                        channel_out co;
                        co.base = full; co.mult = mult; co.total = total; co.ozp = ozp; co.lo = lo; co.hi = hi;
                        if (sw == 1) block3x3_s1(xc, wc, cin_g, ky1 - ky0, W, plane, nblk, &co, yo + oy * s->ow + ox);
                        else block3x3_s2(xc, wc, cin_g, ky1 - ky0, W, plane, nblk, &co, yo + oy * s->ow + ox);
                        ox += 4 * nblk - 1;
                        continue;
                    }
                }
                {
                    int32_t kx0 = ix0 < 0 ? -ix0 : 0, kx1 = W - ix0 < 3 ? W - ix0 : 3, a = b;
                    if (kx0 > 3) kx0 = 3;
                    if (kx1 < kx0) kx1 = kx0;
                    for (ky = ky0; ky < ky1; ky++) for (kx = kx0; kx < kx1; kx++) a -= zp * tap[ky * 3 + kx];
                    a = single3x3_s8(xc, wc, cin_g, ky1 - ky0, W, plane, kx0, kx1 - kx0, a);
                    yo[oy * s->ow + ox] = requant_s8(a, mult, total, ozp, lo, hi);
                }
            }
        }
    }
}

void gr_conv2d_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x,
                  const int8_t *w, const int32_t *bias, int8_t *y) {
    const int32_t ozp = q->out_zp, lo = q->act_min, hi = q->act_max;
    int32_t cin_g = s->c / s->groups, cout_g = s->oc / s->groups;
    int32_t n, o, oy, ox, c, ky, kx, zp = q->in_zp;
    if (s->groups == s->c && s->oc == s->c && s->kh == 3 && s->kw == 3 && s->dh == 1 && s->dw == 1) {
        depthwise3x3_s8(s, q, x, w, bias, y);
        return;
    }
    if (s->kh == 1 && s->kw == 1 && s->ph == 0 && s->pw == 0 && s->groups == 1 && s->dh == 1 && s->dw == 1) {
        pointwise_s8(s, q, x, w, bias, y);
        return;
    }
    if (s->kh == 3 && s->kw == 3 && s->dh == 1 && s->dw == 1) {
        conv3x3_s8(s, q, x, w, bias, y);
        return;
    }
    for (n = 0; n < s->n; n++) {
        for (o = 0; o < s->oc; o++) {
            int32_t g = o / cout_g;
            const int8_t *wo = w + (size_t)o * cin_g * s->kh * s->kw;
            int8_t *yo = y + ((size_t)n * s->oc + o) * s->oh * s->ow;
            for (oy = 0; oy < s->oh; oy++) {
                int32_t iy0 = oy * s->sh - s->ph, ky0 = 0, ky1 = s->kh;
                while (ky0 < ky1 && iy0 + ky0 * s->dh < 0) ky0++;
                while (ky1 > ky0 && iy0 + (ky1 - 1) * s->dh >= s->h) ky1--;
                for (ox = 0; ox < s->ow; ox++) {
                    int32_t ix0 = ox * s->sw - s->pw, kx0 = 0, kx1 = s->kw;
                    int32_t acc = bias ? bias[o] : 0;
                    while (kx0 < kx1 && ix0 + kx0 * s->dw < 0) kx0++;
                    while (kx1 > kx0 && ix0 + (kx1 - 1) * s->dw >= s->w) kx1--;
                    /* padded pixels hold the real value 0 and contribute nothing */
                    if (s->kw == 3 && s->dw == 1 && s->sw == 1 && ox + 3 < s->ow && ix0 >= 0 && ix0 + 5 < s->w) {
                        /* four neighbouring outputs with full 3-wide windows share their loads */
                        int32_t a0 = acc, a1 = acc, a2 = acc, a3 = acc;
                        for (c = 0; c < cin_g; c++) {
                            const int8_t *xc = x + (((size_t)n * s->c + (size_t)g * cin_g + c) * s->h) * s->w + ix0;
                            const int8_t *wc = wo + (size_t)c * s->kh * 3;
                            for (ky = ky0; ky < ky1; ky++) {
                                const int8_t *xr = xc + (size_t)(iy0 + ky * s->dh) * s->w;
                                const int32_t w0 = wc[ky * 3], w1 = wc[ky * 3 + 1], w2 = wc[ky * 3 + 2];
                                const int32_t x0 = xr[0] - zp, x1 = xr[1] - zp, x2 = xr[2] - zp;
                                const int32_t x3 = xr[3] - zp, x4 = xr[4] - zp, x5 = xr[5] - zp;
                                a0 += w0 * x0 + w1 * x1 + w2 * x2;
                                a1 += w0 * x1 + w1 * x2 + w2 * x3;
                                a2 += w0 * x2 + w1 * x3 + w2 * x4;
                                a3 += w0 * x3 + w1 * x4 + w2 * x5;
                            }
                        }
                        yo[oy * s->ow + ox] = requant_s8(a0, q->mult[o], 31 - q->shift[o], ozp, lo, hi);
                        yo[oy * s->ow + ox + 1] = requant_s8(a1, q->mult[o], 31 - q->shift[o], ozp, lo, hi);
                        yo[oy * s->ow + ox + 2] = requant_s8(a2, q->mult[o], 31 - q->shift[o], ozp, lo, hi);
                        yo[oy * s->ow + ox + 3] = requant_s8(a3, q->mult[o], 31 - q->shift[o], ozp, lo, hi);
                        ox += 3;
                        continue;
                    }
                    if (kx0 == 0 && kx1 == 3 && s->kw == 3 && s->dw == 1) {
                        for (c = 0; c < cin_g; c++) {
                            const int8_t *xc = x + (((size_t)n * s->c + (size_t)g * cin_g + c) * s->h) * s->w + ix0;
                            const int8_t *wc = wo + (size_t)c * s->kh * 3;
                            for (ky = ky0; ky < ky1; ky++) {
                                const int8_t *xr = xc + (size_t)(iy0 + ky * s->dh) * s->w;
                                const int8_t *wr = wc + ky * 3;
                                acc += (int32_t)wr[0] * ((int32_t)xr[0] - zp) + (int32_t)wr[1] * ((int32_t)xr[1] - zp)
                                     + (int32_t)wr[2] * ((int32_t)xr[2] - zp);
                            }
                        }
                        yo[oy * s->ow + ox] = requant_s8(acc, q->mult[o], 31 - q->shift[o], ozp, lo, hi);
                        continue;
                    }
                    for (c = 0; c < cin_g; c++) {
                        const int8_t *xc = x + (((size_t)n * s->c + (size_t)g * cin_g + c) * s->h) * s->w;
                        const int8_t *wc = wo + (size_t)c * s->kh * s->kw;
                        for (ky = ky0; ky < ky1; ky++) {
                            const int8_t *xr = xc + (size_t)(iy0 + ky * s->dh) * s->w + ix0;
                            const int8_t *wr = wc + ky * s->kw;
                            for (kx = kx0; kx < kx1; kx++) acc += (int32_t)wr[kx] * ((int32_t)xr[kx * s->dw] - zp);
                        }
                    }
                    yo[oy * s->ow + ox] = requant_s8(acc, q->mult[o], 31 - q->shift[o], ozp, lo, hi);
                }
            }
        }
    }
}

/* y[i, j] for rows i..i+1 (two_rows) and columns j, j+1: x rows and w rows are both
 * contiguous along k, so one word holds four k of either; SMLAD pairs k and k + 2 */
#if defined(__ARM_FEATURE_DSP)
static void linear_block_s8(const int8_t *x0, const int8_t *x1, int32_t two_rows, const int8_t *w0,
                            const int8_t *w1, int32_t k, int32_t *acc) {
    int32_t a00 = acc[0], a01 = acc[1], a10 = acc[2], a11 = acc[3], t = 0;
    for (; t + 3 < k; t += 4) {
        uint32_t wv0 = load4(w0 + t), wv1 = load4(w1 + t), xv = load4(x0 + t);
        int32_t we0 = __sxtb16(wv0), wd0 = sxtb16_ror8(wv0);
        int32_t we1 = __sxtb16(wv1), wd1 = sxtb16_ror8(wv1);
        int32_t xe = __sxtb16(xv), xd = sxtb16_ror8(xv);
        a00 = __smlad(xe, we0, a00); a00 = __smlad(xd, wd0, a00);
        a01 = __smlad(xe, we1, a01); a01 = __smlad(xd, wd1, a01);
        if (two_rows) {
            xv = load4(x1 + t);
            xe = __sxtb16(xv); xd = sxtb16_ror8(xv);
            a10 = __smlad(xe, we0, a10); a10 = __smlad(xd, wd0, a10);
            a11 = __smlad(xe, we1, a11); a11 = __smlad(xd, wd1, a11);
        }
    }
    for (; t < k; t++) {
        a00 += w0[t] * x0[t]; a01 += w1[t] * x0[t];
        if (two_rows) { a10 += w0[t] * x1[t]; a11 += w1[t] * x1[t]; }
    }
    acc[0] = a00; acc[1] = a01; acc[2] = a10; acc[3] = a11;
}
#endif

void gr_linear_s8(const gr_quant_params *q, const int8_t *x, const int8_t *w,
                  const int32_t *bias, int8_t *y, int32_t m, int32_t k, int32_t n) {
    const int32_t ozp = q->out_zp, lo = q->act_min, hi = q->act_max;
    int32_t i, j = 0, t, zp = q->in_zp;
#if defined(__ARM_FEATURE_DSP)
    /* two output columns at a time; sum w*(x - zp) = sum w*x - zp * sum w */
    for (; j + 1 < n; j += 2) {
        const int8_t *w0 = w + (size_t)j * k, *w1 = w0 + k;
        int32_t s0 = 0, s1 = 0;
        for (t = 0; t < k; t++) { s0 += w0[t]; s1 += w1[t]; }
        const int32_t b0 = (bias ? bias[j] : 0) - zp * s0, b1 = (bias ? bias[j + 1] : 0) - zp * s1;
        const int32_t m0 = q->mult[j], t0 = 31 - q->shift[j], m1 = q->mult[j + 1], t1 = 31 - q->shift[j + 1];
        for (i = 0; i < m; i += 2) {
            const int8_t *x0 = x + (size_t)i * k;
            int32_t two = i + 1 < m, acc[4];
            acc[0] = b0; acc[1] = b1; acc[2] = b0; acc[3] = b1;
            linear_block_s8(x0, x0 + k, two, w0, w1, k, acc);
            y[(size_t)i * n + j] = requant_s8(acc[0], m0, t0, ozp, lo, hi);
            y[(size_t)i * n + j + 1] = requant_s8(acc[1], m1, t1, ozp, lo, hi);
            if (two) {
                y[(size_t)(i + 1) * n + j] = requant_s8(acc[2], m0, t0, ozp, lo, hi);
                y[(size_t)(i + 1) * n + j + 1] = requant_s8(acc[3], m1, t1, ozp, lo, hi);
            }
        }
    }
#endif
    for (; j < n; j++) {
        const int8_t *wj = w + (size_t)j * k;
        const int32_t mult = q->mult[j], total = 31 - q->shift[j];
        int32_t wsum = 0;
        for (t = 0; t < k; t++) wsum += wj[t];
        const int32_t base = (bias ? bias[j] : 0) - zp * wsum;
        for (i = 0; i < m; i++) {
            const int8_t *xi = x + (size_t)i * k;
            int32_t acc = base;
            for (t = 0; t < k; t++) acc += (int32_t)wj[t] * (int32_t)xi[t];
            y[(size_t)i * n + j] = requant_s8(acc, mult, total, ozp, lo, hi);
        }
    }
}

void gr_max_pool2d_s8(const gr_pool_shape *s, const int8_t *x, int8_t *y) {
    int32_t c, oy, ox, ky, kx;
    for (c = 0; c < s->nc; c++) {
        const int8_t *xc = x + (size_t)c * s->h * s->w;
        for (oy = 0; oy < s->oh; oy++) for (ox = 0; ox < s->ow; ox++) {
            int32_t mx = -128;
            for (ky = 0; ky < s->kh; ky++) {
                int32_t iy = oy * s->sh - s->ph + ky * s->dh;
                if (iy < 0 || iy >= s->h) continue;
                for (kx = 0; kx < s->kw; kx++) {
                    int32_t ix = ox * s->sw - s->pw + kx * s->dw;
                    if (ix >= 0 && ix < s->w && xc[iy * s->w + ix] > mx) mx = xc[iy * s->w + ix];
                }
            }
            y[((size_t)c * s->oh + oy) * s->ow + ox] = (int8_t)mx;
        }
    }
}
