/* Fixture for crates/x86/tests/gcc_entries.rs: small functions whose entries relive-x86 must analyse.
 * Built at test time with several flag sets (plain -O2, -fcf-protection=full, -fpatchable-function-entry,
 * -pg -mfentry -mnop-mcount). Every function is noinline and reachable from main so that it is emitted. */
#include <stdio.h>
#include <stdlib.h>

int table[16] = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3};

/* Shorter than a 5-byte jump after its endbr64: lea 1(%rdi),%eax; ret. */
__attribute__((noinline)) int tiny(int x) { return x + 1; }

/* A RIP-relative load early in the body. */
__attribute__((noinline)) int scale(int x) { return x * 3 + table[x & 15]; }

/* A loop whose back edge targets the function's second instruction: mov %edi,%eax; 1: ...; jne 1b. */
__attribute__((noinline)) unsigned spin(unsigned x) {
    unsigned y = x;
    do {
        y = y * 5 + 1;
    } while (y & 0x100);
    return y;
}

/* A switch compiled to a jump table (PIC: lea table(%rip); movslq; add; notrack jmp). */
__attribute__((noinline)) int pick(int k, int v) {
    switch (k) {
    case 0: return v + 11;
    case 1: return v * 7;
    case 2: return v - 5;
    case 3: return v ^ 0x55;
    case 4: return v << 3;
    case 5: return table[v & 15];
    case 6: return v / 3;
    default: return -1;
    }
}

/* -fipa-ra (DESIGN.md §4.3a): leaf touches only eax; caller keeps its other arguments in their
 * call-clobbered registers across the call. */
static __attribute__((noinline)) int leaf(int x) { return x * 2 + 1; }
__attribute__((noinline)) int mid(int x) { return leaf(x) + leaf(x + 1); }
__attribute__((noinline)) int caller(int a, int b, int c, int d, int e, int f) {
    int r = leaf(a);
    return r * b + c * d + e * f;
}

/* Calls through a pointer: "all" registers. */
__attribute__((noinline)) int indirect(int (*fp)(int), int x) { return fp(x) + 1; }

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 3;
    int s = tiny(n) + scale(n) + (int)spin((unsigned)n) + pick(n, n) + mid(n) + caller(n, 2, 3, 4, 5, 6) +
            indirect(tiny, n);
    printf("ready %d\n", s);
    return 0;
}
