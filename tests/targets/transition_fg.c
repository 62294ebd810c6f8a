/* f and g of the oracle in a shared library (issue 5 test 6: a function that lives in a library of the target).
 * Built with -fPIC -shared -Wl,-soname,libtransition_fg.so; the oracle built with -DFG_IN_LIB links it. */
#include <stdatomic.h>

extern atomic_long oracle_mix;
extern volatile long oracle_sink;

__attribute__((noipa)) long g(long x) {
    long s = x;
    for (int i = 0; i < 40; i++) s = s * 31 + i;
    oracle_sink = s;
    return (s & ~0xffL) | 1;
}

__attribute__((noipa)) int f(long x) {
    long a = g(x);
    for (volatile int i = 0; i < 30; i++) {
    }
    long b = g(x + 1);
    if ((a & 0xff) != 1 || (b & 0xff) != 1) atomic_fetch_add(&oracle_mix, 1);
    return 1;
}
