/* Reset and fault handling for Cortex-M4/M7 on the QEMU MPS2 boards.
 *
 * Reset: paint the stack (so the harness can measure its high-water mark), copy
 * .data from flash, zero .bss, enable the FPU, start semihosting stdio, and exit
 * through semihosting with main's return value (QEMU exits with that code).
 * A fault prints one line through semihosting and exits with code 70 so a broken
 * model never hangs the emulator. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "gr_stack.h"

extern uint32_t __data_load__[], __data_start__[], __data_end__[];
extern uint32_t __bss_start__[], __bss_end__[];
extern char __heap_start__[], __heap_end__[];
extern uint32_t __stack_limit__[], __stack_top__[];

extern int main(int argc, char **argv);
extern void initialise_monitor_handles(void);

void Reset_Handler(void);
void Fault_Handler(void);

#define SEMIHOSTING_SYS_WRITE0 0x04
#define SEMIHOSTING_SYS_EXIT_EXTENDED 0x20
#define ADP_STOPPED_APPLICATION_EXIT 0x20026

static int semihost(int op, const void *arg)
{
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

__attribute__((used, section(".vectors")))
static void (*const vectors[16])(void) = {
    (void (*)(void))__stack_top__,
    Reset_Handler,
    Fault_Handler,   /* NMI */
    Fault_Handler,   /* HardFault */
    Fault_Handler,   /* MemManage */
    Fault_Handler,   /* BusFault */
    Fault_Handler,   /* UsageFault */
    0, 0, 0, 0,
    Fault_Handler,   /* SVCall */
    Fault_Handler,   /* DebugMonitor */
    0,
    Fault_Handler,   /* PendSV */
    Fault_Handler,   /* SysTick */
};

void Fault_Handler(void)
{
    static const uint32_t exit_block[2] = {ADP_STOPPED_APPLICATION_EXIT, 70};
    semihost(SEMIHOSTING_SYS_WRITE0, "gr: fault: the firmware hit a CPU exception\n");
    semihost(SEMIHOSTING_SYS_EXIT_EXTENDED, exit_block);
    for (;;) {
    }
}

void Reset_Handler(void)
{
    gr_stack_paint();
    for (uint32_t *src = __data_load__, *dst = __data_start__; dst < __data_end__;)
        *dst++ = *src++;
    for (uint32_t *dst = __bss_start__; dst < __bss_end__;)
        *dst++ = 0;
    /* CP10/CP11 full access: the hard-float ABI uses the FPU from the first call. */
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    initialise_monitor_handles();
    exit(main(0, NULL));
}

/* newlib's allocator grows the heap through _sbrk; keep it inside .heap so it can
 * never run into the stack reserve (the library's weak version only checks sp). */
void *_sbrk(ptrdiff_t incr)
{
    static char *brk = __heap_start__;
    if (incr > __heap_end__ - brk)
        return (void *)-1;
    char *prev = brk;
    brk += incr;
    return prev;
}

size_t gr_heap_used(void)
{
    return (size_t)((char *)_sbrk(0) - __heap_start__);
}

/* Stack painting: fill the unused stack with a pattern; the deepest word that no
 * longer holds it is the high-water mark. */
#define GR_STACK_PAINT 0xC5A5C5A5u

static inline uint32_t *current_sp(void)
{
    uint32_t *sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    return sp;
}

__attribute__((noinline)) void gr_stack_paint(void)
{
    uint32_t *stop = current_sp() - 16;   /* leave this function's own frame alone */
    for (uint32_t *p = __stack_limit__; p < stop; ++p)
        *p = GR_STACK_PAINT;
}

size_t gr_stack_used(void)
{
    const uint32_t *p = __stack_limit__;
    while (p < __stack_top__ && *p == GR_STACK_PAINT)
        ++p;
    return (size_t)((const char *)__stack_top__ - (const char *)p);
}

size_t gr_stack_depth(void)
{
    return (size_t)((const char *)__stack_top__ - (const char *)current_sp());
}

size_t gr_stack_reserve(void)
{
    return (size_t)((const char *)__stack_top__ - (const char *)__stack_limit__);
}
