/* Benchmark target of the transition driver (crates/cli/benches/transition.rs, issue 5 "Benchmark").
 *   --busy N      threads calling bench_fn in a loop; each timestamps its loop and keeps its longest gap
 *   --nap N       threads in a 1 ms nanosleep loop; each keeps its longest oversleep beyond 1 ms
 *   --blocked N   threads blocked in pause() (not inside patched code)
 *   --hold        one thread sleeps inside hold_fn forever (keeps a transition of the -DHOLD patch pending)
 * stdin commands: "reset" (clear the longest gaps), "report" (print "pause max_ns=<n>"),
 *   "cost" (print "cost direct_ns=<x> patched_ns=<y>": ns per call of bench_direct and bench_fn, same code).
 * Readiness: "bench ready". Threads use small stacks so 1000 fit. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static atomic_long max_gap;
static atomic_int started;
volatile long bench_sink;

__attribute__((noipa)) long bench_fn(long x) {
    return x * 2 + 1;
}

__attribute__((noipa)) long bench_direct(long x) {
    return x * 2 + 1;
}

/* A thread sleeps in here forever (--hold) so that a transition stays pending while the dispatcher's cost is
 * measured. */
__attribute__((noipa)) void hold_fn(void) {
    for (;;) pause();
}

static void *holder(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    hold_fn();
    return NULL;
}

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void note(long gap) {
    long m = atomic_load(&max_gap);
    while (gap > m && !atomic_compare_exchange_weak(&max_gap, &m, gap)) {
    }
}

static void *busy(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    long last = now_ns();
    for (long n = 0;; n++) {
        for (int i = 0; i < 64; i++) bench_sink += bench_fn(n + i);
        long t = now_ns();
        note(t - last);
        last = t;
    }
    return NULL;
}

static void *nap(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    for (;;) {
        long t0 = now_ns();
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
        long over = now_ns() - t0 - 1000 * 1000;
        if (over > 0) note(over);
    }
    return NULL;
}

static void *blocked(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    for (;;) pause();
    return NULL;
}

static double cost(long (*fn)(long)) {
    long best = -1;
    for (int rep = 0; rep < 5; rep++) {
        long t0 = now_ns();
        long s = 0;
        for (long i = 0; i < 2000000; i++) s += fn(i);
        long t = now_ns() - t0;
        bench_sink += s;
        if (best < 0 || t < best) best = t;
    }
    return best / 2000000.0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int nbusy = 0, nnap = 0, nblocked = 0, hold = 0;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--hold")) hold = 1;
    for (int i = 1; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "--busy")) nbusy = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--nap")) nnap = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--blocked")) nblocked = atoi(argv[++i]);
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 128 * 1024);
    pthread_t t;
    for (int i = 0; i < nbusy; i++) pthread_create(&t, &attr, busy, NULL);
    for (int i = 0; i < nnap; i++) pthread_create(&t, &attr, nap, NULL);
    for (int i = 0; i < nblocked; i++) pthread_create(&t, &attr, blocked, NULL);
    if (hold) pthread_create(&t, &attr, holder, NULL);
    while (atomic_load(&started) < nbusy + nnap + nblocked + hold) usleep(1000);
    printf("bench ready pid=%d\n", getpid());
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "reset", 5)) atomic_store(&max_gap, 0);
        else if (!strncmp(line, "report", 6)) printf("pause max_ns=%ld\n", atomic_load(&max_gap));
        else if (!strncmp(line, "cost", 4)) {
            double d = 1e9, p = 1e9;
            for (int r = 0; r < 11; r++) {
                double a = cost(bench_direct), b = cost(bench_fn);
                if (a < d) d = a;
                if (b < p) p = b;
            }
            printf("cost direct_ns=%.3f patched_ns=%.3f\n", d, p);
        }
    }
    return 0;
}
