/* Fixture for relive-proc's signal re-injection test (DESIGN §4.1): thread "victim" counts the
 * SIGRTMIN signals it receives (real-time signals queue, so none may be lost); SIGUSR2 to the
 * process makes main print "count N". */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static volatile int count;
static volatile sig_atomic_t report;

static void on_rt(int s) { (void)s; __atomic_add_fetch(&count, 1, __ATOMIC_SEQ_CST); }
static void on_usr2(int s) { (void)s; report = 1; }

static void *victim(void *a) {
    (void)a;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN); /* inherited blocked from main: take it here */
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    prctl(PR_SET_NAME, "victim");
    for (;;) {
        struct timespec ts = {1000, 0};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(void) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    struct sigaction sa = {0};
    sa.sa_handler = on_rt;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGRTMIN, &sa, NULL);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    sigset_t rt;
    sigemptyset(&rt);
    sigaddset(&rt, SIGRTMIN);
    pthread_sigmask(SIG_BLOCK, &rt, NULL); /* only the victim takes SIGRTMIN */
    pthread_t t;
    pthread_create(&t, NULL, victim, NULL);
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) {
        pause();
        if (report) {
            report = 0;
            printf("count %d\n", __atomic_load_n(&count, __ATOMIC_SEQ_CST));
            fflush(stdout);
        }
    }
}
