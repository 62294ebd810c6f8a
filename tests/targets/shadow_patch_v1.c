/*
 * shadow_patch_v1: a C patch (shared object) that adds a per-connection request counter to the
 * host's `struct conn` through a shadow variable (SPEC §7). Linked with relive_shadow_* left
 * undefined: the dynamic loader binds them to the preloaded agent when the host dlopens this file.
 */
#include <relive_shadow.h>

#include <stdatomic.h>

#define ID_REQUESTS 0x72657173UL /* "reqs": the id every version of the patch uses (SV7) */

struct conn; /* the host's struct: only its address is used, as the key */

/* Version 1 of the shadow data. Later cumulative patches keep this layout. */
struct conn_requests {
    atomic_long count;
    long version_seen;
};

static int requests_ctor(void *obj, void *data, void *ctor_data) {
    (void)obj;
    struct conn_requests *r = data;
    r->version_seen = *(const long *)ctor_data;
    return 0;
}

/* The new version of the host's request handler: counts, returns the count so far. */
long patch_handle_request(struct conn *c) {
    static const long version = 1;
    struct conn_requests *r =
        relive_shadow_get_or_alloc(c, ID_REQUESTS, sizeof *r, 0, requests_ctor, (void *)&version);
    if (!r)
        return -1;
    return atomic_fetch_add(&r->count, 1) + 1;
}
