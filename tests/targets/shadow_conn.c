/*
 * shadow_conn: a C program that attaches a per-connection counter to its own connection structs
 * through the agent's shadow-variable C ABI (include/relive_shadow.h), proving the exported ABI
 * from another language in a real process (issue 6, SPEC §7).
 *
 * Run with LD_PRELOAD=librelive_agent.so. The functions are declared weak (RELIVE_SHADOW_WEAK), so
 * the program links against nothing and finds them in the preloaded agent; it cross-checks each
 * against dlsym(RTLD_DEFAULT, ...). Without the agent it prints "agent missing" and exits 2.
 *
 * Protocol (stdout, one line each): "ready pid=N conns=C threads=T", then the results of each step
 * ("sv1 ...", "sv3 ...", ...), then "done". Any failed check prints "FAIL <what>" and exits 1.
 * Usage: shadow_conn [rounds]
 */
#define _GNU_SOURCE
#define RELIVE_SHADOW_WEAK
#include <relive_shadow.h>

#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NCONN 256
#define NTHREADS 6
#define ID_COUNTER 0x636f756e74UL /* "count" */
#define ID_TAG 0x746167UL         /* "tag" */
#define MAGIC 0x5ad0c0ffeeUL

/* The program's own struct: the patch-like code below never changes its layout. */
struct conn {
    int fd;
    int state;
    char peer[24];
};

/* What the shadow variable adds to each connection. */
struct conn_counter {
    atomic_long requests;
    unsigned long magic;
    int fd;
};

static struct conn conns[NCONN];
static atomic_long ctor_calls, dtor_calls, dtor_bad, handler_hits, handler_bad;
static long rounds = 2000;
static pthread_barrier_t start_barrier;

#define CHECK(cond, ...)                                                                          \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            printf("FAIL " __VA_ARGS__);                                                          \
            printf("\n");                                                                         \
            fflush(stdout);                                                                       \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

static int counter_ctor(void *obj, void *shadow_data, void *ctor_data) {
    struct conn *c = obj;
    struct conn_counter *k = shadow_data;
    (void)ctor_data;
    /* SV3: zero-filled and 16-byte aligned before the ctor runs. */
    if (k->magic != 0 || atomic_load(&k->requests) != 0 || ((uintptr_t)k & 15) != 0)
        return -22;
    k->magic = MAGIC;
    k->fd = c->fd;
    atomic_fetch_add(&ctor_calls, 1);
    return 0;
}

static void counter_dtor(void *obj, void *shadow_data) {
    struct conn *c = obj;
    struct conn_counter *k = shadow_data;
    if (k->magic != MAGIC || k->fd != c->fd)
        atomic_fetch_add(&dtor_bad, 1);
    atomic_fetch_add(&dtor_calls, 1);
}

static int failing_ctor(void *obj, void *shadow_data, void *ctor_data) {
    (void)obj, (void)shadow_data, (void)ctor_data;
    return -12;
}

/* The "patched" request handler: counts requests per connection in a shadow variable. */
static void handle_request(struct conn *c) {
    struct conn_counter *k =
        relive_shadow_get_or_alloc(c, ID_COUNTER, sizeof *k, 0, counter_ctor, NULL);
    CHECK(k != NULL, "get_or_alloc returned NULL for conn fd %d", c->fd);
    atomic_fetch_add(&k->requests, 1);
}

/* SV2 from a signal handler: get is async-signal-safe. */
static void on_sigusr1(int sig) {
    (void)sig;
    struct conn_counter *k = relive_shadow_get(&conns[0], ID_COUNTER);
    if (k && k->magic == MAGIC && k->fd == conns[0].fd)
        atomic_fetch_add(&handler_hits, 1);
    else if (k)
        atomic_fetch_add(&handler_bad, 1);
}

static void *worker(void *arg) {
    long t = (long)arg;
    pthread_barrier_wait(&start_barrier);
    for (long r = 0; r < rounds; r++) {
        /* Every thread serves every connection, starting at a different one: overlapping keys. */
        for (int i = 0; i < NCONN; i++)
            handle_request(&conns[(i + t * 37) % NCONN]);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1)
        rounds = atol(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!relive_shadow_get || !relive_shadow_alloc || !relive_shadow_get_or_alloc ||
        !relive_shadow_free || !relive_shadow_free_all || !relive_shadow_count) {
        printf("agent missing: relive_shadow_* not found (preload librelive_agent.so)\n");
        return 2;
    }
    CHECK(dlsym(RTLD_DEFAULT, "relive_shadow_get") == (void *)relive_shadow_get &&
              dlsym(RTLD_DEFAULT, "relive_shadow_free_all") == (void *)relive_shadow_free_all,
          "dlsym disagrees with the dynamic linker");
    Dl_info info;
    CHECK(dladdr((void *)relive_shadow_get, &info) && info.dli_fname, "dladdr");
    for (int i = 0; i < NCONN; i++) {
        conns[i].fd = 100 + i;
        snprintf(conns[i].peer, sizeof conns[i].peer, "10.0.0.%d", i);
    }
    printf("ready pid=%d conns=%d threads=%d agent=%s\n", getpid(), NCONN, NTHREADS, info.dli_fname);

    /* SV1/SV2: nothing yet. */
    size_t base = relive_shadow_count();
    for (int i = 0; i < NCONN; i++)
        CHECK(relive_shadow_get(&conns[i], ID_COUNTER) == NULL, "get on an empty table");
    printf("sv2 empty ok base=%zu\n", base);

    /* Threads count requests per connection; SIGUSR1 handlers read conn 0's counter meanwhile
     * (created here first, so that every handler finds it). */
    CHECK(relive_shadow_get_or_alloc(&conns[0], ID_COUNTER, sizeof(struct conn_counter), 0,
                                     counter_ctor, NULL) != NULL,
          "first get_or_alloc");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigusr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t th[NTHREADS];
    pthread_barrier_init(&start_barrier, NULL, NTHREADS + 1);
    for (long t = 0; t < NTHREADS; t++)
        pthread_create(&th[t], NULL, worker, (void *)t);
    pthread_barrier_wait(&start_barrier);
    for (int s = 0; s < 2000; s++) {
        pthread_kill(th[s % NTHREADS], SIGUSR1);
        if (s % 64 == 0)
            sched_yield();
    }
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
    long want = rounds * NTHREADS;
    for (int i = 0; i < NCONN; i++) {
        struct conn_counter *k = relive_shadow_get(&conns[i], ID_COUNTER);
        CHECK(k && k->magic == MAGIC && k->fd == conns[i].fd, "conn %d lost its counter", i);
        CHECK(atomic_load(&k->requests) == want, "conn %d counted %ld, want %ld", i,
              atomic_load(&k->requests), want);
        CHECK(conns[i].state == 0, "the struct itself changed");
    }
    printf("sv4 counters ok ctor_calls=%ld requests_per_conn=%ld handler_hits=%ld handler_bad=%ld\n",
           atomic_load(&ctor_calls), want, atomic_load(&handler_hits), atomic_load(&handler_bad));

    /* SV3: a duplicate alloc returns NULL (and the agent prints "Duplicate shadow variable <obj, id>"
     * on stderr); a failing ctor returns NULL and leaves nothing; a second id on the same obj. */
    void *dup = relive_shadow_alloc(&conns[5], ID_COUNTER, sizeof(struct conn_counter), 0, counter_ctor, NULL);
    CHECK(dup == NULL, "duplicate alloc returned %p", dup);
    printf("sv3 duplicate obj=%p id=%#lx null\n", (void *)&conns[5], ID_COUNTER);
    CHECK(relive_shadow_alloc(&conns[6], ID_TAG, 8, 0, failing_ctor, NULL) == NULL, "failing ctor");
    CHECK(relive_shadow_get(&conns[6], ID_TAG) == NULL, "failing ctor left a variable");
    char *tag = relive_shadow_alloc(&conns[6], ID_TAG, 32, 0, NULL, NULL);
    CHECK(tag && ((uintptr_t)tag & 15) == 0, "tag alloc");
    strcpy(tag, "vip");
    CHECK(relive_shadow_count() == base + NCONN + 1, "count %zu", relive_shadow_count());
    printf("sv3 ok count=%zu\n", relive_shadow_count() - base);

    /* SV5: free one with its dtor; absent keys are no-ops. */
    relive_shadow_free(&conns[6], ID_TAG, NULL);
    relive_shadow_free(&conns[6], ID_TAG, NULL);
    relive_shadow_free(&conns[0], ID_COUNTER, counter_dtor);
    CHECK(relive_shadow_get(&conns[0], ID_COUNTER) == NULL, "freed conn 0 still has a counter");
    CHECK(atomic_load(&dtor_calls) == 1, "dtor calls %ld", atomic_load(&dtor_calls));

    /* SV6: free_all of the counter id, with the dtor: exactly one dtor per remaining connection. */
    relive_shadow_free_all(ID_COUNTER, counter_dtor);
    CHECK(atomic_load(&dtor_calls) == NCONN, "dtor calls %ld, want %d", atomic_load(&dtor_calls), NCONN);
    CHECK(atomic_load(&dtor_bad) == 0, "a dtor saw foreign data");
    CHECK(atomic_load(&ctor_calls) == NCONN, "ctor calls %ld, want %d", atomic_load(&ctor_calls), NCONN);
    for (int i = 0; i < NCONN; i++)
        CHECK(relive_shadow_get(&conns[i], ID_COUNTER) == NULL, "conn %d kept its counter", i);
    printf("sv6 ok ctor_calls=%ld dtor_calls=%ld count_after=%zu\n", atomic_load(&ctor_calls),
           atomic_load(&dtor_calls), relive_shadow_count() - base);
    printf("done\n");
    return 0;
}
