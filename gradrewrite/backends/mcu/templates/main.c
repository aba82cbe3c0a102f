/* Harness around the generated model: read MODEL_INPUT_BYTES from a file (into the
 * model's arena when model.h says MODEL_INPUT_IN_ARENA; window by window during
 * model_run when it says MODEL_INPUT_STREAMED), call
 * model_run once, write MODEL_OUTPUT_BYTES to a file, print what was measured.
 *
 *   host:      ./model [input.bin [output.bin]]
 *   Cortex-M:  files are opened on the host through semihosting, relative to the
 *              directory QEMU runs in (input.bin / output.bin).
 *
 * Lines starting with "gr: " are read back by gradrewrite (firmware.py, qemu.py).
 * Exit codes: 0 ok, 2 bad input file, 3 output file, 4 model_run failed. */
#include <stdint.h>
#include <stdio.h>

#include "model.h"

#ifdef GR_BAREMETAL
#include "gr_stack.h"
#endif

#if defined(MODEL_INPUT_STREAMED)
/* patch-based execution reads the input window by window: from the open input file,
 * unbuffered, through model_read_input; no input array at all (model_run gets NULL) */
static FILE *input_file;
int model_read_input(uint32_t offset, void *dst, uint32_t n)
{
    if (fseek(input_file, (long)offset, SEEK_SET) != 0)
        return -1;
    return fread(dst, 1, n, input_file) == n ? 0 : -1;
}
#define INPUT_BUFFER NULL
#elif defined(MODEL_INPUT_IN_ARENA)
/* the input file goes straight into the model's arena: no input array of our own */
#define INPUT_BUFFER ((uint8_t *)model_input_buffer())
#else
static uint8_t input_storage[MODEL_INPUT_BYTES] __attribute__((aligned(16)));
#define INPUT_BUFFER input_storage
#endif
static uint8_t output[MODEL_OUTPUT_BYTES] __attribute__((aligned(16)));

/* The instruction counter brackets model_run between these two calls: they must
 * stay out-of-line and distinct (different stores keep them from being merged). */
volatile uint32_t gr_marker;
__attribute__((noinline)) void gr_mark_begin(void) { gr_marker = 0xB0u; }
__attribute__((noinline)) void gr_mark_end(void) { gr_marker = 0xE0u; }

static int read_input(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("gr: error: cannot open input file %s\n", path);
        return 0;
    }
#ifdef MODEL_INPUT_STREAMED
    setvbuf(f, NULL, _IONBF, 0);
    long got = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    int extra = EOF;
    input_file = f;                 /* stays open: model_run reads it */
#else
    size_t got = fread(INPUT_BUFFER, 1, MODEL_INPUT_BYTES, f);
    int extra = fgetc(f);
    fclose(f);
#endif
    if (got != (long)MODEL_INPUT_BYTES || extra != EOF) {
        printf("gr: error: input file %s must hold exactly %lu bytes\n", path,
               (unsigned long)MODEL_INPUT_BYTES);
        return 0;
    }
    return 1;
}

static int write_output(const char *path)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        printf("gr: error: cannot create output file %s\n", path);
        return 0;
    }
    size_t put = fwrite(output, 1, sizeof output, f);
    return fclose(f) == 0 && put == sizeof output;
}

int main(int argc, char **argv)
{
    const char *in_path = argc > 1 ? argv[1] : "input.bin";
    const char *out_path = argc > 2 ? argv[2] : "output.bin";
    if (!read_input(in_path))
        return 2;

#ifdef GR_BAREMETAL
    size_t startup_stack = gr_stack_used();   /* deepest so far: stdio and friends */
    size_t base = gr_stack_depth();
    gr_stack_paint();
#endif
    gr_mark_begin();
    int rc = model_run(INPUT_BUFFER, output);
    gr_mark_end();
#ifdef GR_BAREMETAL
    size_t model_stack = gr_stack_used() - base;
#endif

    printf("gr: model_run=%d\n", rc);
    if (rc != 0)
        return 4;
    if (!write_output(out_path)) {
        printf("gr: error: cannot write output file %s\n", out_path);
        return 3;
    }
#ifdef GR_BAREMETAL
    size_t total_stack = gr_stack_used();
    if (startup_stack > total_stack)
        total_stack = startup_stack;
    printf("gr: stack_model=%lu stack_peak=%lu stack_reserve=%lu heap_used=%lu\n",
           (unsigned long)model_stack, (unsigned long)total_stack,
           (unsigned long)gr_stack_reserve(), (unsigned long)gr_heap_used());
#endif
    return 0;
}
