/* A live patch in C for examples/quickstart/hello.c: greeting() now says where it comes from.
 *
 * Build: cc -O2 -g -fPIC -shared -Iinclude -o c-fix.so examples/quickstart/c-fix.c
 * Apply: target/release/relive apply PID c-fix.so
 */
#include <relive.h>

const char *greeting_c(int n) {
    (void)n;
    return "hello from the C patch";
}

RELIVE_PATCH("c-fix", 0, 0);          /* name, replace (cumulative), stacking */
RELIVE_OBJECT("exe", "");              /* the main executable; "" = any build-id */
RELIVE_FUNC("exe", greeting, 0, greeting_c);
