/* Consistency oracle for the transition driver (issue 5, test 1; SPEC C5/C5a, DESIGN §4.5).
 *
 * Eight workers call f in a loop; f calls g twice. Each version of g returns a tag in its low byte
 * (the original: 1); each version of f checks that both calls reached the g of its own version and
 * counts any mix in `oracle_mix`. f returns its version number, which each worker records.
 * Two sleepers sit in nanosleep inside other functions. With `--stall` a third kind of thread
 * sleeps forever inside `held` (test 2, T-cb9). With `--churn N` a spawner creates and joins
 * short-lived threads (test 9): each calls f once and checks it runs `want_version`.
 * With `--signals` a signaller interrupts the workers with SIGUSR1 whose handler calls f (test 10).
 * With `--park` a parker thread waits for "park" on stdin, then single-steps (EFLAGS.TF) a call of f until
 * the PC is where f's entry jump leads (the dispatcher's or entry's destination: a thunk or the new f) and
 * holds the thread there inside its SIGTRAP handler until "unpark"; it prints "parked at 0x..." and, after
 * the call returns, "unparked v=<version f returned> mix=<n>". A stop of that thread sees the PC saved in the
 * signal frame: a thread about to enter the new f (the race of the mix test, DESIGN §4.5).
 *
 * With `--block-trap` one more thread blocks SIGTRAP with the raw rt_sigprocmask syscall (past the agent's
 * interposed sigprocmask) and sleeps: the agent must then refuse the stop-free entry write (PAUSE-FREE.md §4).
 * With `--suspend` one more thread waits in sigsuspend with every signal but SIGUSR2 blocked (a daemon's
 * usual wait): the agent's interposed sigsuspend keeps SIGTRAP out of that temporary mask.
 * Built with -DHOTPATCH, f and g start with GCC's 8-byte hot-patch prologue (ms_hook_prologue,
 * `lea 0(%rsp),%rsp`): one instruction under the entry jump, so relive writes the entries stop-free.
 * Every 20 ms the reporter prints one line:
 *   stats calls=<n> v1=<n> v2=<n> ... mix=<n> workers=<v,v,...> churn=<n> churn_bad=<n> sig=<n>
 * Built with -rdynamic so patches resolve g, oracle_mix and friends from the executable.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define WORKERS 8
#define MAXV 8

atomic_long oracle_mix;
atomic_long oracle_calls[MAXV];
atomic_int oracle_worker_version[WORKERS];
atomic_long oracle_churn;
atomic_long oracle_churn_bad;
atomic_long oracle_sig;
/* The version a newly created thread must run (set by the test through stdin: "want N"). */
atomic_int oracle_want = 0;
volatile long oracle_sink;

#ifdef FG_IN_LIB
/* f and g live in libtransition_fg.so (tests/targets/transition_fg.c). */
long g(long x);
int f(long x);
#else
#ifdef HOTPATCH
#define ENTRY __attribute__((noipa, ms_hook_prologue))
#else
#define ENTRY __attribute__((noipa))
#endif
ENTRY long g(long x) {
    long s = x;
    for (int i = 0; i < 40; i++) s = s * 31 + i;
    oracle_sink = s;
    return (s & ~0xffL) | 1;
}

ENTRY int f(long x) {
    long a = g(x);
    for (volatile int i = 0; i < 30; i++) {
    }
    long b = g(x + 1);
    if ((a & 0xff) != 1 || (b & 0xff) != 1) atomic_fetch_add(&oracle_mix, 1);
    return 1;
}
#endif

#ifdef COLD_PART
/* -DCOLD_PART: `coldy`, whose split-off cold part (coldy.cold, as GCC names it) jumps back to coldy+2, inside
 * the 5 bytes an entry jump would overwrite: relive must refuse to patch coldy (issue 5, "branch target inside
 * the overwritten bytes"). Never called. */
__asm__(".text\n"
        ".globl coldy\n"
        ".type coldy, @function\n"
        "coldy:\n"
        "  test %edi, %edi\n"
        "  js coldy.cold\n"
        "  mov %edi, %eax\n"
        "  ret\n"
        ".size coldy, .-coldy\n"
        ".type coldy.cold, @function\n"
        "coldy.cold:\n"
        "  neg %edi\n"
        "  jmp coldy+2\n"
        ".size coldy.cold, .-coldy.cold\n");
#endif

/* Shorter than the 5-byte entry jump: relive must refuse to patch it (issue 7 error tests). */
__attribute__((noipa)) void tiny(void) {
}

/* A patched function a thread can sleep in forever (test 2). */
__attribute__((noipa)) long held(long x) {
    for (;;) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
        oracle_sink = x;
    }
    return x;
}

static void spin_outside(void) {
    for (volatile int i = 0; i < 200; i++) {
    }
}

/* --duty N: workers sleep 100 us after every N calls (0: never), so a test can leave CPU to the controller. */
static long duty;

static void *worker(void *arg) {
    int w = (int)(long)arg;
    for (long n = 0;; n++) {
        int v = f(n);
        if (v >= 0 && v < MAXV) atomic_fetch_add(&oracle_calls[v], 1);
        atomic_store(&oracle_worker_version[w], v);
        spin_outside();
        if (duty && n % duty == 0) {
            struct timespec ts = {0, 100 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

__attribute__((noipa)) static void sleeper_a(void) {
    for (;;) {
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

__attribute__((noipa)) static void sleeper_b(void) {
    for (;;) {
        struct timespec ts = {0, 300 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

static void *sleeper(void *arg) {
    if (arg)
        sleeper_a();
    else
        sleeper_b();
    return NULL;
}

static void *holder(void *arg) {
    (void)arg;
    held(7);
    return NULL;
}

/* --leafy: a thread calls `leafy`, a leaf that clobbers almost no register (so callers in this executable may
 * rely on the others: a new version that calls out is entered through a register-preserving thunk), every
 * millisecond. A patch whose new leafy sleeps leaves that thread inside it, with the thunk's frame on its
 * stack. */
__attribute__((noinline)) long leafy(long x) {
    return x * 3 + 1;
}

static void *leafy_caller(void *arg) {
    (void)arg;
    for (long n = 0;; n++) {
        oracle_sink = leafy(n);
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void *churn_one(void *arg) {
    (void)arg;
    int v = f(3);
    int want = atomic_load(&oracle_want);
    atomic_fetch_add(&oracle_churn, 1);
    if (want && v != want) atomic_fetch_add(&oracle_churn_bad, 1);
    return NULL;
}

static long churn_total;
static void *churner(void *arg) {
    long total = (long)arg;
    for (long i = 0; i < total; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, churn_one, NULL) == 0) pthread_join(t, NULL);
        struct timespec ts = {0, 200 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* --park: see the header. */
static atomic_ulong park_at;
static atomic_int park_go, park_release;

/* Where a `jmp rel32` at `p` (after an optional endbr64) leads, following relive's absolute jump
 * (`jmp *0(%rip)` + address) in a stub page; 0 when `p` holds no jump. */
static unsigned long jump_dest(const unsigned char *p) {
    if (p[0] == 0xf3 && p[1] == 0x0f && p[2] == 0x1e && p[3] == 0xfa) p += 4;
    if (p[0] != 0xe9) return 0;
    int rel;
    memcpy(&rel, p + 1, 4);
    const unsigned char *d = p + 5 + rel;
    if (d[0] == 0xff && d[1] == 0x25 && !d[2] && !d[3] && !d[4] && !d[5]) {
        unsigned long a;
        memcpy(&a, d + 6, 8);
        return a;
    }
    return (unsigned long)d;
}

static void on_trap(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    (void)si;
    ucontext_t *uc = ctx;
    if ((unsigned long)uc->uc_mcontext.gregs[REG_RIP] != atomic_load(&park_at)) return;
    uc->uc_mcontext.gregs[REG_EFL] &= ~0x100L; /* stop single-stepping */
    char msg[64];
    int n = snprintf(msg, sizeof msg, "parked at %#lx\n", atomic_load(&park_at));
    write(1, msg, n);
    while (!atomic_load(&park_release)) {
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

static void *parker(void *arg) {
    (void)arg;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGTRAP, &sa, NULL);
    while (!atomic_load(&park_go)) {
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    unsigned long at = jump_dest((const unsigned char *)(void *)f);
    if (!at) {
        printf("park: f's entry holds no jump\n");
        return NULL;
    }
    atomic_store(&park_at, at);
    long before = atomic_load(&oracle_mix);
    __asm__ volatile("pushfq; orq $0x100, (%%rsp); popfq" ::: "memory", "cc");
    int v = f(5);
    __asm__ volatile("pushfq; andq $~0x100, (%%rsp); popfq" ::: "memory", "cc");
    printf("unparked v=%d mix=%ld\n", v, atomic_load(&oracle_mix) - before);
    return NULL;
}

/* --block-trap: see the header. */
static atomic_int trap_blocked;
static void *trap_blocker(void *arg) {
    (void)arg;
    unsigned long set = 1UL << (SIGTRAP - 1);
    syscall(SYS_rt_sigprocmask, SIG_BLOCK, &set, NULL, sizeof set);
    atomic_store(&trap_blocked, 1);
    for (;;) pause();
    return NULL;
}

/* --suspend: see the header. */
static atomic_int suspending;
static void *suspender(void *arg) {
    (void)arg;
    sigset_t m;
    sigfillset(&m);
    sigdelset(&m, SIGUSR2);
    atomic_store(&suspending, 1);
    for (;;) sigsuspend(&m);
    return NULL;
}

static pthread_t workers[WORKERS];
static void on_usr1(int sig) {
    (void)sig;
    f(11);
    atomic_fetch_add(&oracle_sig, 1);
}

static void *signaller(void *arg) {
    (void)arg;
    for (unsigned n = 0;; n++) {
        pthread_kill(workers[n % WORKERS], SIGUSR1);
        struct timespec ts = {0, 200 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static void *reader(void *arg) {
    (void)arg;
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        int v;
        if (sscanf(line, "want %d", &v) == 1) atomic_store(&oracle_want, v);
        if (!strcmp(line, "park\n")) atomic_store(&park_go, 1);
        if (!strcmp(line, "unpark\n")) atomic_store(&park_release, 1);
        if (sscanf(line, "churn %d", &v) == 1) {
            pthread_t t;
            pthread_create(&t, NULL, churner, (void *)(long)v);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int stall = 0, sigs = 0, park = 0, block_trap = 0, suspend = 0, leafy_thread = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--stall")) stall = 1;
        if (!strcmp(argv[i], "--signals")) sigs = 1;
        if (!strcmp(argv[i], "--park")) park = 1;
        if (!strcmp(argv[i], "--block-trap")) block_trap = 1;
        if (!strcmp(argv[i], "--suspend")) suspend = 1;
        if (!strcmp(argv[i], "--leafy")) leafy_thread = 1;
        if (!strcmp(argv[i], "--churn") && i + 1 < argc) churn_total = atol(argv[++i]);
        if (!strcmp(argv[i], "--duty") && i + 1 < argc) duty = atol(argv[++i]);
    }
    if (sigs) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_usr1;
        sa.sa_flags = SA_RESTART;
        sigaction(SIGUSR1, &sa, NULL);
    }
    pthread_t t;
    for (long w = 0; w < WORKERS; w++) pthread_create(&workers[w], NULL, worker, (void *)w);
    pthread_create(&t, NULL, sleeper, (void *)1);
    pthread_create(&t, NULL, sleeper, (void *)0);
    if (stall) pthread_create(&t, NULL, holder, NULL);
    if (churn_total) pthread_create(&t, NULL, churner, (void *)churn_total);
    if (sigs) pthread_create(&t, NULL, signaller, NULL);
    if (park) pthread_create(&t, NULL, parker, NULL);
    if (block_trap) pthread_create(&t, NULL, trap_blocker, NULL);
    if (suspend) pthread_create(&t, NULL, suspender, NULL);
    if (leafy_thread) pthread_create(&t, NULL, leafy_caller, NULL);
    pthread_create(&t, NULL, reader, NULL);
    tiny();
    /* Wait until every worker has made a call before declaring readiness. */
    for (;;) {
        int all = 1;
        for (int w = 0; w < WORKERS; w++) all &= atomic_load(&oracle_worker_version[w]) != 0;
        if (block_trap) all &= atomic_load(&trap_blocked);
        if (suspend) all &= atomic_load(&suspending);
        if (all) break;
        usleep(1000);
    }
    printf("oracle ready pid=%d\n", getpid());
    for (;;) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
        char ws[64];
        int o = 0;
        for (int w = 0; w < WORKERS; w++)
            o += snprintf(ws + o, sizeof ws - o, "%s%d", w ? "," : "", atomic_load(&oracle_worker_version[w]));
        printf("stats calls=%ld v1=%ld v2=%ld v3=%ld v4=%ld mix=%ld workers=%s churn=%ld churn_bad=%ld sig=%ld\n",
               atomic_load(&oracle_calls[1]) + atomic_load(&oracle_calls[2]) + atomic_load(&oracle_calls[3]) +
                   atomic_load(&oracle_calls[4]),
               atomic_load(&oracle_calls[1]), atomic_load(&oracle_calls[2]), atomic_load(&oracle_calls[3]),
               atomic_load(&oracle_calls[4]), atomic_load(&oracle_mix), ws, atomic_load(&oracle_churn),
               atomic_load(&oracle_churn_bad), atomic_load(&oracle_sig));
    }
}
