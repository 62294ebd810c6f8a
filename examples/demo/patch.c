/* The live patch of `relive demo`: replaces greeting() of the sample service (service.c).
 * Build: cc -O2 -fPIC -shared -I include -o demo-patch.so patch.c
 * The object is the main executable, unpinned, so that the demo's run-time build matches it.
 */
#include <relive.h>

RELIVE_PATCH("demo-greeting", 0, 0);
RELIVE_OBJECT("exe", "");

const char *greeting_v2(long request) {
    (void)request;
    return "hello from the live patch";
}
RELIVE_FUNC("exe", greeting, 0, greeting_v2);
