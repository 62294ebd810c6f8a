/*
 * shadow_host: a C "server" whose request handler is taken over by patches it dlopens itself
 * (standing in for `relive apply`: same agent, same undefined-symbol binding, same order). With
 * LD_PRELOAD=librelive_agent.so:
 *   1. dlopen v1 (RTLD_NOW: every relive_shadow_* must bind to the agent), serve R1 requests per
 *      connection through v1: each connection gets a counter (shadow variable created by v1);
 *   2. dlopen the cumulative v2, switch to it, dlclose v1 (the replaced patch is gone; its
 *      variables stay: SV7), serve R2 more: counters continue from R1 and still say "made by v1";
 *   3. call v2's post_unpatch (disable the last patch): every counter is freed, none leaks.
 * Usage: shadow_host V1.so V2.so. Prints "ready", one line per step, "done"; "FAIL ..." on error.
 */
#define _GNU_SOURCE
#define RELIVE_SHADOW_WEAK
#include <relive_shadow.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define NCONN 64
#define NTHREADS 4
#define R1 500
#define R2 300

struct conn {
    int fd;
    int state;
};

typedef long (*handler_t)(struct conn *);
static struct conn conns[NCONN];
static handler_t volatile handler;
static long rounds;

#define FAIL(...)                                                                                 \
    do {                                                                                          \
        printf("FAIL " __VA_ARGS__);                                                              \
        printf("\n");                                                                             \
        exit(1);                                                                                  \
    } while (0)

static void *serve(void *arg) {
    (void)arg;
    for (long r = 0; r < rounds; r++)
        for (int i = 0; i < NCONN; i++)
            if (handler(&conns[i]) <= 0)
                FAIL("handler failed for conn %d", i);
    return NULL;
}

static void serve_all(long n) {
    pthread_t th[NTHREADS];
    rounds = n;
    for (long t = 0; t < NTHREADS; t++)
        pthread_create(&th[t], NULL, serve, NULL);
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
}

static void *must_dlopen(const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h)
        FAIL("dlopen %s: %s", path, dlerror());
    return h;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 3)
        FAIL("usage: shadow_host V1.so V2.so");
    if (!relive_shadow_count)
        FAIL("agent missing: relive_shadow_* not found (preload librelive_agent.so)");
    for (int i = 0; i < NCONN; i++)
        conns[i].fd = 10 + i;
    printf("ready pid=%d\n", getpid());

    void *v1 = must_dlopen(argv[1]);
    handler = (handler_t)dlsym(v1, "patch_handle_request");
    if (!handler)
        FAIL("v1 lacks patch_handle_request");
    serve_all(R1);
    long c0 = handler(&conns[0]) - 1; /* peek: one extra request on conn 0 */
    printf("v1 served per_conn=%d conn0=%ld count=%zu\n", NTHREADS * R1, c0, relive_shadow_count());

    void *v2 = must_dlopen(argv[2]);
    handler_t h2 = (handler_t)dlsym(v2, "patch_handle_request");
    long (*origin)(struct conn *) = (long (*)(struct conn *))dlsym(v2, "patch_counter_origin");
    long (*post_unpatch)(void) = (long (*)(void))dlsym(v2, "patch_post_unpatch");
    if (!h2 || !origin || !post_unpatch)
        FAIL("v2 lacks its functions");
    handler = h2;
    if (dlclose(v1) != 0)
        FAIL("dlclose v1: %s", dlerror());
    printf("v1 unloaded count=%zu\n", relive_shadow_count());
    serve_all(R2);
    long want = NTHREADS * (R1 + R2);
    for (int i = 0; i < NCONN; i++) {
        long next = h2(&conns[i]); /* one more request, through v2 */
        long expect = want + 1 + (i == 0);
        if (next != expect)
            FAIL("conn %d: count %ld after v2, want %ld (counter not inherited)", i, next, expect);
        if (origin(&conns[i]) != 1)
            FAIL("conn %d: counter made by version %ld, want 1 (v1)", i, origin(&conns[i]));
    }
    printf("v2 inherited per_conn=%ld origin=v1 count=%zu\n", want, relive_shadow_count());

    long freed = post_unpatch();
    printf("v2 post_unpatch freed=%ld count=%zu\n", freed, relive_shadow_count());
    for (int i = 0; i < NCONN; i++)
        if (relive_shadow_get(&conns[i], 0x72657173UL))
            FAIL("conn %d kept its counter", i);
    dlclose(v2);
    printf("done\n");
    return 0;
}
