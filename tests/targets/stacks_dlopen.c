/* Loads the library named by argv[1] with dlopen and runs its lib_block() in a thread, so the test
 * can delete the file on disk and still see the function on the stack (issue 3). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

static void (*lib_block)(volatile int *);
static volatile int reached;

static void *run(void *a) {
    (void)a;
    prctl(PR_SET_NAME, "libthread");
    lib_block(&reached);
    return NULL;
}

int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (argc < 2) return 2;
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    lib_block = (void (*)(volatile int *))dlsym(h, "lib_block");
    if (!lib_block) return 1;
    pthread_t t;
    pthread_create(&t, NULL, run, NULL);
    while (!__atomic_load_n(&reached, __ATOMIC_SEQ_CST)) usleep(100);
    printf("ready %d\n", getpid());
    fflush(stdout);
    pthread_join(t, NULL);
    return 0;
}
