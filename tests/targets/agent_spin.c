// A single-threaded target that only spins in user code: no thread is ever at a safe point for a
// remote call (issue 4: the injection error must name the threads and what they were doing).
#include <stdint.h>
#include <stdio.h>
static volatile uint64_t sink;
int main(void) {
    printf("ready\n");
    fflush(stdout);
    for (uint64_t i = 0;; i++) sink += i;
}
