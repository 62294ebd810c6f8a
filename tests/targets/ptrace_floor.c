/* The ptrace floor of a per-thread transition (crates/cli/benches/transition.rs, issue 5 "Benchmark").
 *
 * usage: ptrace_floor PID
 *
 * Seizes every thread of PID, then does the least any provably safe per-thread switch must do (DESIGN §4.5):
 * interrupt every thread at once and, as each one stops, read its registers and resume it. No unwinding, no
 * state write, no agent, no process image: what remains is the kernel's cost of stopping and resuming a
 * thread through ptrace on this machine. The kernel detaches every thread when this program exits (running
 * tracees cannot be detached with PTRACE_DETACH), on success and on error alike.
 *
 * Prints one line: "floor threads=N list_ms=X seize_ms=Y stop_ms=Z". Exit 1 on any error (named on stderr). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>

#define MAX_THREADS 65536

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int tids[MAX_THREADS];

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: ptrace_floor PID\n");
        return 2;
    }
    int pid = atoi(argv[1]);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    double t0 = now_ms();
    DIR *d = opendir(path);
    if (!d) {
        fprintf(stderr, "ptrace_floor: cannot list %s: %s\n", path, strerror(errno));
        return 1;
    }
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < MAX_THREADS)
        if (e->d_name[0] != '.') tids[n++] = atoi(e->d_name);
    closedir(d);
    double t1 = now_ms();
    for (int i = 0; i < n; i++) {
        if (ptrace(PTRACE_SEIZE, tids[i], 0, 0) != 0) {
            fprintf(stderr, "ptrace_floor: PTRACE_SEIZE of thread %d: %s\n", tids[i], strerror(errno));
            return 1;
        }
    }
    double t2 = now_ms();
    for (int i = 0; i < n; i++) ptrace(PTRACE_INTERRUPT, tids[i], 0, 0);
    for (int left = n; left > 0;) {
        int status;
        int r = waitpid(-1, &status, __WALL);
        if (r < 0) {
            if (errno == EINTR) continue;
            fprintf(stderr, "ptrace_floor: waitpid: %s\n", strerror(errno));
            return 1;
        }
        if (WIFEXITED(status) || WIFSIGNALED(status)) {
            left--;
            continue;
        }
        struct user_regs_struct regs;
        ptrace(PTRACE_GETREGS, r, 0, &regs);
        /* A PTRACE_INTERRUPT stop is a group-stop-like event stop; anything else (a signal) is passed on. */
        int sig = (status >> 16) == PTRACE_EVENT_STOP ? 0 : WSTOPSIG(status);
        ptrace(PTRACE_CONT, r, 0, sig);
        left--;
    }
    double t3 = now_ms();
    printf("floor threads=%d list_ms=%.3f seize_ms=%.3f stop_ms=%.3f\n", n, t1 - t0, t2 - t1, t3 - t2);
    return 0;
}
