/*
 * shadow_fork: fork safety of the agent's shadow store. Worker threads allocate and free shadow
 * variables nonstop through the C ABI while the main thread forks; each child (single-threaded, a
 * copy taken at an arbitrary moment of the workers' writes) must be able to allocate, read, free and
 * count shadow variables, and must see the variables the parent had before the workers started.
 * A child that hangs (a store lock inherited in the locked state) is killed after 20 s and reported.
 *
 * Run with LD_PRELOAD=librelive_agent.so. Prints "ready pid=N", then "forks ok n=N" or "FAIL ...".
 * Usage: shadow_fork [forks]
 */
#define _GNU_SOURCE
#define RELIVE_SHADOW_WEAK
#include <relive_shadow.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NTHREADS 3
#define ID_CHURN 0xc4u
#define ID_KEEP 0x6b656570UL

static atomic_int stop;
static long keep_obj[16];

static int ctor_mark(void *obj, void *data, void *ctor_data) {
    (void)ctor_data;
    *(void **)data = obj;
    return 0;
}

static void *churn(void *arg) {
    long t = (long)arg;
    char objs[64];
    while (!atomic_load(&stop)) {
        for (int i = 0; i < 64; i++) {
            relive_shadow_alloc(&objs[i], ID_CHURN + t, 24, 0, ctor_mark, NULL);
            relive_shadow_free(&objs[i], ID_CHURN + t, NULL);
        }
    }
    return NULL;
}

/* In the child: every store operation must work (no inherited lock) and see the parent's data. */
static int child_checks(void) {
    for (int i = 0; i < 16; i++) {
        void **p = relive_shadow_get(&keep_obj[i], ID_KEEP);
        if (!p || *p != &keep_obj[i])
            return 3;
    }
    int local;
    void **p = relive_shadow_get_or_alloc(&local, ID_KEEP, 8, 0, ctor_mark, NULL);
    if (!p || *p != &local)
        return 4;
    relive_shadow_free(&local, ID_KEEP, NULL);
    if (relive_shadow_get(&local, ID_KEEP))
        return 5;
    if (relive_shadow_count() < 16)
        return 6;
    return 0;
}

int main(int argc, char **argv) {
    int forks = argc > 1 ? atoi(argv[1]) : 200;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!relive_shadow_get) {
        printf("agent missing: relive_shadow_* not found (preload librelive_agent.so)\n");
        return 2;
    }
    for (int i = 0; i < 16; i++)
        if (!relive_shadow_alloc(&keep_obj[i], ID_KEEP, 8, 0, ctor_mark, NULL)) {
            printf("FAIL keep alloc\n");
            return 1;
        }
    pthread_t th[NTHREADS];
    for (long t = 0; t < NTHREADS; t++)
        pthread_create(&th[t], NULL, churn, (void *)t);
    printf("ready pid=%d\n", getpid());
    for (int f = 0; f < forks; f++) {
        pid_t pid = fork();
        if (pid < 0) {
            printf("FAIL fork: %s\n", strerror(errno));
            return 1;
        }
        if (pid == 0)
            _exit(child_checks());
        int status = 0;
        struct timespec t0, now;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            pid_t w = waitpid(pid, &status, WNOHANG);
            if (w == pid)
                break;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (now.tv_sec - t0.tv_sec >= 20) {
                kill(pid, SIGKILL);
                waitpid(pid, &status, 0);
                printf("FAIL child %d of fork %d hung in the shadow store (inherited lock)\n", pid, f);
                return 1;
            }
            usleep(200);
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            printf("FAIL child of fork %d: status %#x\n", f, status);
            return 1;
        }
    }
    atomic_store(&stop, 1);
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
    printf("forks ok n=%d\n", forks);
    return 0;
}
