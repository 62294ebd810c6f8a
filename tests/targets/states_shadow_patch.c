/*
 * states_shadow_patch: the shadow-variable patches of the live SV7 test through `relive apply`
 * (crates/cli/tests/states_live.rs, SPEC §7, §5 R4/R6). Built with -DVERSION=1 (non-replace) or
 * -DVERSION=2 (cumulative replace). Both count requests per connection of states_host in a shadow
 * variable with the same id and layout, so v2 inherits v1's counters (SV7). v1's unpatch callbacks
 * must never run (R4: a replaced patch gets no callbacks); v2's post_unpatch frees every counter.
 */
#include <relive.h>

#include <stdatomic.h>
#include <stdio.h>

#define XSTR2(x) #x
#define XSTR(x) XSTR2(x)
#define ID_REQUESTS 0x72657173UL /* "reqs": every version uses it (SV7) */

#if VERSION == 1
RELIVE_PATCH("shv1", 0, 0);
#else
RELIVE_PATCH("shv2", 1, 0);
#endif
RELIVE_OBJECT("exe", "");

struct conn;
struct conn_requests {
    atomic_long count;
    long created_by;
};

static int requests_ctor(void *obj, void *data, void *ctor_data) {
    (void)obj, (void)ctor_data;
    ((struct conn_requests *)data)->created_by = VERSION;
    return 0;
}

static atomic_long freed;
__attribute__((unused)) static void requests_dtor(void *obj, void *data) {
    (void)obj, (void)data;
    atomic_fetch_add(&freed, 1);
}

/* Returns VERSION * 1000 + this connection's request count (1 on its first request). */
long shv_handle_request(struct conn *c) {
    struct conn_requests *r =
        relive_shadow_get_or_alloc(c, ID_REQUESTS, sizeof *r, 0, requests_ctor, NULL);
    if (!r)
        return -2;
    return VERSION * 1000 + atomic_fetch_add(&r->count, 1) + 1;
}
RELIVE_FUNC("exe", handle_request, 0, shv_handle_request);

static int say(const char *kind) {
    printf("cb shv%d %s shadows=%zu freed=%ld\n", VERSION, kind, relive_shadow_count(),
           atomic_load(&freed));
    fflush(stdout);
    return 0;
}

int shv_post_patch(void) { return say("post_patch"); }
int shv_pre_unpatch(void) { return say("pre_unpatch"); }
int shv_post_unpatch(void) {
#if VERSION == 2
    /* R6: the last cumulative patch frees the variables every version used. */
    relive_shadow_free_all(ID_REQUESTS, requests_dtor);
#endif
    return say("post_unpatch");
}
RELIVE_CALLBACK("exe", post_patch, shv_post_patch);
RELIVE_CALLBACK("exe", pre_unpatch, shv_pre_unpatch);
RELIVE_CALLBACK("exe", post_unpatch, shv_post_unpatch);
