/*
 * states_host: the target of the live system-state and shadow tests (crates/cli/tests/states_live.rs,
 * SPEC §8 T-st1–T-st4, §7 SV7 through `relive apply`). Run with LD_PRELOAD=librelive_agent.so.
 *
 * - `console_loglevel`: the "system state" the state patches change in post_patch and restore in
 *   pre_unpatch (the kernel's test_klp_state modifies console_loglevel the same way);
 * - `struct conn` and `handle_request(struct conn *)`: the function the patches replace; the shadow
 *   patches hang a per-connection counter off each connection (SPEC §7).
 *
 * Protocol: prints "states host ready", then for each stdin line "tick": calls handle_request on
 * every connection and prints
 *   "tick loglevel=L r=R0,R1,R2 shadows=N prev1=null|set"
 * (R: what handle_request returned, N: relive_shadow_count(), prev1: relive_state_get_prev(1),
 * which ST2 says is NULL outside a transition). EOF on stdin ends it. With "--stall", a thread sits in
 * wait_request forever, so a patch of wait_request stays in transition until it is reversed (L6).
 */
#define RELIVE_SHADOW_WEAK
#include <relive.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Weak: the executable links against nothing; the preloaded agent defines them. */
extern struct relive_state *relive_state_get_prev(unsigned long id) __attribute__((weak));

int console_loglevel = 4;

/* Patches reach the loglevel through this function: relive imports resolve functions only. */
__attribute__((noinline, used)) int *loglevel_slot(void) {
    __asm__ volatile("");
    return &console_loglevel;
}

struct conn {
    int fd;
    long hits;
    char peer[16];
};

static struct conn conns[3] = {{3, 0, "a"}, {4, 0, "b"}, {5, 0, "c"}};

/* The original: counts nothing per connection the caller can see; returns -1. */
__attribute__((noinline)) long handle_request(struct conn *c) {
    __atomic_add_fetch(&c->hits, 1, __ATOMIC_RELAXED);
    __asm__ volatile("" ::: "memory");
    return -1;
}

/* Never returns: a patch that replaces it cannot complete its transition (C5). */
static volatile int stalled;
__attribute__((noinline)) long wait_request(void) {
    __atomic_store_n(&stalled, 1, __ATOMIC_RELEASE);
    for (;;)
        pause();
    return 0;
}

static void *staller(void *arg) {
    (void)arg;
    wait_request();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--stall") == 0) {
        pthread_t t;
        pthread_create(&t, NULL, staller, NULL);
        while (!__atomic_load_n(&stalled, __ATOMIC_ACQUIRE))
            usleep(100);
    }
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("states host ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "tick", 4) != 0)
            continue;
        long r[3];
        for (int i = 0; i < 3; i++)
            r[i] = handle_request(&conns[i]); /* direct: GCC -O2 (-fipa-ra) keeps &conns[i] in %rdi
                                                across the call, which relive's thunk must preserve
                                                (DESIGN §4.3a) */
        printf("tick loglevel=%d r=%ld,%ld,%ld shadows=%zu prev1=%s\n", console_loglevel, r[0], r[1],
               r[2], relive_shadow_count ? relive_shadow_count() : (size_t)-1,
               !relive_state_get_prev ? "missing" : relive_state_get_prev(1) ? "set" : "null");
    }
    return 0;
}
