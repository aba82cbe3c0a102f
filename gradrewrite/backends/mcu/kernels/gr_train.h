/* gradrewrite mcu backend: fp32 backward kernels and the in-place SGD update for
   on-device training. Layouts are PyTorch's (NCHW, OIHW weights, row-major). */
#ifndef GR_TRAIN_H
#define GR_TRAIN_H
#include <stdint.h>
#include "gr_kernels.h"

/* conv2d input gradient: gx[n,c,h,w] = sum over (oc,kh,kw) of gy * w (overwrites gx). */
void gr_conv2d_bwd_input_f32(const gr_conv_shape *s, const float *gy, const float *w, float *gx);
/* the same, adding into gx (a weight split in trained and frozen filters: two calls) */
void gr_conv2d_bwd_input_acc_f32(const gr_conv_shape *s, const float *gy, const float *w, float *gx);
/* conv2d weight gradient of the first k output channels (k = s->oc for all);
   gy holds k channels per image (row stride k*oh*ow); gw is k x (c/groups) x kh x kw. */
void gr_conv2d_bwd_weight_f32(const gr_conv_shape *s, int32_t k, const float *gy, const float *x, float *gw);
/* bias gradient: gb[c] = sum over n,h,w of gy[n,c,h,w] (c < k, gy with k channels). */
void gr_conv2d_bwd_bias_f32(int32_t n, int32_t k, int32_t hw, const float *gy, float *gb);
/* linear y = x w^T + b, x: rows x kin, w: nout x kin. */
void gr_linear_bwd_input_f32(const float *gy, const float *w, float *gx, int32_t rows, int32_t kin, int32_t nout);
void gr_linear_bwd_weight_f32(const float *gy, const float *x, float *gw, int32_t rows, int32_t kin, int32_t nout);
void gr_linear_bwd_bias_f32(const float *gy, float *gb, int32_t rows, int32_t nout);
/* relu: gx = gy where y > threshold else 0 (aten.threshold_backward); hardtanh/relu6:
   gx = gy where lo < x < hi else 0 (aten.hardtanh_backward). */
void gr_threshold_bwd_f32(const float *gy, const float *y, float threshold, float *gx, int32_t n);
void gr_hardtanh_bwd_f32(const float *gy, const float *x, float lo, float hi, float *gx, int32_t n);
/* squeeze-excitation gates: gx = gy * (1 - y) * y from sigmoid's output y; gy / 6 where
   -3 < x < 3 (hardsigmoid's input x), else 0 */
void gr_sigmoid_bwd_f32(const float *gy, const float *y, float *gx, int32_t n);
/* where(x OP s, a, b) of a decomposed gate / hardswish backward (OP: GR_LE, GR_GE,
   GR_LT, GR_GT); a or b NULL: the constant ca / cb */
enum { GR_LE = 0, GR_GE = 1, GR_LT = 2, GR_GT = 3 };
void gr_where_cmp_f32(int32_t op, const float *x, float s, const float *a, float ca, const float *b, float cb,
                      float *y, int32_t n);
/* sigmoid with gr_expf (an int8 step's gate: the reference mirrors it bit for bit) */
void gr_sigmoid_tr_f32(const float *x, float *y, int32_t n);
void gr_hardsigmoid_bwd_f32(const float *gy, const float *x, float *gx, int32_t n);
/* max pooling that also records, per output, the argmax's flat index in its h*w plane
   (torch's indices: first maximum in scan order, NaN wins), and its backward. */
void gr_max_pool2d_idx_f32(const gr_pool_shape *s, const float *x, float *y, int64_t *idx);
void gr_max_pool2d_bwd_f32(const float *gy, const int64_t *idx, float *gx, int32_t nc, int32_t hw, int32_t ohw);
/* pooling backward (gx overwritten) */
void gr_avg_pool2d_bwd_f32(const gr_pool_shape *s, const float *gy, float *gx);
void gr_adaptive_avg_pool2d_bwd_f32(const float *gy, float *gx, int32_t nc, int32_t h, int32_t w,
                                    int32_t oh, int32_t ow);
/* add backward with a broadcast operand: sum gy over the broadcast (outer, inner) axes. */
void gr_add_bwd_reduce_f32(const float *gy, float *gb, int32_t outer, int32_t mid, int32_t inner);
/* cross-entropy over log-probabilities (aten.nll_loss_forward/backward, mean reduction,
   no class weights, ignore_index honoured) and log-softmax backward. */
void gr_nll_loss_f32(const float *logp, const int64_t *target, float *loss, float *total_weight,
                     int32_t n, int32_t c, int64_t ignore_index, int32_t mean);
void gr_nll_loss_bwd_f32(const float *gloss, const int64_t *target, const float *total_weight, float *gx,
                         int32_t n, int32_t c, int64_t ignore_index, int32_t mean);
void gr_log_softmax_bwd_f32(const float *gy, const float *logp, float *gx, int32_t rows, int32_t cols);
/* log-softmax over rows (the training step's forward), with gr_expf / gr_logf */
void gr_log_softmax_tr_f32(const float *x, float *y, int32_t rows, int32_t cols);
/* expf / logf from float arithmetic only: bit-reproducible by the Python reference
   (a few ulp from libm; x < -87 gives 0) */
float gr_expf(float x);
float gr_logf(float x);
/* fused softmax cross-entropy: loss = mean_i(-log softmax(x_i)[t_i]) and, when gx is not
   NULL, gx = (softmax(x) - onehot(t)) / n. */
void gr_softmax_xent_f32(const float *x, const int64_t *target, float *loss, float *gx, int32_t n, int32_t c);
/* SGD in place: p -= lr * g */
void gr_sgd_f32(float *p, const float *g, float lr, int32_t n);
/* SGD momentum buffer in place: v = momentum * v + g (then gr_sgd_f32(p, v, lr, n)) */
void gr_momentum_f32(float *v, const float *g, float momentum, int32_t n);

/* ---- int8 training (gr_train_s8.c): fp32 gradients, int8 saved activations
   dq(q) = ((float)q - (float)zp) * s, int8 weights w * ws[oc] (per output channel). */
/* conv input gradient through int8 weights, as a gather: gx[n,c,iy,ix] = sum over the
   output channels oc in [o0, o1) of c's group, then ky, kx, of gy * ((float)w * ws[oc]);
   w holds filters o0..o1-1. accumulate: add to gx instead of overwriting (channels of
   other groups are left alone). */
void gr_conv2d_bwd_input_ws8_f32(const gr_conv_shape *s, const float *gy, const int8_t *w, const float *ws,
                                 int32_t o0, int32_t o1, int32_t accumulate, float *gx);
/* conv weight gradient of the first k filters from the int8 input x (scale xs, zero point xz) */
void gr_conv2d_bwd_weight_xs8_f32(const gr_conv_shape *s, int32_t k, const float *gy, const int8_t *x,
                                  float xs, int32_t xz, float *gw);
/* a depthwise conv's input gradient (groups = c = oc, one weight part), each channel made
   in `plane` (h * w floats) and copied out, so gx may be gy (a stride-1 conv's) */
void gr_dw_bwd_input_ws8_f32(const gr_conv_shape *s, const float *gy, const int8_t *w, const float *ws,
                             float *gx, float *plane);
/* The backward of an inverted residual block's convs with frozen int8 weights, one
   expanded channel at a time (no expanded gradient is stored): the project conv's
   (pointwise, sp: c expanded, oc out) input gradient from gy, masked by bits1; the
   depthwise conv's (sd) bias gradient gbd and input gradient, masked by bits2; the
   expand conv's (pointwise, se: c in, oc expanded) bias gradient gbe and input gradient
   gx ([n, in, h, w]). gbd / gbe / gx may be NULL (not wanted). t1 / t2: one plane of the
   depthwise output / input. A project / expand weight in two parts (partially trained):
   rows below rp / re in wp / we, the rest in wp2 / we2 (rp = oc, re = expanded: one part).
   g3 ([n, k3, h, w], k3 may be 0): the expand's masked output gradient of its first k3
   channels, for its weight gradient. Bit for bit the unfused kernels' results. */
void gr_ir_bwd_s8_f32(const gr_conv_shape *sp, const float *gy, const int8_t *wp, const int8_t *wp2, int32_t rp,
                      const float *wsp, const uint8_t *bits1, const gr_conv_shape *sd, const int8_t *wd,
                      const float *wsd, float *gbd, const uint8_t *bits2, const gr_conv_shape *se, const int8_t *we,
                      const int8_t *we2, int32_t re, const float *wse, float *gbe, float *gx, float *g3, int32_t k3,
                      float *t1, float *t2);
/* channels c0..c1-1 of masked_grad(expand(d)): out[i, ch - c0, p] = the bit of element
   (i, ch, p) of an [n, c, hw] tensor ? d[i * dn + ch * dc] : 0 */
void gr_bcast_masked_f32(const float *d, int32_t dn, int32_t dc, const uint8_t *bits, int32_t n, int32_t c,
                         int32_t hw, int32_t c0, int32_t c1, float *out);
/* linear y = x w^T: gx[r,i] (+)= sum over o in [o0, o1) of gy[r,o] * ((float)w[o-o0,i] * ws[o]) */
void gr_linear_bwd_input_ws8_f32(const float *gy, const int8_t *w, const float *ws, int32_t o0, int32_t o1,
                                 int32_t accumulate, float *gx, int32_t rows, int32_t kin, int32_t nout);
/* gw[o,i] = sum over r of gy[r,o] * dq(x[r,i]), o < k (gy row stride nout) */
void gr_linear_bwd_weight_xs8_f32(const float *gy, const int8_t *x, float xs, int32_t xz, float *gw,
                                  int32_t rows, int32_t kin, int32_t nout, int32_t k);
/* gr_reduce_f32 of dq(x) without the float copy: y[o,i] = sum (mean: / red) over r of
   dq(x[o,r,i]), summed in r order */
void gr_reduce_s8_f32(const int8_t *x, float s, int32_t zp, float *y, int32_t outer, int32_t red, int32_t inner,
                      int32_t mean);
/* straight-through estimator of an int8 quantizer: gx = gy where qmin < q < qmax, else 0 */
void gr_ste_s8_f32(const float *gy, const int8_t *q, int32_t qmin, int32_t qmax, float *gx, int32_t n);
/* relu / hardtanh backward from the int8 output: gx = gy where dq(q) > t (resp. lo < dq(q) < hi) */
void gr_threshold_bwd_s8_f32(const float *gy, const int8_t *q, float s, int32_t zp, float t, float *gx, int32_t n);
void gr_hardtanh_bwd_s8_f32(const float *gy, const int8_t *q, float s, int32_t zp, float lo, float hi,
                            float *gx, int32_t n);
/* the gradient mask of an int8 output as bits (set where qmin < q < qmax and lo < dq(q) < hi),
   computed in the forward, and its use: gx = g where the bit is set, else 0 (gx may be g) */
void gr_mask_bits_s8(const int8_t *q, int32_t n, int32_t qmin, int32_t qmax, float s, int32_t zp, float lo,
                     float hi, uint8_t *bits);
void gr_masked_grad_f32(const float *g, const uint8_t *bits, int32_t n, float *gx);
/* Integer SGD with QAS: per row r (output channel) of cols values, delta = lr * (g * f[r])
   (f = the QAS factor: 1/s for weights stored as w * s), then w += round(-delta)
   saturated to [lo, hi]: to nearest, ties to even (torch.round's), or, when rng is not
   NULL, floor(-delta + u) with u a uniform [0, 1) draw of the xorshift32 state *rng
   (stochastic rounding). */
void gr_sgd_s8(int8_t *w, const float *g, const float *f, float lr, int32_t rows, int32_t cols,
               int32_t lo, int32_t hi, uint32_t *rng);
/* int32 biases saturate at [-bound, bound]: the largest bias the int8 layer's int32
   accumulator holds with any input (2^31 - 1 - fan_in * 255 * 127). */
void gr_sgd_s32(int32_t *w, const float *g, const float *f, float lr, int32_t rows, int32_t cols,
                int32_t bound, uint32_t *rng);
#endif
