/* gradrewrite mcu kernels: portable C99, no allocation, NCHW layout like PyTorch.
 * Dimensions are int32_t; strides are in elements. Every kernel writes a
 * contiguous output unless it takes explicit output strides. */
#ifndef GR_KERNELS_H
#define GR_KERNELS_H
#include <stdint.h>
#include <stddef.h>

#define GR_MAX_DIMS 6

/* a*b + c: one fused instruction where the FPU has it (Cortex-M4F/M7 VFMA; C99 compilers
 * do not contract a*b + c on their own), a plain multiply-add elsewhere */
#if defined(__ARM_FEATURE_FMA)
#define GR_FMA(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define GR_FMA(a, b, c) ((a) * (b) + (c))
#endif

/* ---- data movement (gr_tensor.c) */
/* dst[idx] = src[idx] over an n-d index space, both sides strided; elem = bytes per element */
void gr_copy_nd(int32_t elem, int32_t ndim, const int32_t *shape,
                const void *src, const int32_t *src_strides,
                void *dst, const int32_t *dst_strides);
void gr_embedding_f32(const float *table, int32_t dim, const int64_t *idx, int32_t n, float *y);
void gr_cast_i64_f32(const int64_t *x, float *y, int32_t n);

/* ---- elementwise fp32 (gr_elementwise.c) */
enum { GR_ADD = 0, GR_SUB = 1, GR_MUL = 2, GR_DIV = 3, GR_MAX = 4, GR_MIN = 5 };
/* y = a OP (alpha * b) over a broadcast n-d index space; y contiguous */
void gr_binary_f32(int32_t op, int32_t ndim, const int32_t *shape,
                   const float *a, const int32_t *a_strides,
                   const float *b, const int32_t *b_strides, float alpha, float *y);
void gr_binary_scalar_f32(int32_t op, const float *x, float s, float *y, int32_t n);
enum { GR_CLAMP = 0, GR_HARDSWISH = 1, GR_HARDSIGMOID = 2, GR_SIGMOID = 3, GR_TANH = 4,
       GR_GELU_ERF = 5, GR_GELU_TANH = 6, GR_SILU = 7, GR_NEG = 8, GR_EXP = 9, GR_SQRT = 10,
       GR_RSQRT = 11 };
/* y = f(x); GR_CLAMP uses lo/hi (relu: 0/INF, relu6: 0/6) */
void gr_unary_f32(int32_t op, const float *x, float *y, int32_t n, float lo, float hi);
void gr_softmax_f32(const float *x, float *y, int32_t rows, int32_t cols, int32_t log);
void gr_layer_norm_f32(const float *x, const float *gamma, const float *beta, float *y,
                       int32_t rows, int32_t cols, float eps);
/* mean/sum over the middle axis of [outer, red, inner] */
void gr_reduce_f32(const float *x, float *y, int32_t outer, int32_t red, int32_t inner, int32_t mean);
/* constant pad of the last two dims of [outer, h, w] */
void gr_pad_f32(const float *x, float *y, int32_t outer, int32_t h, int32_t w, int32_t top, int32_t bottom,
                int32_t left, int32_t right, float value);

/* ---- convolution / linear fp32 (gr_conv.c, gr_linalg.c) */
typedef struct {
    int32_t n, c, h, w;          /* input */
    int32_t oc, oh, ow;          /* output */
    int32_t kh, kw, sh, sw, ph, pw, dh, dw, groups;
} gr_conv_shape;
void gr_conv2d_f32(const gr_conv_shape *s, const float *x, const float *w, const float *b,
                   float *y, float lo, float hi);
/* y[m, n] = x[m, :] . w[n, :] + b[n], clamped */
void gr_linear_f32(const float *x, const float *w, const float *b, float *y,
                   int32_t m, int32_t k, int32_t n, float lo, float hi);
/* y[b1, b2] = A[b1, b2] @ B[b1, b2]; A is [M, K], B is [K, N] with strides
 * {b1, b2, row, col}; y contiguous [b1, b2, M, N] */
void gr_bmm_f32(int32_t b1, int32_t b2, int32_t m, int32_t k, int32_t n,
                const float *a, const int32_t *as, const float *b, const int32_t *bs, float *y);
/* scaled dot-product attention over [b1, b2, T, D] strided q, k, v (strides
 * {b1, b2, t, d}); y [b1, b2, T, Dv] with strides ys {b1, b2, t} (last dim dense), so a
 * following transpose(1, 2) can be free; scratch holds S floats */
void gr_sdpa_f32(int32_t b1, int32_t b2, int32_t t, int32_t s, int32_t d, int32_t dv,
                 const float *q, const int32_t *qs, const float *k, const int32_t *ks,
                 const float *v, const int32_t *vs, const float *mask, const int32_t *ms,
                 float *y, const int32_t *ys, float scale, int32_t causal, float *scratch);

/* ---- pooling fp32 (gr_pool.c) */
typedef struct {
    int32_t nc, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
    int32_t count_include_pad, divisor;  /* avg only; divisor 0 = window size */
} gr_pool_shape;
void gr_max_pool2d_f32(const gr_pool_shape *s, const float *x, float *y);
void gr_avg_pool2d_f32(const gr_pool_shape *s, const float *x, float *y);
void gr_adaptive_avg_pool2d_f32(const float *x, float *y, int32_t nc, int32_t h, int32_t w,
                                int32_t oh, int32_t ow);

/* ---- int8 (gr_int8.c): TFLite / CMSIS-NN integer semantics */
void gr_quantize_f32_i8(const float *x, int8_t *y, int32_t n, float inv_scale, int32_t zp);
void gr_dequantize_i8_f32(const int8_t *x, float *y, int32_t n, float scale, int32_t zp);
/* round(acc * mult * 2^(shift - 31)), rounding half up, as CMSIS-NN's single-rounding requantize */
int32_t gr_requantize(int32_t acc, int32_t mult, int32_t shift);
typedef struct {
    int32_t in_zp, out_zp, act_min, act_max;
    const int32_t *mult, *shift;  /* per output channel */
} gr_quant_params;
void gr_conv2d_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x,
                  const int8_t *w, const int32_t *bias, int8_t *y);
/* Inference kernels whose constants the code generator prepares: base[o] = bias[o] -
 * in_zp * sum of output channel o's weights (the input zero point folded in). */
/* 1x1 conv, no padding, one group, any stride: w is [oc][cin rounded up to 4], each group of
 * four input channels stored as (c0, c2, c1, c3), zero past cin; xs: 2 * that many int32 */
void gr_pointwise_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x, const int8_t *w,
                     const int32_t *base, int8_t *y, int32_t *xs);
/* depthwise 3x3, dilation 1, any stride / padding; y may start at x (in place); pad:
 * ((oh - 1) * sh + 3) * ((ow - 1) * sw + 3) + 4 bytes apart from x and y */
void gr_depthwise3x3_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x, const int8_t *w,
                        const int32_t *base, int8_t *y, int8_t *pad);
/* fully connected: x [m, k], w [n, k], y [m, n] */
void gr_fc_s8(const gr_quant_params *q, const int8_t *x, const int8_t *w, const int32_t *base, int8_t *y,
              int32_t m, int32_t k, int32_t n);
/* int8 layers whose output stays float: y = (float)acc * scale[o] (acc: the int32
 * accumulator, bias included); gr_fc_s8_f32 takes gr_fc_s8's weights and base */
void gr_fc_s8_f32(const int8_t *x, const int8_t *w, const int32_t *base, const float *scale, float *y,
                  int32_t m, int32_t k, int32_t n);
void gr_conv2d_s8_f32(const gr_conv_shape *s, int32_t in_zp, const int8_t *x, const int8_t *w,
                      const int32_t *bias, const float *scale, float *y);
/* a pointwise conv's weights: dense (gr_pointwise_s8's layout) or N:M packed entries (see
 * gr_int8.c); `count` block steps per output channel, `stride` bytes per output channel,
 * base: the bias with the input zero point folded in */
enum { GR_PW_DENSE = 0, GR_PW_NM1 = 1, GR_PW_NM24 = 2 };
typedef struct {
    int32_t fmt, count, stride;
    const void *w;
    const int32_t *base;
} gr_pw_weights;
/* 1x1, no padding, one group, any stride; xs: the gather scratch the code generator sizes */
void gr_pointwise_nm_s8(const gr_conv_shape *s, const gr_quant_params *q, const int8_t *x, const gr_pw_weights *pw,
                        int8_t *y, int32_t *xs);
/* 1x1 stride-1 expand conv (ps, pq, pw) then depthwise 3x3 (ds, dq), row by row through
 * `ring` (three zero-point-padded rows of every expanded channel: oc * 3 * max((ow - 1) *
 * sw + 3, pw + w) + 4 bytes) and `xs` (the pointwise's gather): the expanded tensor is never
 * stored; dw / dbase are laid out as for gr_depthwise3x3_s8 */
void gr_pw_dw_s8(const gr_conv_shape *ps, const gr_quant_params *pq, const int8_t *x, const gr_pw_weights *pw,
                 const gr_conv_shape *ds, const gr_quant_params *dq, const int8_t *dw, const int32_t *dbase, int8_t *y,
                 int8_t *ring, int32_t *xs);
void gr_linear_s8(const gr_quant_params *q, const int8_t *x, const int8_t *w,
                  const int32_t *bias, int8_t *y, int32_t m, int32_t k, int32_t n);
/* The folded base of an int8 conv whose bias a training step updates (the code generator
 * folds a constant one): base[o] = bias[o] + zterm[o], zterm = -zp * (sum of channel o's
 * weights), in wrapping 32-bit arithmetic like the folded bases */
void gr_base_s8(const int32_t *bias, const int32_t *zterm, int32_t n, int32_t *base);

/* max pooling commutes with the monotone quantization: same window walk as fp32 */
void gr_max_pool2d_s8(const gr_pool_shape *s, const int8_t *x, int8_t *y);

/* ---- N:M sparse weights (gr_nm.c): per row of the [rows, K] grouped weight, G groups
 * of m with n kept values each; idx is a bitstream of `bits`-bit positions (LSB first) */
typedef struct {
    int32_t n, m, bits, groups, k;
    const uint8_t *idx;
} gr_nm;
void gr_linear_nm_f32(const gr_nm *p, const float *x, const float *vals, const float *b,
                      float *y, int32_t rows_m, int32_t n_out, float lo, float hi);
/* the s8 kernels accumulate one output channel at a time in scratch (int32, rows_m or oh*ow) */
void gr_linear_nm_s8(const gr_nm *p, const gr_quant_params *q, const int8_t *x,
                     const int8_t *vals, const int32_t *bias, int8_t *y, int32_t rows_m, int32_t n_out,
                     int32_t *scratch);
void gr_conv2d_nm_f32(const gr_conv_shape *s, const gr_nm *p, const float *x, const float *vals,
                      const float *b, float *y, float lo, float hi);
void gr_conv2d_nm_s8(const gr_conv_shape *s, const gr_nm *p, const gr_quant_params *q,
                     const int8_t *x, const int8_t *vals, const int32_t *bias, int8_t *y,
                     int32_t *scratch);

/* ---- int8 elementwise, pooling and data movement (gr_int8_elementwise.c) */
typedef struct {
    int32_t in_zp, out_zp, mult, shift;   /* y = clamp(out_zp + requant(x - in_zp, mult, shift)) */
} gr_rescale_s8;
/* y = table[x + 128]: any int8 -> int8 function (hardswish, sigmoid, ...) */
void gr_lut_s8(const int8_t *x, int8_t *y, int32_t n, const int8_t *table);
/* y[o, i] = clamp(out_zp + requant((a[o, i] - a_zp) * (b[o, i or 0] - b_zp))); b_inner 1 or inner */
void gr_mul_s8(const int8_t *a, int32_t a_zp, const int8_t *b, int32_t b_zp, int8_t *y,
               int32_t outer, int32_t inner, int32_t b_inner, int32_t mult, int32_t shift, int32_t out_zp,
               int32_t act_min, int32_t act_max);
/* TFLite's int8 add with each input's rescaled term tabulated: ta/tb[x + 128] =
 * requant((x - zp) << 20, m, e); y = clamp(out_zp + requant(ta[a] + tb[b], mult, shift)) */
void gr_add_lut_s8(const int8_t *a, const int8_t *b, int8_t *y, int32_t n, const int32_t *ta, const int32_t *tb,
                   int32_t mult, int32_t shift, int32_t out_zp, int32_t act_min, int32_t act_max);
/* average pooling: requant(sum(x - in_zp), mult[d], shift[d]) + out_zp for a window of divisor d */
void gr_avg_pool2d_s8(const gr_pool_shape *s, const int8_t *x, int8_t *y, int32_t in_zp, int32_t out_zp,
                      const int32_t *mult, const int32_t *shift);
/* one input of a concat: x [outer, inner] into y [outer, out_inner] at column offset (r NULL: copy) */
void gr_concat_s8(const int8_t *x, int32_t outer, int32_t inner, int32_t out_inner, int32_t offset,
                  const gr_rescale_s8 *r, int8_t *y);
/* constant pad of the last two dims of [outer, h, w]; value is the int8 pad (r NULL: copy) */
void gr_pad_s8(const int8_t *x, int8_t *y, int32_t outer, int32_t h, int32_t w, int32_t top, int32_t bottom,
               int32_t left, int32_t right, int32_t value, const gr_rescale_s8 *r);

#endif
