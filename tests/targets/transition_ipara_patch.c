/* The patch of tests/targets/transition_ipara.c (issue 5 test 11, DESIGN §4.3a): a new `leaf` (a static
 * function, found only in .symtab) that computes the same value but clobbers every call-clobbered register,
 * general and vector, as separately compiled code may. Callers that kept values in those registers stay
 * correct only if relive enters it through a preserving thunk. */
#include <relive.h>
#include <stdatomic.h>

extern atomic_long ipara_new;

long leaf_v(long x) {
    long r = x * 3 + 1;
    atomic_fetch_add(&ipara_new, 1);
    __asm__ volatile(
        "mov $0x5a5a, %%eax\n mov %%rax, %%rcx\n mov %%rax, %%rdx\n mov %%rax, %%rsi\n mov %%rax, %%rdi\n"
        "mov %%rax, %%r8\n mov %%rax, %%r9\n mov %%rax, %%r10\n mov %%rax, %%r11\n"
        "pcmpeqd %%xmm0, %%xmm0\n pcmpeqd %%xmm1, %%xmm1\n pcmpeqd %%xmm2, %%xmm2\n pcmpeqd %%xmm3, %%xmm3\n"
        "pcmpeqd %%xmm4, %%xmm4\n pcmpeqd %%xmm5, %%xmm5\n pcmpeqd %%xmm6, %%xmm6\n pcmpeqd %%xmm7, %%xmm7\n"
        "pcmpeqd %%xmm8, %%xmm8\n pcmpeqd %%xmm9, %%xmm9\n pcmpeqd %%xmm10, %%xmm10\n pcmpeqd %%xmm11, %%xmm11\n"
        "pcmpeqd %%xmm12, %%xmm12\n pcmpeqd %%xmm13, %%xmm13\n pcmpeqd %%xmm14, %%xmm14\n pcmpeqd %%xmm15, %%xmm15\n"
        :
        :
        : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4",
          "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory",
          "cc");
    return r;
}

RELIVE_PATCH("ipara", 0, 0);
RELIVE_OBJECT("exe", "");
RELIVE_FUNC("exe", leaf, 0, leaf_v);
