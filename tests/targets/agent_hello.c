// The target of the example patches (examples/rust-hello-patch, examples/c-hello-patch).
// greet() is the function they replace; greet_calls is a non-exported variable they import.
// Main thread: reads commands on stdin ("greet N" prints "greet N -> <greet(N)>", "rss" prints
// VmRSS in kB, "fds" prints the number of open fds, "threads" the number of threads, "addr" the
// address of greet_calls, "spawn" starts a thread that prints the agent's TLS state slot).
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int greet_calls;

__attribute__((noinline)) int greet(int n) {
    greet_calls++;
    return n + 1;
}

/* A new thread reports the agent's TLS state slot as it starts (from the TLS init image). */
static void *report_state(void *arg) {
    (void)arg;
    unsigned long (*f)(void) = (unsigned long (*)(void))dlsym(RTLD_DEFAULT, "relive_agent_thread_state");
    printf("state %ld\n", f ? (long)f() : -1L);
    fflush(stdout);
    return NULL;
}

static int count_dir(const char *path) {
    DIR *d = opendir(path);
    int n = 0;
    if (!d) return -1;
    struct dirent *e;
    while ((e = readdir(d))) n += e->d_name[0] != '.';
    closedir(d);
    return n - (strcmp(path, "/proc/self/fd") == 0); /* the DIR's own fd */
}

static long rss_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) kb = strtol(line + 6, NULL, 10);
    if (f) fclose(f);
    return kb;
}

int main(void) {
    printf("ready pid=%d\n", getpid());
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        int n;
        if (sscanf(line, "greet %d", &n) == 1) {
            int r = greet(n);
            printf("greet %d -> %d calls=%d\n", n, r, greet_calls);
        } else if (!strncmp(line, "spawn", 5)) {
            pthread_t t;
            pthread_create(&t, NULL, report_state, NULL);
            pthread_join(t, NULL);
        } else if (!strncmp(line, "addr", 4))
            printf("addr %lu\n", (unsigned long)&greet_calls); /* for import-slot tests */
        else if (!strncmp(line, "rss", 3)) printf("rss %ld\n", rss_kb());
        else if (!strncmp(line, "fds", 3)) printf("fds %d\n", count_dir("/proc/self/fd"));
        else if (!strncmp(line, "threads", 7)) printf("threads %d\n", count_dir("/proc/self/task"));
        else if (!strncmp(line, "quit", 4)) return 0;
        fflush(stdout);
    }
    return 0;
}
