/* gradrewrite mcu backend: the float classifier head of an int8 training step (its
   backward and update are gr_train.c's fp32 kernels). A file of its own: steps without
   a float head do not carry it. */
#ifndef GR_FLOAT_HEAD_H
#define GR_FLOAT_HEAD_H
#include <stdint.h>

/* linear forward y = x w^T + b (x: rows x kin, w: nout x kin, b may be NULL): the bias,
   then each product added in input order, never an FMA, so every FPU gives the bits the
   integer reference computes (gr_linear_f32 fuses where the FPU can) */
void gr_linear_tr_f32(const float *x, const float *w, const float *b, float *y, int32_t rows, int32_t kin,
                      int32_t nout);

#endif
