/* Patches of the oracle target (tests/targets/transition_oracle.c), one source for many variants:
 *   -DPATCH_NAME=a     the patch's name
 *   -DVERSION=N        the version its f returns and the tag its g returns (the original is 1)
 *   -DREPLACE=1        an atomic-replace (cumulative) patch (SPEC R1)
 *   -DSTACKING=1       opts in to stacking (SPEC K5)
 *   -DONLY_F=1         replaces f only (its f then expects the g below it: the original's tag 1)
 *   -DSTALL=1          also replaces `held`, which a thread sleeps in forever (T-cb9)
 *   -DCALLBACKS=1      the four callbacks print "callback <name> <kind>" on the target's stdout
 *   -DFAIL_PRE=1       pre_patch returns -19 (ENODEV; T-cb5 / issue 5 test 7)
 * New f calls g through the executable's symbol, so g's entry dispatches per thread: a thread that entered
 * the new f must reach the new g, and the old f the old g; any mix is counted in oracle_mix.
 */
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

__attribute__((used, section(".relive_manifest"))) static const char relive_manifest[] =
    "relive-manifest/1\n"
    "patch name=" STR(PATCH_NAME) " replace=" STR(REPLACE) " stacking=" STR(STACKING) "\n"
    "object name=exe\n"
    "func object=exe old=f sympos=0 new=f_v\n"
#ifndef ONLY_F
    "func object=exe old=g sympos=0 new=g_v\n"
#endif
#ifdef STALL
    "func object=exe old=held sympos=0 new=held_v\n"
#endif
#ifdef CALLBACKS
    "callback object=exe kind=pre_patch fn=cb_pre_patch\n"
    "callback object=exe kind=post_patch fn=cb_post_patch\n"
    "callback object=exe kind=pre_unpatch fn=cb_pre_unpatch\n"
    "callback object=exe kind=post_unpatch fn=cb_post_unpatch\n"
#endif
    ;

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
