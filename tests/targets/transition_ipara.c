/* Callers that rely on registers (issue 5 test 11, DESIGN §4.3a): GCC -O2 enables -fipa-ra, so `caller` keeps
 * values in call-clobbered registers across `call leaf` because it sees that leaf does not touch them.
 * A patch replaces `leaf` with a version that clobbers every call-clobbered register; relive must enter it
 * through a thunk that preserves what the original preserved. Every 20 ms: "ipara calls=<n> bad=<n> new=<n>".
 * Built with -rdynamic so that the patch finds ipara_new.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static atomic_long calls, bad;
/* Calls of the new leaf (the patch counts them), so a test sees the patch run. */
atomic_long ipara_new;
volatile long ipara_in = 3;

__attribute__((noinline)) static long leaf(long x) {
    return x * 3 + 1;
}

__attribute__((noinline)) static long caller(long a, long b, long c, long d) {
    /* a..d and the partial sums stay live across the calls in whatever registers GCC picks. */
    long s1 = a * 7 + b;
    long s2 = c * 5 + d;
    long s3 = a ^ d;
    long s4 = b - c;
    long r = leaf(s1);
    r += leaf(s2 + r);
    return r + s1 * 3 + s2 * 5 + s3 * 11 + s4 * 13 + a + b + c + d;
}

static long expect(long a, long b, long c, long d) {
    long s1 = a * 7 + b, s2 = c * 5 + d, s3 = a ^ d, s4 = b - c;
    long r = s1 * 3 + 1;
    r += (s2 + r) * 3 + 1;
    return r + s1 * 3 + s2 * 5 + s3 * 11 + s4 * 13 + a + b + c + d;
}

static void *worker(void *arg) {
    long k = (long)arg;
    for (long n = 0;; n++) {
        long a = n + ipara_in, b = k * 17 + n, c = n * 3, d = n ^ 0x55;
        long got = caller(a, b, c, d);
        atomic_fetch_add(&calls, 1);
        /* The new leaf computes the same value, so any difference is register corruption. */
        if (got != expect(a, b, c, d)) atomic_fetch_add(&bad, 1);
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    for (long w = 0; w < 2; w++) pthread_create(&t, NULL, worker, (void *)w);
    while (atomic_load(&calls) == 0) usleep(1000);
    printf("ipara ready pid=%d\n", getpid());
    for (;;) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
        printf("ipara calls=%ld bad=%ld new=%ld\n", atomic_load(&calls), atomic_load(&bad), atomic_load(&ipara_new));
    }
}
