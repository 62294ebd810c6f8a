/* Fixture for thread churn (DESIGN §4.1, issue 3): four long-lived sleepers, and two spawner
 * threads that create short-lived detached threads without pause. Tests stop every thread or
 * list stacks while threads come and go. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

volatile unsigned long churn_sink;

static void *short_lived(void *a) {
    (void)a;
    for (int i = 0; i < 1000; i++) churn_sink += (unsigned long)i;
    return NULL;
}

static void *spawner(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "spawner");
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (;;) {
        pthread_t t;
        if (pthread_create(&t, &attr, short_lived, NULL) != 0) usleep(100);
    }
    return NULL;
}

static void *sleeper(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "sleeper");
    for (;;) {
        struct timespec ts = {1000, 0};
        nanosleep(&ts, NULL);
        churn_sink++;
    }
    return NULL;
}

int main(void) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    pthread_t t;
    for (int i = 0; i < 4; i++) pthread_create(&t, NULL, sleeper, NULL);
    for (int i = 0; i < 2; i++) pthread_create(&t, NULL, spawner, NULL);
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) pause();
}
