/* Training harness around the generated model_train_step, for the host and for the
 * Cortex-M boards (files opened through semihosting under QEMU):
 *
 *   train [DATA [CONFIG [OUT]]]     (defaults train_data.bin train_config.bin train_out.bin)
 *
 * CONFIG: "GRT1", then little-endian int32 steps, int32 batches, float32 lr.
 * DATA:   batches x (MODEL_INPUT_BYTES input bytes + MODEL_LABEL_BYTES label bytes),
 *         read one batch at a time (the data set never sits in SRAM); a model that
 *         says MODEL_INPUT_STREAMED reads its input window by window during the step
 *         (model_read_input, from this file), so not even one batch's input does.
 * OUT:    the loss of every step (float32), then the bytes of every trained
 *         parameter (model order, storage dtype).
 * Step i trains on batch i % batches. The first step runs between gr_mark_begin and
 * gr_mark_end (the instruction counter's window). Lines starting with "gr: " are
 * read back by gradrewrite (train_run.py): "gr: step=I loss=0xBITS" per step (the
 * loss's float32 bits: newlib-nano's printf has no %f), then the stack line.
 * Exit codes: 0 ok, 2 bad data or config file, 3 output file, 4 model_train_step failed. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "model.h"

#ifdef GR_BAREMETAL
#include "gr_stack.h"
#endif

#if defined(MODEL_INPUT_STREAMED)
/* a patched first stage reads the input window by window: model_read_input reads each
   window from the current batch in the (unbuffered) data file; no input array at all */
static FILE *batch_file;
static long batch_offset;
int model_read_input(uint32_t offset, void *dst, uint32_t n)
{
    if (offset + n > MODEL_INPUT_BYTES || fseek(batch_file, batch_offset + (long)offset, SEEK_SET) != 0)
        return -1;
    return fread(dst, 1, n, batch_file) == n ? 0 : -1;
}
#define INPUT_BUFFER NULL
#elif defined(MODEL_INPUT_IN_ARENA)
/* each batch's input is read straight into the model's arena (a step clobbers it; the
   next batch is read afresh anyway) */
#define INPUT_BUFFER ((uint8_t *)model_input_buffer())
#else
static uint8_t input_storage[MODEL_INPUT_BYTES] __attribute__((aligned(16)));
#define INPUT_BUFFER input_storage
#endif
static uint8_t label[MODEL_LABEL_BYTES] __attribute__((aligned(16)));

/* Out-of-line and distinct: the instruction counter looks for these two calls. */
volatile uint32_t gr_marker;
__attribute__((noinline)) void gr_mark_begin(void) { gr_marker = 0xB0u; }
__attribute__((noinline)) void gr_mark_end(void) { gr_marker = 0xE0u; }

struct config {
    int32_t steps, batches;
    float lr;
};

static int read_config(const char *path, struct config *cfg)
{
    unsigned char raw[16];
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("gr: error: cannot open config file %s\n", path);
        return 0;
    }
    size_t got = fread(raw, 1, sizeof raw, f);
    int extra = fgetc(f);
    fclose(f);
    if (got != sizeof raw || extra != EOF || memcmp(raw, "GRT1", 4) != 0) {
        printf("gr: error: config file %s is not a 16-byte GRT1 record\n", path);
        return 0;
    }
    memcpy(&cfg->steps, raw + 4, 4);
    memcpy(&cfg->batches, raw + 8, 4);
    memcpy(&cfg->lr, raw + 12, 4);
    if (cfg->steps < 1 || cfg->batches < 1) {
        printf("gr: error: config needs steps >= 1 and batches >= 1\n");
        return 0;
    }
    return 1;
}

static int read_batch(FILE *data, long index)
{
#if defined(MODEL_INPUT_STREAMED)  /* the labels now, the input during the step */
    batch_file = data;
    batch_offset = index * (long)(MODEL_INPUT_BYTES + MODEL_LABEL_BYTES);
    return fseek(data, batch_offset + (long)MODEL_INPUT_BYTES, SEEK_SET) == 0
        && fread(label, 1, sizeof label, data) == sizeof label;
#else
    if (fseek(data, index * (long)(MODEL_INPUT_BYTES + MODEL_LABEL_BYTES), SEEK_SET) != 0)
        return 0;
    return fread(INPUT_BUFFER, 1, MODEL_INPUT_BYTES, data) == MODEL_INPUT_BYTES
        && fread(label, 1, sizeof label, data) == sizeof label;
#endif
}

int main(int argc, char **argv)
{
    const char *data_path = argc > 1 ? argv[1] : "train_data.bin";
    const char *config_path = argc > 2 ? argv[2] : "train_config.bin";
    const char *out_path = argc > 3 ? argv[3] : "train_out.bin";
    struct config cfg;
    if (!read_config(config_path, &cfg))
        return 2;
    FILE *data = fopen(data_path, "rb");
    if (!data) {
        printf("gr: error: cannot open data file %s\n", data_path);
        return 2;
    }
    FILE *out = fopen(out_path, "wb");
    if (!out) {
        printf("gr: error: cannot create output file %s\n", out_path);
        return 3;
    }
    /* Unbuffered: batches are read whole anyway, and no stdio buffer takes harness heap. */
    setvbuf(data, NULL, _IONBF, 0);
    setvbuf(out, NULL, _IONBF, 0);

#ifdef GR_BAREMETAL
    size_t peak_stack = 0, step_stack = 0;
#endif
    for (int32_t i = 0; i < cfg.steps; i++) {
        if (!read_batch(data, (long)(i % cfg.batches))) {
            printf("gr: error: data file %s ends before batch %ld\n", data_path, (long)(i % cfg.batches));
            return 2;
        }
        float loss = 0.0f;
#ifdef GR_BAREMETAL
        /* Repaint before every step: the high-water mark is the step's, not stdio's. */
        size_t used = gr_stack_used();
        if (used > peak_stack)
            peak_stack = used;
        size_t base = gr_stack_depth();
        gr_stack_paint();
#endif
        if (i == 0)
            gr_mark_begin();
        int rc = model_train_step(INPUT_BUFFER, label, cfg.lr, &loss);
        if (i == 0)
            gr_mark_end();
#ifdef GR_BAREMETAL
        used = gr_stack_used();
        if (used > peak_stack)
            peak_stack = used;
        if (used > base && used - base > step_stack)
            step_stack = used - base;
#endif
        if (rc != 0) {
            printf("gr: train_step=%d\n", rc);
            return 4;
        }
        uint32_t bits;
        memcpy(&bits, &loss, sizeof bits);
        printf("gr: step=%ld loss=0x%08lx\n", (long)(i + 1), (unsigned long)bits);
        fflush(stdout);
        if (fwrite(&loss, sizeof loss, 1, out) != 1) {
            printf("gr: error: cannot write output file %s\n", out_path);
            return 3;
        }
    }
    fclose(data);
    for (int p = 0; p < MODEL_NUM_TRAINED; p++) {
        if (fwrite(model_trained_params[p], 1, (size_t)model_trained_bytes[p], out)
            != (size_t)model_trained_bytes[p]) {
            printf("gr: error: cannot write output file %s\n", out_path);
            return 3;
        }
    }
    if (fclose(out) != 0) {
        printf("gr: error: cannot write output file %s\n", out_path);
        return 3;
    }
#ifdef GR_BAREMETAL
    size_t used = gr_stack_used();
    if (used > peak_stack)
        peak_stack = used;
    printf("gr: stack_step=%lu stack_peak=%lu stack_reserve=%lu heap_used=%lu\n", (unsigned long)step_stack,
           (unsigned long)peak_stack, (unsigned long)gr_stack_reserve(), (unsigned long)gr_heap_used());
#endif
    return 0;
}
