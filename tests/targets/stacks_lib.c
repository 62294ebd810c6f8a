/* Shared library for the deleted-library test (issue 3): lib_block() blocks forever. */
#include <time.h>

volatile unsigned long lib_sink;

__attribute__((noinline)) void lib_block(volatile int *reached) {
    __atomic_store_n(reached, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        struct timespec ts = {1000, 0};
        nanosleep(&ts, 0);
        lib_sink++;
    }
}
