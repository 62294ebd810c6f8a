/* Second translation unit of the sympos fixture: its own static `helper`. */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <sys/prctl.h>

extern volatile unsigned long tu_sink;
extern volatile int tu_reached;

static __attribute__((noinline)) void helper(void) {
    __atomic_add_fetch(&tu_reached, 1, __ATOMIC_SEQ_CST);
    for (;;) tu_sink += (unsigned long)poll(0, 0, 1000000);
}

static void *tu2_main(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "tu2");
    helper();
    return 0;
}

void tu2_start(void) {
    pthread_t t;
    pthread_create(&t, 0, tu2_main, 0);
}
