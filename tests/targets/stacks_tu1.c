/* Fixture for issue 3 symbols tests (SPEC D5): a static `helper` here and another static `helper`
 * in stacks_tu2.c. Each runs in its own thread, blocked, so both appear on stacks. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

void tu2_start(void);
volatile unsigned long tu_sink;
volatile int tu_reached;

static __attribute__((noinline)) void helper(void) {
    __atomic_add_fetch(&tu_reached, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        struct timespec ts = {1000, 0};
        nanosleep(&ts, NULL);
        tu_sink++;
    }
}

static void *tu1_main(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "tu1");
    helper();
    return NULL;
}

int main(void) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    pthread_t t;
    pthread_create(&t, NULL, tu1_main, NULL);
    tu2_start();
    while (__atomic_load_n(&tu_reached, __ATOMIC_SEQ_CST) < 2) usleep(100);
    printf("ready %d\n", getpid());
    fflush(stdout);
    pthread_join(t, NULL);
    return 0;
}
