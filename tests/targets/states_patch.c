/*
 * states_patch: the state patches of the live tests (SPEC §8, T-st1–T-st4; after the kernel's
 * test_klp_state*.c). Built with -DPATCH_NAME=<id> -DSTATE_VERSION=<n> [-DREPLACE=0|1]
 * [-DNO_STATE] [-DSTALL]; `relive apply` loads it into states_host.
 *
 * System state id 1 = "console_loglevel was changed": pre_patch allocates the data (or takes over
 * the predecessor's, found with relive_state_get_prev), post_patch fixes the loglevel (or takes
 * over), pre_unpatch restores it, post_unpatch frees the data. Every callback prints one line:
 *   "cb <patch> <kind> self=<version|null> prev=<version|null> <what it did> owner=<who allocated>"
 * so the test sees what relive_state_get and relive_state_get_prev returned inside the callback.
 */
#include <relive.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef REPLACE
#define REPLACE 1
#endif
#define XSTR2(x) #x
#define XSTR(x) XSTR2(x)
#define NAME XSTR(PATCH_NAME)
#define ID 1
#define FIXED_LOGLEVEL 8

RELIVE_PATCH(NAME, REPLACE, 0);
RELIVE_OBJECT("exe", "");
#ifndef NO_STATE
RELIVE_STATE(1, STATE_VERSION);
#endif

struct conn;
long new_handle_request(struct conn *c) {
    (void)c;
    return 1000 * STATE_VERSION;
}
RELIVE_FUNC("exe", handle_request, 0, new_handle_request);

#ifdef STALL
/* Also replaces the host's wait_request, which its --stall thread never leaves: the transition stays
 * pending until it is reversed. */
long new_wait_request(void) { return STATE_VERSION; }
RELIVE_FUNC("exe", wait_request, 0, new_wait_request);
#endif

/* The host's console_loglevel, through its accessor (relive imports resolve functions). */
typedef int *(*loglevel_slot_fn)(void);
RELIVE_IMPORT("exe", loglevel_slot, 0, loglevel_slot_fn, p_loglevel_slot);
#define p_loglevel (p_loglevel_slot())

/* What state 1's data points to (same layout in every version: SV7-like agreement on the id). */
struct saved {
    int loglevel;
    char owner[32];
};

static void say(const char *kind, const char *what, struct relive_state *self) {
    struct relive_state *me = relive_state_get(NAME, ID);
    struct relive_state *prev = relive_state_get_prev(ID);
    struct saved *d = self && self->data ? self->data : NULL;
    char sv[16] = "null", pv[16] = "null";
    if (me)
        snprintf(sv, sizeof sv, "%u", me->version);
    if (prev)
        snprintf(pv, sizeof pv, "%u", prev->version);
    printf("cb %s %s self=%s prev=%s %s owner=%s\n", NAME, kind, sv, pv, what, d ? d->owner : "none");
    fflush(stdout);
}

int st_pre_patch(void) {
    struct relive_state *me = relive_state_get(NAME, ID);
    struct relive_state *prev = relive_state_get_prev(ID);
    if (!me) {
        say("pre_patch", "no-state", NULL);
        return 0;
    }
    if (prev && prev->data) {
        me->data = prev->data;
        say("pre_patch", "take-over", me);
        return 0;
    }
    struct saved *d = calloc(1, sizeof *d);
    if (!d)
        return -12;
    snprintf(d->owner, sizeof d->owner, "%s", NAME);
    me->data = d;
    say("pre_patch", "allocate", me);
    return 0;
}

int st_post_patch(void) {
    struct relive_state *me = relive_state_get(NAME, ID);
    struct relive_state *prev = relive_state_get_prev(ID);
    if (!me) {
        say("post_patch", "no-state", NULL);
        return 0;
    }
    struct saved *d = me->data;
    if (prev) {
        say("post_patch", "take-over", me);
        return 0;
    }
    d->loglevel = *p_loglevel;
    *p_loglevel = FIXED_LOGLEVEL;
    char what[48];
    snprintf(what, sizeof what, "fix %d->%d", d->loglevel, FIXED_LOGLEVEL);
    say("post_patch", what, me);
    return 0;
}

int st_pre_unpatch(void) {
    struct relive_state *me = relive_state_get(NAME, ID);
    if (!me || !me->data) {
        say("pre_unpatch", "no-state", me);
        return 0;
    }
    struct saved *d = me->data;
    *p_loglevel = d->loglevel;
    char what[48];
    snprintf(what, sizeof what, "restore %d", d->loglevel);
    say("pre_unpatch", what, me);
    return 0;
}

int st_post_unpatch(void) {
    struct relive_state *me = relive_state_get(NAME, ID);
    struct relive_state *prev = relive_state_get_prev(ID);
    if (!me || !me->data) {
        say("post_unpatch", "no-state", me);
        return 0;
    }
    /* A reversed take-over leaves the data to the predecessor, which stays installed (ST4). */
    if (prev && prev->data == me->data) {
        say("post_unpatch", "keep", me);
        me->data = NULL;
        return 0;
    }
    say("post_unpatch", "free", me);
    free(me->data);
    me->data = NULL;
    return 0;
}

RELIVE_CALLBACK("exe", pre_patch, st_pre_patch);
RELIVE_CALLBACK("exe", post_patch, st_post_patch);
RELIVE_CALLBACK("exe", pre_unpatch, st_pre_unpatch);
RELIVE_CALLBACK("exe", post_unpatch, st_post_unpatch);
