/* Fixture for issue 3 (`relive stacks`, DESIGN §4.5): one thread per kind of stack.
 * Threads: sleeper (nanosleep), reader (read on a pipe), futex (pthread_cond_wait), poller (poll),
 * busy (busy loop), sighandler (blocked inside a SIGUSR1 handler that interrupted sig_spin),
 * altstack (the same with the handler on a sigaltstack),
 * recurse (recursion 150 deep, deeper than the default limit 100), vdso (clock_gettime loop).
 * Prints "ready" once every thread reached its blocking point. Built with exact flags by the tests. */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static volatile int reached;
static int pipefd[2];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static volatile unsigned long sink;

static void arrive(void) { __atomic_add_fetch(&reached, 1, __ATOMIC_SEQ_CST); }

__attribute__((noinline)) void sleeper_block(void) {
    arrive();
    for (;;) {
        struct timespec ts = {1000, 0};
        nanosleep(&ts, NULL);
        sink++;
    }
}
static void *sleeper_main(void *a) { (void)a; prctl(PR_SET_NAME, "sleeper"); sleeper_block(); return NULL; }

__attribute__((noinline)) void reader_block(void) {
    char c;
    arrive();
    for (;;) {
        if (read(pipefd[0], &c, 1) <= 0) sink++;
        sink += c;
    }
}
static void *reader_main(void *a) { (void)a; prctl(PR_SET_NAME, "reader"); reader_block(); return NULL; }

__attribute__((noinline)) void futex_block(void) {
    pthread_mutex_lock(&mu);
    arrive();
    for (;;) pthread_cond_wait(&cv, &mu);
}
static void *futex_main(void *a) { (void)a; prctl(PR_SET_NAME, "futex"); futex_block(); return NULL; }

__attribute__((noinline)) void poller_block(void) {
    struct pollfd p = {pipefd[0], 0, 0};
    arrive();
    for (;;) sink += poll(&p, 1, -1);
}
static void *poller_main(void *a) { (void)a; prctl(PR_SET_NAME, "poller"); poller_block(); return NULL; }

__attribute__((noinline)) void busy_loop(void) {
    arrive();
    for (unsigned long i = 0;; i++) {
        sink = sink * 31 + i;
        __asm__ volatile("" ::: "memory");
    }
}
static void *busy_main(void *a) { (void)a; prctl(PR_SET_NAME, "busy"); busy_loop(); return NULL; }

__attribute__((noinline)) void handler_block(void) {
    arrive();
    for (;;) {
        struct timespec ts = {1000, 0};
        nanosleep(&ts, NULL);
        sink++;
    }
}
static void on_sigusr1(int sig) { handler_block(); sink += sig; }
static volatile int spinning;
__attribute__((noinline)) void sig_spin(void) {
    spinning = 1;
    for (unsigned long i = 0;; i++) {
        sink = sink * 7 + i;
        __asm__ volatile("" ::: "memory");
    }
}
static void *sig_main(void *a) { (void)a; prctl(PR_SET_NAME, "sighandler"); sig_spin(); return NULL; }

/* The same on an alternate signal stack (SA_ONSTACK): the handler's frames live on another
 * stack than the interrupted ones. */
static char altstack_mem[64 * 1024];
__attribute__((noinline)) void alt_handler_block(void) {
    arrive();
    for (;;) {
        struct timespec ts = {2000, 0}; /* differs from handler_block: no identical-code folding */
        nanosleep(&ts, NULL);
        sink += 3;
    }
}
static void on_sigusr2(int sig) { alt_handler_block(); sink += sig; }
static volatile int alt_spinning;
__attribute__((noinline)) void alt_spin(void) {
    alt_spinning = 1;
    for (unsigned long i = 0;; i++) {
        sink = sink * 5 + i;
        __asm__ volatile("" ::: "memory");
    }
}
static void *alt_main(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "altstack");
    stack_t ss = {.ss_sp = altstack_mem, .ss_size = sizeof altstack_mem, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    alt_spin();
    return NULL;
}

__attribute__((noinline)) unsigned long recurse(int n) {
    if (n == 0) {
        arrive();
        for (;;) {
            struct timespec ts = {1000, 0};
            nanosleep(&ts, NULL);
            sink++;
        }
    }
    unsigned long r = recurse(n - 1);
    __asm__ volatile("" ::: "memory");
    return r + (unsigned long)n;
}
static void *recurse_main(void *a) { (void)a; prctl(PR_SET_NAME, "recurse"); return (void *)recurse(150); }

__attribute__((noinline)) void vdso_loop(void) {
    struct timespec ts;
    arrive();
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        sink += (unsigned long)ts.tv_nsec;
    }
}
static void *vdso_main(void *a) { (void)a; prctl(PR_SET_NAME, "vdso"); vdso_loop(); return NULL; }

/* argv[1] == "blocked-only": leave out the busy and vDSO threads, so every thread stays put while
 * gdb and relive look at it one after the other (the cross-check). */
int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int blocked_only = argc > 1 && strcmp(argv[1], "blocked-only") == 0;
#ifdef PR_SET_PTRACER
    prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
#endif
    if (pipe(pipefd)) return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigusr1;
    sigaction(SIGUSR1, &sa, NULL);
    void *(*all[])(void *) = {sleeper_main, reader_main, futex_main, poller_main, recurse_main, busy_main, vdso_main};
    void *(**fns)(void *) = all;
    int n = sizeof all / sizeof all[0];
    if (blocked_only) n -= 2;
    pthread_t t;
    for (int i = 0; i < n; i++) pthread_create(&t, NULL, fns[i], NULL);
    pthread_t st;
    pthread_create(&st, NULL, sig_main, NULL);
    while (!spinning) usleep(100);
    pthread_kill(st, SIGUSR1);
    sa.sa_handler = on_sigusr2;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGUSR2, &sa, NULL);
    pthread_t at;
    pthread_create(&at, NULL, alt_main, NULL);
    while (!alt_spinning) usleep(100);
    pthread_kill(at, SIGUSR2);
    while (__atomic_load_n(&reached, __ATOMIC_SEQ_CST) < n + 2) usleep(100);
    printf("ready %d\n", getpid());
    fflush(stdout);
    pthread_join(t, NULL);
    return 0;
}
