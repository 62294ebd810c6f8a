// Target for agent injection tests (issue 4, DESIGN §4.6, REMOTE-CALL.md R3).
//
// Threads:
//   simd-sleep: loads magic values into xmm8-xmm15, then sleeps 2 s with a raw nanosleep syscall,
//               then checks the registers and prints "simd-sleep elapsed=<ms> xmm=ok|CLOBBERED"
//               (a hijacked sleep must still take 2 s, and its vector registers must be unchanged).
//   sleeper:    glibc nanosleep(2 s) in a loop, prints "sleep elapsed=<ms>".
//   reader:     read() on a pipe that the main thread writes on "poke"; prints "read got=<c>".
//   waiter:     pthread_cond_wait; woken on "poke"; prints "cond woke".
//   busy:       spins in user code.
//   mallocer:   malloc/free of varied sizes in a loop (holds allocator locks often).
// Main thread reads commands on stdin: "poke" (wake reader and waiter), "threads" (print count),
// "fork" (fork a child that prints "child ready <pid>" and stays), "quit".
// Prints "ready" once every thread runs.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int pipefd[2];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int woken;
static atomic_int started;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void *simd_sleep(void *arg) {
    (void)arg;
    static const uint64_t magic[16] = {
        0x1111111111111111, 0x2222222222222222, 0x3333333333333333, 0x4444444444444444,
        0x5555555555555555, 0x6666666666666666, 0x7777777777777777, 0x8888888888888888,
        0x9999999999999999, 0xaaaaaaaaaaaaaaaa, 0xbbbbbbbbbbbbbbbb, 0xcccccccccccccccc,
        0xdddddddddddddddd, 0xeeeeeeeeeeeeeeee, 0x0f0f0f0f0f0f0f0f, 0xf0f0f0f0f0f0f0f0};
    atomic_fetch_add(&started, 1);
    for (;;) {
        uint64_t out[16];
        struct timespec ts = {2, 0};
        long ret;
        double t0 = now_ms();
        __asm__ volatile(
            "movdqu 0(%[in]), %%xmm8\n\t"
            "movdqu 16(%[in]), %%xmm9\n\t"
            "movdqu 32(%[in]), %%xmm10\n\t"
            "movdqu 48(%[in]), %%xmm11\n\t"
            "movdqu 64(%[in]), %%xmm12\n\t"
            "movdqu 80(%[in]), %%xmm13\n\t"
            "movdqu 96(%[in]), %%xmm14\n\t"
            "movdqu 112(%[in]), %%xmm15\n\t"
            "syscall\n\t"
            "movdqu %%xmm8, 0(%[out])\n\t"
            "movdqu %%xmm9, 16(%[out])\n\t"
            "movdqu %%xmm10, 32(%[out])\n\t"
            "movdqu %%xmm11, 48(%[out])\n\t"
            "movdqu %%xmm12, 64(%[out])\n\t"
            "movdqu %%xmm13, 80(%[out])\n\t"
            "movdqu %%xmm14, 96(%[out])\n\t"
            "movdqu %%xmm15, 112(%[out])\n\t"
            : "=a"(ret)
            : "a"((long)SYS_nanosleep), "D"(&ts), "S"(0L), [in] "r"(magic), [out] "r"(out)
            : "rcx", "r11", "memory", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
        double el = now_ms() - t0;
        int ok = memcmp(out, magic, sizeof out) == 0;
        printf("simd-sleep elapsed=%.1f ret=%ld xmm=%s\n", el, ret, ok ? "ok" : "CLOBBERED");
        fflush(stdout);
    }
    return NULL;
}

static void *sleeper(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    for (;;) {
        struct timespec ts = {2, 0};
        double t0 = now_ms();
        int r = nanosleep(&ts, NULL);
        printf("sleep elapsed=%.1f ret=%d\n", now_ms() - t0, r);
        fflush(stdout);
    }
    return NULL;
}

static void *reader(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    for (;;) {
        char c;
        ssize_t n = read(pipefd[0], &c, 1);
        printf("read n=%zd got=%c\n", n, n == 1 ? c : '?');
        fflush(stdout);
    }
    return NULL;
}

static void *waiter(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    pthread_mutex_lock(&mu);
    for (;;) {
        while (!woken) pthread_cond_wait(&cv, &mu);
        woken = 0;
        printf("cond woke\n");
        fflush(stdout);
    }
    return NULL;
}

static volatile uint64_t sink;
static void *busy(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    for (uint64_t i = 0;; i++) sink += i * 2654435761u;
    return NULL;
}

static void *mallocer(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    void *keep[64] = {0};
    for (uint64_t i = 0;; i++) {
        size_t k = i % 64;
        free(keep[k]);
        size_t sz = 16 + (i * 7919) % (i % 97 == 0 ? 300000 : 4000);
        keep[k] = malloc(sz);
        if (keep[k]) memset(keep[k], (int)i, sz < 64 ? sz : 64);
    }
    return NULL;
}

int main(void) {
    if (pipe(pipefd) != 0) return 1;
    void *(*fns[])(void *) = {simd_sleep, sleeper, reader, waiter, busy, mallocer};
    const char *names[] = {"simd-sleep", "sleeper", "reader", "waiter", "busy", "mallocer"};
    int n = sizeof fns / sizeof fns[0];
    for (int i = 0; i < n; i++) {
        pthread_t t;
        pthread_create(&t, NULL, fns[i], NULL);
        pthread_setname_np(t, names[i]); /* tests find threads by /proc/PID/task/TID/comm */
    }
    while (atomic_load(&started) < n) usleep(1000);
    printf("ready pid=%d\n", getpid());
    fflush(stdout);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "poke", 4)) {
            if (write(pipefd[1], "x", 1) != 1) return 2;
            pthread_mutex_lock(&mu);
            woken = 1;
            pthread_cond_signal(&cv);
            pthread_mutex_unlock(&mu);
        } else if (!strncmp(line, "fork", 4)) {
            pid_t c = fork();
            if (c == 0) {
                printf("child ready %d\n", getpid());
                fflush(stdout);
                for (;;) pause();
            }
        } else if (!strncmp(line, "quit", 4)) {
            return 0;
        }
    }
    return 0;
}
