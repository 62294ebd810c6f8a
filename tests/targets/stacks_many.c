/* Benchmark and stress fixture (issue 3): argv[1] threads, each recursing argv[2] frames deep and
 * then blocking in nanosleep, so each thread's stack has about argv[2] + 5 frames. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static int depth;
static volatile int reached;
volatile unsigned long many_sink;

__attribute__((noinline)) unsigned long deep(int n) {
    if (n <= 0) {
        __atomic_add_fetch(&reached, 1, __ATOMIC_SEQ_CST);
        for (;;) {
            struct timespec ts = {1000, 0};
            nanosleep(&ts, NULL);
            many_sink++;
        }
    }
    unsigned long r = deep(n - 1);
    __asm__ volatile("" ::: "memory");
    return r + (unsigned long)n;
}

static void *worker(void *a) {
    (void)a;
    return (void *)deep(depth);
}

int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int n = argc > 1 ? atoi(argv[1]) : 10;
    depth = argc > 2 ? atoi(argv[2]) : 15;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 128 * 1024);
    for (int i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker, NULL)) { perror("pthread_create"); return 1; }
    }
    while (__atomic_load_n(&reached, __ATOMIC_SEQ_CST) < n) usleep(200);
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) pause();
}
