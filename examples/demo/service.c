/* The sample service of `relive demo`: four worker threads "serve requests" and print each answer.
 * `relive demo` patches greeting() live with patch.c, shows the answers change while the service keeps
 * serving, then disables the patch and shows the original answers come back.
 * Build: cc -O2 -pthread -o relive-demo-service service.c
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static atomic_long served;

/* The function the demo patch replaces. */
__attribute__((noipa)) const char *greeting(long request) {
    return request % 2 ? "hello from the original service" : "hello from the original service!";
}

__attribute__((noipa)) static void serve(int worker) {
    long n = atomic_fetch_add(&served, 1) + 1;
    printf("request %ld served by worker %d: %s\n", n, worker, greeting(n));
}

static void *worker(void *arg) {
    int w = (int)(long)arg;
    for (;;) {
        serve(w);
        struct timespec ts = {0, 25 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_t t;
    for (long w = 1; w <= 4; w++) pthread_create(&t, NULL, worker, (void *)w);
    printf("demo service ready, pid %d\n", getpid());
    for (;;) pause();
}
