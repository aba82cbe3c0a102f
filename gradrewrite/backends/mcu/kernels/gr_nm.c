/* N:M sparse conv / linear: only the kept weights are stored (values + a bitstream
 * of their positions inside each group of m), and only their multiply-accumulates
 * run. Each kept weight is decoded once and applied to every output pixel / row. */
#include <string.h>
#include "gr_kernels.h"

#if defined(__ARM_FEATURE_DSP)
/* Cortex-M4/M7 DSP extension (as in gr_int8.c): one word holds four neighbouring int8
 * inputs; SXTB16 sign-extends bytes 0 and 2, with the operand rotated by 8 bytes 1 and 3 */
#include <arm_acle.h>
#include "gr_dsp.h"
#endif

static int32_t nm_index(const uint8_t *stream, int32_t bits, int32_t i) {
    int32_t bit = i * bits, byte = bit >> 3;
    /* the generator pads the stream with one zero byte, so byte + 1 is readable */
    uint32_t word = (uint32_t)stream[byte] | ((uint32_t)stream[byte + 1] << 8);
    return (int32_t)((word >> (bit & 7)) & ((1u << bits) - 1u));
}

static float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

void gr_linear_nm_f32(const gr_nm *p, const float *x, const float *vals, const float *b,
                      float *y, int32_t rows_m, int32_t n_out, float lo, float hi) {
    int32_t j, g, s, i, per_row = p->groups * p->n;
    for (j = 0; j < n_out; j++) {
        for (i = 0; i < rows_m; i++) y[(size_t)i * n_out + j] = b ? b[j] : 0.0f;
        for (g = 0; g < p->groups; g++) for (s = 0; s < p->n; s++) {
            int32_t slot = j * per_row + g * p->n + s;
            int32_t col = g * p->m + nm_index(p->idx, p->bits, slot);
            float v = vals[slot];
            if (col >= p->k) continue;
            for (i = 0; i < rows_m; i++) y[(size_t)i * n_out + j] = GR_FMA(v, x[(size_t)i * p->k + col], y[(size_t)i * n_out + j]);
        }
        for (i = 0; i < rows_m; i++) y[(size_t)i * n_out + j] = clampf(y[(size_t)i * n_out + j], lo, hi);
    }
}

/* the int8 kernels decode a row's kept weights once into a small stack table (input offset,
 * value, tap) and then run output-stationary: each accumulator stays in a register over the
 * whole table, so a multiply-accumulate costs a load and a multiply-add, with no bit
 * extraction and no scratch traffic. Rows with more kept weights than the table holds are
 * done in chunks that carry their partial sums in the caller's scratch. */
#define NM_CHUNK 64

/* gr_requantize (same value) plus the output zero point and clamp, with every constant
 * passed in: callers hoist them out of their loops (int8 stores may alias *q) */
static inline int8_t requant_s8(int32_t acc, int32_t mult, int32_t total, int32_t ozp, int32_t lo, int32_t hi) {
    int64_t prod = (int64_t)acc * mult + ((int64_t)1 << (total - 1));
    /* the low word of prod >> total; for total >= 32 that is the high word shifted */
    int32_t r = (total >= 32 ? (int32_t)(prod >> 32) >> (total - 32) : (int32_t)(prod >> total)) + ozp;
    return (int8_t)(r < lo ? lo : (r > hi ? hi : r));
}

/* walks a row's slots in order: slot s sits in group s / n at bit s * bits of the stream */
typedef struct {
    const gr_nm *p;
    int32_t slot, end, bit, group, in_group;
} nm_cursor;

static inline void nm_start(nm_cursor *cur, const gr_nm *p, int32_t row) {
    cur->p = p;
    cur->slot = row * p->groups * p->n;
    cur->end = cur->slot + p->groups * p->n;
    cur->bit = cur->slot * p->bits;
    cur->group = 0;
    cur->in_group = 0;
}

/* next slot's column inside the row (before the K bound check); advances the cursor */
static inline int32_t nm_next(nm_cursor *cur) {
    const gr_nm *p = cur->p;
    int32_t byte = cur->bit >> 3;
    /* the generator pads the stream with one zero byte, so byte + 1 is readable */
    uint32_t word = (uint32_t)p->idx[byte] | ((uint32_t)p->idx[byte + 1] << 8);
    int32_t col = cur->group * p->m + (int32_t)((word >> (cur->bit & 7)) & ((1u << p->bits) - 1u));
    cur->bit += p->bits;
    cur->slot++;
    if (++cur->in_group == p->n) { cur->in_group = 0; cur->group++; }
    return col;
}

void gr_linear_nm_s8(const gr_nm *p, const gr_quant_params *q, const int8_t *x,
                     const int8_t *vals, const int32_t *bias, int8_t *y, int32_t rows_m, int32_t n_out,
                     int32_t *acc) {
    const int32_t ozp = q->out_zp, lo = q->act_min, hi = q->act_max;
    int32_t off[NM_CHUNK], val[NM_CHUNK];
    int32_t j, i, e, zp = q->in_zp, k = p->k;
    for (j = 0; j < n_out; j++) {
        const int32_t b = bias ? bias[j] : 0, mult = q->mult[j], total = 31 - q->shift[j];
        int32_t first = 1, last;
        nm_cursor cur;
        nm_start(&cur, p, j);
        do {
            int32_t cnt = 0, corr = 0;
            while (cur.slot < cur.end && cnt < NM_CHUNK) {
                int32_t v = vals[cur.slot], col = nm_next(&cur);
                if (col >= k || v == 0) continue;
                off[cnt] = col; val[cnt] = v; corr -= zp * v; cnt++;
            }
            last = cur.slot >= cur.end;
            /* sum v * (x - zp) = sum v * x - zp * sum v */
            for (i = 0; i + 3 < rows_m; i += 4) {
                const int8_t *x0 = x + (size_t)i * k, *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
                int32_t a0 = (first ? b : acc[i]) + corr, a1 = (first ? b : acc[i + 1]) + corr;
                int32_t a2 = (first ? b : acc[i + 2]) + corr, a3 = (first ? b : acc[i + 3]) + corr;
                for (e = 0; e < cnt; e++) {
                    int32_t v = val[e], o = off[e];
                    a0 += v * x0[o]; a1 += v * x1[o]; a2 += v * x2[o]; a3 += v * x3[o];
                }
                if (last) {
                    y[(size_t)i * n_out + j] = requant_s8(a0, mult, total, ozp, lo, hi);
                    y[(size_t)(i + 1) * n_out + j] = requant_s8(a1, mult, total, ozp, lo, hi);
                    y[(size_t)(i + 2) * n_out + j] = requant_s8(a2, mult, total, ozp, lo, hi);
                    y[(size_t)(i + 3) * n_out + j] = requant_s8(a3, mult, total, ozp, lo, hi);
                } else {
                    acc[i] = a0; acc[i + 1] = a1; acc[i + 2] = a2; acc[i + 3] = a3;
                }
            }
            for (; i < rows_m; i++) {
                const int8_t *xi = x + (size_t)i * k;
                int32_t a = (first ? b : acc[i]) + corr;
                for (e = 0; e < cnt; e++) a += val[e] * xi[off[e]];
                if (last) y[(size_t)i * n_out + j] = requant_s8(a, mult, total, ozp, lo, hi);
                else acc[i] = a;
            }
            first = 0;
        } while (!last);
    }
}

/* rows of the grouped weight are (o, ky, kx); K runs over the input channels of o's group */
#define NM_CONV_LOOP(ACC, XVAL)                                                              \
    for (ky = 0; ky < s->kh; ky++) for (kx = 0; kx < s->kw; kx++) {                          \
        int32_t row = (o * s->kh + ky) * s->kw + kx, oy0 = 0, oy1 = s->oh, ox0 = 0, ox1 = s->ow; \
        while (oy0 < oy1 && oy0 * s->sh - s->ph + ky * s->dh < 0) oy0++;                     \
        while (oy1 > oy0 && (oy1 - 1) * s->sh - s->ph + ky * s->dh >= s->h) oy1--;            \
        while (ox0 < ox1 && ox0 * s->sw - s->pw + kx * s->dw < 0) ox0++;                      \
        while (ox1 > ox0 && (ox1 - 1) * s->sw - s->pw + kx * s->dw >= s->w) ox1--;            \
        for (gi = 0; gi < p->groups; gi++) for (sl = 0; sl < p->n; sl++) {                    \
            int32_t slot = (row * p->groups + gi) * p->n + sl;                                \
            int32_t c = gi * p->m + nm_index(p->idx, p->bits, slot);                         \
            const XVAL *xc;                                                                   \
            if (c >= p->k || vals[slot] == 0) continue;                                       \
            xc = x + (((size_t)n * s->c + (size_t)grp * cin_g + c) * s->h) * s->w;            \
            for (oy = oy0; oy < oy1; oy++) {                                                  \
                const XVAL *xr = xc + (size_t)(oy * s->sh - s->ph + ky * s->dh) * s->w - s->pw + kx * s->dw; \
                for (ox = ox0; ox < ox1; ox++) ACC;                                           \
            }                                                                                 \
        }                                                                                     \
    }

void gr_conv2d_nm_f32(const gr_conv_shape *s, const gr_nm *p, const float *x, const float *vals,
                      const float *b, float *y, float lo, float hi) {
    int32_t cin_g = s->c / s->groups, cout_g = s->oc / s->groups, hw = s->oh * s->ow;
    int32_t n, o, oy, ox, ky, kx, gi, sl, i;
    for (n = 0; n < s->n; n++) for (o = 0; o < s->oc; o++) {
        int32_t grp = o / cout_g;
        float *yo = y + ((size_t)n * s->oc + o) * hw;
        for (i = 0; i < hw; i++) yo[i] = b ? b[o] : 0.0f;
        NM_CONV_LOOP(yo[oy * s->ow + ox] += vals[slot] * xr[ox * s->sw], float)
        for (i = 0; i < hw; i++) yo[i] = clampf(yo[i], lo, hi);
    }
}

void gr_conv2d_nm_s8(const gr_conv_shape *s, const gr_nm *p, const gr_quant_params *q,
                     const int8_t *x, const int8_t *vals, const int32_t *bias, int8_t *y,
                     int32_t *acc) {
    const int32_t ozp = q->out_zp, lo = q->act_min, hi = q->act_max;
    gr_conv_shape flat;
    if (s->kh == 1 && s->kw == 1 && s->ph == 0 && s->pw == 0 && s->sh == 1 && s->sw == 1) {
        /* 1x1, stride 1: the plane is one long row, so four-pixel blocks run across rows */
        flat = *s;
        flat.w = flat.ow = s->h * s->w;
        flat.h = flat.oh = 1;
        s = &flat;
    }
    int32_t off[NM_CHUNK], val[NM_CHUNK];
    /* runs of table entries that share a tap (ky, kx): border outputs test a tap once */
    int32_t run_at[NM_CHUNK + 1], run_corr[NM_CHUNK];
    int16_t run_ky[NM_CHUNK], run_kx[NM_CHUNK];
    int32_t cin_g = s->c / s->groups, cout_g = s->oc / s->groups, hw = s->oh * s->ow;
    int32_t n, o, oy, ox, ky, kx, e, zp = q->in_zp, plane = s->h * s->w;
    /* outputs whose window lies inside the input: ox in [ox_a, ox_b), oy in [oy_a, oy_b) */
    int32_t ox_a = (s->pw + s->sw - 1) / s->sw, oy_a = (s->ph + s->sh - 1) / s->sh;
    int32_t ox_b = (s->w - 1 - (s->kw - 1) * s->dw + s->pw) / s->sw + 1;
    int32_t oy_b = (s->h - 1 - (s->kh - 1) * s->dh + s->ph) / s->sh + 1;
    if (s->w - 1 - (s->kw - 1) * s->dw + s->pw < 0) ox_b = 0;
    if (s->h - 1 - (s->kh - 1) * s->dh + s->ph < 0) oy_b = 0;
    if (ox_b > s->ow) ox_b = s->ow;
    if (oy_b > s->oh) oy_b = s->oh;
    if (ox_a > ox_b) ox_a = ox_b;
    for (n = 0; n < s->n; n++) for (o = 0; o < s->oc; o++) {
        const int8_t *xg = x + ((size_t)n * s->c + (size_t)(o / cout_g) * cin_g) * plane;
        const int32_t b = bias ? bias[o] : 0, mult = q->mult[o], total = 31 - q->shift[o];
        int8_t *yo = y + ((size_t)n * s->oc + o) * hw;
        int32_t first = 1, last, row = o * s->kh * s->kw, rows_end = row + s->kh * s->kw;
        nm_cursor cur;
        nm_start(&cur, p, row);
        ky = kx = 0;
        do {
            int32_t cnt = 0, corr = 0, runs = 0, r;
            /* rows of the grouped weight are (o, ky, kx); columns the input channels of o's group */
            while (row < rows_end && cnt < NM_CHUNK) {
                if (cur.slot < cur.end) {
                    int32_t v = vals[cur.slot], c = nm_next(&cur);
                    if (c < p->k && v != 0) {
                        if (runs == 0 || run_ky[runs - 1] != ky || run_kx[runs - 1] != kx) {
                            run_at[runs] = cnt; run_corr[runs] = 0;
                            run_ky[runs] = (int16_t)ky; run_kx[runs] = (int16_t)kx; runs++;
                        }
                        off[cnt] = c * plane + ky * s->dh * s->w + kx * s->dw;
                        val[cnt] = v; run_corr[runs - 1] -= zp * v;
                        corr -= zp * v; cnt++;
                    }
                }
                if (cur.slot == cur.end) {  /* next (ky, kx) row */
                    row++;
                    if (++kx == s->kw) { kx = 0; ky++; }
                    if (row < rows_end) nm_start(&cur, p, row);
                }
            }
            last = row >= rows_end;
            run_at[runs] = cnt;
            for (oy = 0; oy < s->oh; oy++) {
                int32_t iy0 = oy * s->sh - s->ph, inside_y = oy >= oy_a && oy < oy_b;
                int32_t *ar = acc + (size_t)oy * s->ow;
                int8_t *yr = yo + (size_t)oy * s->ow;
                for (ox = 0; ox < s->ow; ox++) {
                    int32_t ix0 = ox * s->sw - s->pw, a;
                    if (inside_y && ox >= ox_a && ox + 3 < ox_b) {
                        /* four interior outputs: every tap is real, sum v*(x - zp) = sum v*x + corr */
                        const int8_t *x0 = xg + (size_t)iy0 * s->w + ix0, *x1 = x0 + s->sw;
                        const int8_t *x2 = x1 + s->sw, *x3 = x2 + s->sw;
                        int32_t a0 = (first ? b : ar[ox]) + corr, a1 = (first ? b : ar[ox + 1]) + corr;
                        int32_t a2 = (first ? b : ar[ox + 2]) + corr, a3 = (first ? b : ar[ox + 3]) + corr;
#if defined(__ARM_FEATURE_DSP)
                        if (s->sw == 1) {
                            /* the four inputs are neighbours: one word, two SXTB16, four SMLAxy */
                            for (e = 0; e < cnt; e++) {
                                int32_t v = val[e];
                                uint32_t xv = load4(x0 + off[e]);
                                int32_t ev = __sxtb16(xv), od = sxtb16_ror8(xv);
                                a0 = __smlabb(v, ev, a0); a2 = __smlabt(v, ev, a2);
                                a1 = __smlabb(v, od, a1); a3 = __smlabt(v, od, a3);
                            }
                        } else
#endif
                        for (e = 0; e < cnt; e++) {
                            int32_t v = val[e], d = off[e];
                            a0 += v * x0[d]; a1 += v * x1[d]; a2 += v * x2[d]; a3 += v * x3[d];
                        }
                        if (last) {
                            yr[ox] = requant_s8(a0, mult, total, ozp, lo, hi);
                            yr[ox + 1] = requant_s8(a1, mult, total, ozp, lo, hi);
                            yr[ox + 2] = requant_s8(a2, mult, total, ozp, lo, hi);
                            yr[ox + 3] = requant_s8(a3, mult, total, ozp, lo, hi);
                        } else {
                            ar[ox] = a0; ar[ox + 1] = a1; ar[ox + 2] = a2; ar[ox + 3] = a3;
                        }
                        ox += 3;
                        continue;
                    }
                    a = first ? b : ar[ox];
                    if (inside_y && ox >= ox_a && ox < ox_b) {
                        const int8_t *x0 = xg + (size_t)iy0 * s->w + ix0;
                        a += corr;
                        for (e = 0; e < cnt; e++) a += val[e] * x0[off[e]];
                    } else {
                        /* border: padded taps hold the real value 0 and contribute nothing */
                        const int32_t at = iy0 * s->w + ix0;   /* may be negative; at + off is not */
                        for (r = 0; r < runs; r++) {
                            int32_t iy = iy0 + run_ky[r] * s->dh, ix = ix0 + run_kx[r] * s->dw;
                            if (iy < 0 || iy >= s->h || ix < 0 || ix >= s->w) continue;
                            a += run_corr[r];
                            for (e = run_at[r]; e < run_at[r + 1]; e++) a += val[e] * xg[at + off[e]];
                        }
                    }
                    if (last) yr[ox] = requant_s8(a, mult, total, ozp, lo, hi);
                    else ar[ox] = a;
                }
            }
            first = 0;
        } while (!last);
    }
}
