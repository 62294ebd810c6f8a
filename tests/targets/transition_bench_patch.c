/* The patch of the benchmark target: bench_fn, same code (crates/cli/benches/transition.rs). With -DHOLD, also
 * replaces hold_fn so that a transition stays pending while the call cost through the dispatcher is measured. */
#include <relive.h>

long bench_fn_v2(long x) {
    return x * 2 + 1;
}

RELIVE_PATCH("bench", 0, 0);
RELIVE_OBJECT("exe", "");
RELIVE_FUNC("exe", bench_fn, 0, bench_fn_v2);

#ifdef HOLD
void hold_fn_v2(void) {
}
RELIVE_FUNC("exe", hold_fn, 0, hold_fn_v2);
#endif
