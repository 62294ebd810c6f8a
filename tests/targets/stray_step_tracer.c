/* A tracer that dies in the middle of a single step (issue 5, DESIGN §4.8): it seizes thread TID,
 * interrupts it, starts PTRACE_SINGLESTEP and exits at once. The kernel does not clear EFLAGS.TF when a
 * tracer exits, so the thread takes a single-step SIGTRAP that nobody asked for after its next
 * instruction. relive's transition driver steps threads out of patched functions; if relive is killed
 * meanwhile, the agent's SIGTRAP handler must drop that trap instead of letting it kill the process.
 * Usage: stray_step_tracer TID. Exit status 0 when the step was started. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/wait.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: stray_step_tracer TID\n");
        return 2;
    }
    pid_t tid = (pid_t)atoi(argv[1]);
    if (ptrace(PTRACE_SEIZE, tid, 0, 0)) {
        perror("PTRACE_SEIZE");
        return 2;
    }
    if (ptrace(PTRACE_INTERRUPT, tid, 0, 0)) {
        perror("PTRACE_INTERRUPT");
        return 2;
    }
    int st;
    if (waitpid(tid, &st, __WALL) != tid) {
        perror("waitpid");
        return 2;
    }
    if (ptrace(PTRACE_SINGLESTEP, tid, 0, 0)) {
        perror("PTRACE_SINGLESTEP");
        return 2;
    }
    return 0;
}
