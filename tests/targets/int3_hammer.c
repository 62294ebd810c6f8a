/* Stop-free entry writes (issue 5, PAUSE-FREE.md): a target whose function f is hammered by threads and
 * by a SIGUSR1 timer handler while the agent rewrites f's first instruction with the int3 protocol.
 *
 *   int3_hammer THREADS [mask] [fillmask] [apptrap]
 *
 * f starts with one 5-byte NOP (like -fpatchable-function-entry=5) and returns 2x+1; f_new returns 2x+2.
 * Every result is checked: old or new, anything else counts as BAD.
 *   mask      every hammer thread blocks SIGTRAP with pthread_sigmask (the agent must strip it)
 *   fillmask  the SIGUSR1 handler is installed with sa_mask = sigfillset (the agent must strip SIGTRAP)
 *   apptrap   the application installs its own SIGTRAP handler with signal() after the agent loaded
 *
 * Prints "ready" once every thread runs and the timer is armed, then "addrs f=0x… f_new=0x…".
 * Commands on stdin, one per line:
 *   stats     -> "stats calls=N bad=N usr1=N usr1calls=N chained=N"
 *   raise     -> raise(SIGTRAP), then "raised chained=N"
 *   rawblock  -> blocks SIGTRAP in the main thread with the raw syscall, then "rawblocked tid=N"
 *   fork      -> forks a child that calls f in a loop (and dies with this process), then "forked child=N"
 *   quit      -> exit(0)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

__asm__(".text\n"
        ".globl f\n"
        ".type f,@function\n"
        ".p2align 6\n"
        "f:\n"
        "  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n" /* nopl 0x0(%rax,%rax,1): the site */
        "  lea 1(%rdi,%rdi), %rax\n"
        "  ret\n"
        ".size f, .-f\n"
        ".globl f_new\n"
        ".type f_new,@function\n"
        ".p2align 4\n"
        "f_new:\n"
        "  lea 2(%rdi,%rdi), %rax\n"
        "  ret\n"
        ".size f_new, .-f_new\n");

long f(long x);
long f_new(long x);

static long (*volatile fp)(long) = f;
static atomic_ulong calls, bad, usr1, usr1calls, chained;
static atomic_int started;
static int opt_mask, opt_fillmask, opt_apptrap;

static void check(long x, long r) {
    if (r != 2 * x + 1 && r != 2 * x + 2)
        atomic_fetch_add(&bad, 1);
}

static void on_usr1(int sig) {
    (void)sig;
    static _Thread_local long x = 7;
    for (int i = 0; i < 3; i++, x++)
        check(x, fp(x));
    atomic_fetch_add(&usr1, 1);
    atomic_fetch_add(&usr1calls, 3);
}

static void on_trap(int sig) {
    (void)sig;
    atomic_fetch_add(&chained, 1);
}

static void *hammer(void *arg) {
    if (opt_mask) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGTRAP);
        pthread_sigmask(SIG_BLOCK, &s, NULL);
    }
    long x = (long)(size_t)arg * 1000003;
    atomic_fetch_add(&started, 1);
    for (;;) {
        unsigned long n = 0, b = 0;
        for (int i = 0; i < 4096; i++, x++) {
            long r = fp(x);
            b += (r != 2 * x + 1 && r != 2 * x + 2);
            n++;
        }
        atomic_fetch_add(&calls, n);
        if (b)
            atomic_fetch_add(&bad, b);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 4;
    for (int i = 2; i < argc; i++) {
        opt_mask |= !strcmp(argv[i], "mask");
        opt_fillmask |= !strcmp(argv[i], "fillmask");
        opt_apptrap |= !strcmp(argv[i], "apptrap");
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (opt_apptrap && signal(SIGTRAP, on_trap) == SIG_ERR) {
        perror("signal(SIGTRAP)");
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    if (opt_fillmask)
        sigfillset(&sa.sa_mask);
    else
        sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) != 0) {
        perror("sigaction(SIGUSR1)");
        return 1;
    }
    for (int i = 0; i < threads; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, hammer, (void *)(size_t)(i + 1)) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    while (atomic_load(&started) < threads)
        sched_yield();
    /* The hammers exist and take SIGUSR1; the main thread, which reads commands, takes none. */
    sigset_t usr1set;
    sigemptyset(&usr1set);
    sigaddset(&usr1set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &usr1set, NULL);
    if (threads > 0) {
        timer_t tm;
        struct sigevent sev;
        memset(&sev, 0, sizeof sev);
        sev.sigev_notify = SIGEV_SIGNAL;
        sev.sigev_signo = SIGUSR1;
        if (timer_create(CLOCK_MONOTONIC, &sev, &tm) != 0) {
            perror("timer_create");
            return 1;
        }
        struct itimerspec its = {{0, 200000}, {0, 200000}};
        timer_settime(tm, 0, &its, NULL);
    }
    printf("ready\n");
    printf("addrs f=%p f_new=%p\n", (void *)f, (void *)f_new);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "stats", 5)) {
            printf("stats calls=%lu bad=%lu usr1=%lu usr1calls=%lu chained=%lu\n", atomic_load(&calls),
                   atomic_load(&bad), atomic_load(&usr1), atomic_load(&usr1calls), atomic_load(&chained));
        } else if (!strncmp(line, "raise", 5)) {
            raise(SIGTRAP);
            printf("raised chained=%lu\n", atomic_load(&chained));
        } else if (!strncmp(line, "rawblock", 8)) {
            unsigned long bit = 1UL << (SIGTRAP - 1);
            syscall(SYS_rt_sigprocmask, SIG_BLOCK, &bit, NULL, 8);
            printf("rawblocked tid=%ld\n", (long)syscall(SYS_gettid));
        } else if (!strncmp(line, "fork", 4)) {
            pid_t parent = getpid();
            pid_t c = fork();
            if (c == 0) {
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                if (getppid() != parent)
                    _exit(1);
                for (long x = 0;; x++) {
                    check(x, fp(x));
                    usleep(100);
                }
            }
            printf("forked child=%d\n", (int)c);
        } else if (!strncmp(line, "quit", 4)) {
            exit(0);
        }
    }
    return 0;
}
