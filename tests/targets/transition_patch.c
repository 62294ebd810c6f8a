/* Patches of the oracle target (tests/targets/transition_oracle.c), one source for many variants:
 *   -DPATCH_NAME=a     the patch's name
 *   -DVERSION=N        the version its f returns and the tag its g returns (the original is 1)
 *   -DREPLACE=1        an atomic-replace (cumulative) patch (SPEC R1)
 *   -DSTACKING=1       opts in to stacking (SPEC K5)
 *   -DONLY_F=1         replaces f only (its f then expects the g below it: the original's tag 1)
 *   -DSTALL=1          also replaces `held`, which a thread sleeps in forever (T-cb9)
 *   -DCALLBACKS=1      the four callbacks print "callback <name> <kind>" on the target's stdout
 *   -DFAIL_PRE=1       pre_patch returns -19 (ENODEV; T-cb5 / issue 5 test 7)
 *   -DBUILD_ID=hex     pins the executable's build-id
 *   -DOBJECT=soname    f and g live in that library instead of the executable
 *   -DMISSING=1        also replaces a function the target does not have
 *   -DTINY=1           also replaces `tiny`, a function shorter than a jump (unpatchable entry)
 *   -DIMPORT_FROM=so   imports `g` from object `so` into the slot p_imported (an object the target may lack)
 *   -DSTATIC_NEW=1     also replaces `held` with a `static` new version (not exported: dlsym cannot find it)
 *   -DUNDEF=1          uses a variable no object of the target exports (the patch's dlopen would fail)
 *   -DNO_FUNCS=1       declares no function at all (a forgotten RELIVE_FUNC)
 *   -DLEAFY_SLEEP=1    also replaces `leafy` (oracle --leafy) with a version that sleeps for an hour: it calls
 *                      out, so it is entered through a register-preserving thunk
 *   -DCOLDY=1          also replaces `coldy` (an oracle built with -DCOLD_PART), whose cold part jumps into its
 *                      first bytes (refused)
 *   -DSECOND=soname    also declares object `soname` with pre_patch and post_unpatch callbacks only (they
 *                      print "callback <name> <kind> second"); with FAIL_PRE, its pre_patch fails too,
 *                      unless -DSECOND_OK=1
 * New f calls g through the executable's symbol, so g's entry dispatches per thread: a thread that entered
 * the new f must reach the new g, and the old f the old g; any mix is counted in oracle_mix.
 */
#include <relive.h>
#include <stdatomic.h>
#include <stdio.h>

#define STR2(x) #x
#define STR(x) STR2(x)
#ifndef PATCH_NAME
#define PATCH_NAME a
#endif
#ifndef VERSION
#define VERSION 2
#endif
#ifndef REPLACE
#define REPLACE 0
#endif
#ifndef STACKING
#define STACKING 0
#endif
#ifdef ONLY_F
#define G_TAG 1
#else
#define G_TAG VERSION
#endif


extern atomic_long oracle_mix;
extern volatile long oracle_sink;
long g(long x);

long g_v(long x) {
    long s = x;
    for (int i = 0; i < 40; i++) s = s * 31 + i;
    oracle_sink = s;
    return (s & ~0xffL) | G_TAG;
}

int f_v(long x) {
    long a = g(x);
    for (volatile int i = 0; i < 30; i++) {
    }
    long b = g(x + 1);
    if ((a & 0xff) != G_TAG || (b & 0xff) != G_TAG) atomic_fetch_add(&oracle_mix, 1);
    return VERSION;
}

#ifdef STALL
long held_v(long x) {
    return x;
}
#endif

/* The manifest (include/relive.h). */
RELIVE_PATCH(STR(PATCH_NAME), REPLACE, STACKING);
#ifndef OBJECT
#define OBJECT exe
#endif
#ifdef BUILD_ID
RELIVE_OBJECT(STR(OBJECT), STR(BUILD_ID));
#else
RELIVE_OBJECT(STR(OBJECT), "");
#endif
#ifndef NO_FUNCS
RELIVE_FUNC(STR(OBJECT), f, 0, f_v);
#ifndef ONLY_F
RELIVE_FUNC(STR(OBJECT), g, 0, g_v);
#endif
#endif
#ifdef STALL
RELIVE_FUNC("exe", held, 0, held_v);
#endif
#ifdef MISSING
RELIVE_FUNC("exe", no_such_function, 0, f_v);
#endif
#ifdef TINY
void tiny_v(void) {
}
RELIVE_FUNC("exe", tiny, 0, tiny_v);
#endif

#ifdef STATIC_NEW
__attribute__((used)) static long held_static(long x) {
    return x;
}
RELIVE_FUNC("exe", held, 0, held_static);
#endif

#ifdef LEAFY_SLEEP
#include <unistd.h>
long leafy_v(long x) {
    sleep(3600);
    return x * 3 + 1;
}
RELIVE_FUNC("exe", leafy, 0, leafy_v);
#endif

#ifdef COLDY
int coldy_v(int x) {
    return x;
}
RELIVE_FUNC("exe", coldy, 0, coldy_v);
#endif

#ifdef UNDEF
extern long relive_test_exported_by_nobody;
long undef_user(void) {
    return relive_test_exported_by_nobody;
}
#endif

#ifdef IMPORT_FROM
RELIVE_OBJECT(STR(IMPORT_FROM), "");
RELIVE_IMPORT(STR(IMPORT_FROM), g, 0, void *, p_imported);
#endif

#ifdef CALLBACKS
int cb_pre_patch(void) {
    printf("callback " STR(PATCH_NAME) " pre_patch\n");
    fflush(stdout);
#ifdef FAIL_PRE
    return -19;
#else
    return 0;
#endif
}
int cb_post_patch(void) {
    printf("callback " STR(PATCH_NAME) " post_patch\n");
    fflush(stdout);
    return 0;
}
int cb_pre_unpatch(void) {
    printf("callback " STR(PATCH_NAME) " pre_unpatch\n");
    fflush(stdout);
    return 0;
}
int cb_post_unpatch(void) {
    printf("callback " STR(PATCH_NAME) " post_unpatch\n");
    fflush(stdout);
    return 0;
}
#endif

#ifdef SECOND
int cb2_pre_patch(void) {
    printf("callback " STR(PATCH_NAME) " pre_patch second\n");
    fflush(stdout);
#if defined(FAIL_PRE) && !defined(SECOND_OK)
    return -22;
#else
    return 0;
#endif
}
int cb2_post_unpatch(void) {
    printf("callback " STR(PATCH_NAME) " post_unpatch second\n");
    fflush(stdout);
    return 0;
}
RELIVE_OBJECT(STR(SECOND), "");
RELIVE_CALLBACK(STR(SECOND), pre_patch, cb2_pre_patch);
RELIVE_CALLBACK(STR(SECOND), post_unpatch, cb2_post_unpatch);
#endif

#ifdef CALLBACKS
RELIVE_CALLBACK("exe", pre_patch, cb_pre_patch);
RELIVE_CALLBACK("exe", post_patch, cb_post_patch);
RELIVE_CALLBACK("exe", pre_unpatch, cb_pre_unpatch);
RELIVE_CALLBACK("exe", post_unpatch, cb_post_unpatch);
#endif
