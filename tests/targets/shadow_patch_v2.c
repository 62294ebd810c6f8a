/*
 * shadow_patch_v2: the cumulative patch that replaces shadow_patch_v1. It uses the same shadow id
 * and layout, so it inherits v1's counters (SV7) and keeps counting on them; its post_unpatch
 * callback frees them all (R6: the kernel's advice), since it is the last patch.
 */
#include <relive_shadow.h>

#include <stdatomic.h>

#define ID_REQUESTS 0x72657173UL

struct conn;

struct conn_requests {
    atomic_long count;
    long version_seen;
};

static atomic_long freed;

static int requests_ctor(void *obj, void *data, void *ctor_data) {
    (void)obj;
    struct conn_requests *r = data;
    r->version_seen = *(const long *)ctor_data;
    return 0;
}

static void requests_dtor(void *obj, void *data) {
    (void)obj, (void)data;
    atomic_fetch_add(&freed, 1);
}

long patch_handle_request(struct conn *c) {
    static const long version = 2;
    struct conn_requests *r =
        relive_shadow_get_or_alloc(c, ID_REQUESTS, sizeof *r, 0, requests_ctor, (void *)&version);
    if (!r)
        return -1;
    return atomic_fetch_add(&r->count, 1) + 1;
}

/* Which patch version created the counter of `c` (1 = inherited from v1), or 0 if none. */
long patch_counter_origin(struct conn *c) {
    struct conn_requests *r = relive_shadow_get(c, ID_REQUESTS);
    return r ? r->version_seen : 0;
}

/* post_unpatch of the last patch: no thread runs the patched code any more; free the counters. */
long patch_post_unpatch(void) {
    relive_shadow_free_all(ID_REQUESTS, requests_dtor);
    return atomic_load(&freed);
}
