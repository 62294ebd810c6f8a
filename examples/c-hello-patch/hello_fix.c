/*
 * An example live patch in C for tests/targets/agent_hello.c (DESIGN §4.9).
 *
 * Build:   cc -O2 -shared -fPIC -Iinclude examples/c-hello-patch/hello_fix.c -o hello_fix.so
 * Inspect: relive inspect hello_fix.so
 *
 * Replaces greet(int) of the main executable with greet_v2, counts calls in the target's own
 * (non-exported) greet_calls through an import slot, and declares callbacks and a state.
 */
#include <relive.h>

RELIVE_PATCH("c-hello", 0, 1);
RELIVE_OBJECT("exe", "");

/* Filled by relive with &greet_calls in the target. */
RELIVE_IMPORT("exe", greet_calls, 0, int *, p_greet_calls);

int greet_v2(int n) {
    if (p_greet_calls) (*p_greet_calls)++;
    return n + 2000;
}
RELIVE_FUNC("exe", greet, 0, greet_v2);

static int pre_calls;
int hello_fix_pre_patch(void) { return pre_calls++; }
/* Returns the target's greet_calls through the import slot, or -1 while the slot is empty. */
int hello_fix_post_patch(void) { return p_greet_calls ? *p_greet_calls : -1; }
RELIVE_CALLBACK("exe", pre_patch, hello_fix_pre_patch);
RELIVE_CALLBACK("exe", post_patch, hello_fix_post_patch);

RELIVE_STATE(1, 2);
