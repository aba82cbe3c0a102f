/* Stack and heap measurement on the bare-metal boards (startup_mps2.c). */
#ifndef GR_STACK_H
#define GR_STACK_H
#include <stddef.h>

void gr_stack_paint(void);        /* repaint the stack below the caller */
size_t gr_stack_used(void);       /* bytes from the stack top to the deepest touched word */
size_t gr_stack_depth(void);      /* bytes in use right now (at the caller) */
size_t gr_stack_reserve(void);    /* the reserved stack size */
size_t gr_heap_used(void);        /* bytes handed out by _sbrk */

#endif
