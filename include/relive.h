/*
 * relive.h: declaring a live patch in C (DESIGN §4.9). The Rust equivalent is relive_patch::patch!.
 *
 * Each macro emits one NUL-terminated record of the versioned manifest into the ELF section
 * ".relive_manifest" at compile time (string-literal concatenation in a `used` char array), so
 * `relive inspect fix.so` reads it from the file without running or relocating anything. Records may
 * come in any order and from several translation units. Format: relive_elf::manifest (version 1).
 *
 *   #include <relive.h>
 *
 *   RELIVE_PATCH("fix-greet", 0, 0);              // name, replace (0/1), stacking (0/1)
 *   RELIVE_OBJECT("exe", "");                     // "exe" or a soname; build-id hex ("" = unpinned)
 *   int greet_v2(int n) { return n + 2000; }
 *   RELIVE_FUNC("exe", greet, 0, greet_v2);        // object, old name, sympos (SPEC D5), new function
 *   int my_pre(void) { return 0; }
 *   RELIVE_CALLBACK("exe", pre_patch, my_pre);     // pre_patch, post_patch, pre_unpatch, post_unpatch
 *   RELIVE_STATE(1, 1);                            // klp_state id, version (SPEC ST1)
 *   RELIVE_IMPORT("exe", greet_calls, 0, int *, p_greet_calls);  // defines `int *p_greet_calls`
 *
 * Rules:
 *  - new functions, callbacks and import slots must be exported (not static; the macros mark them
 *    `visibility("default")` where they define them, so -fvisibility=hidden is fine for the rest);
 *  - callbacks are `int fn(void)`; a non-zero pre_patch refuses the patch (SPEC CB1, CB5); what the
 *    other three return is ignored (see RELIVE_CALLBACK);
 *  - a patch must not use initial-exec TLS (DESIGN §4.2): plain `__thread` in a -fPIC shared
 *    object is general-dynamic, which is fine;
 *  - names are C identifiers; object names and build-ids are string literals without spaces.
 */
#ifndef RELIVE_H
#define RELIVE_H

#if __has_include("relive_shadow.h")
#include "relive_shadow.h"
#endif

#define RELIVE_MANIFEST_VERSION 1

#define RELIVE__CAT2(a, b) a##b
#define RELIVE__CAT(a, b) RELIVE__CAT2(a, b)
#define RELIVE__UNIQ(p) RELIVE__CAT(p, RELIVE__CAT(__LINE__, RELIVE__CAT(_, __COUNTER__)))
#define RELIVE__STR2(x) #x
#define RELIVE__STR(x) RELIVE__STR2(x)

/* One manifest record. `aligned(1)` keeps the linker from padding (padding NULs are skipped anyway). */
#define RELIVE__RECORD(text)                                                                         \
    __attribute__((section(".relive_manifest"), used, aligned(1))) static const char RELIVE__UNIQ( \
        relive__manifest_)[] = "relive-manifest/" RELIVE__STR(RELIVE_MANIFEST_VERSION) "\n" text

/* The patch: name (string literal), replace and stacking (0 or 1). Exactly one per patch. */
#define RELIVE_PATCH(name, replace, stacking)                                                  \
    RELIVE__RECORD("patch name=" name " replace=" RELIVE__STR(replace) " stacking=" RELIVE__STR( \
        stacking) "\n")

/* An object the patch changes: "exe" or a soname, and its build-id in hex ("" = not pinned). */
#define RELIVE_OBJECT(object, build_id) RELIVE__RECORD("object name=" object " build_id=" build_id "\n")

/* Replace `old` (sympos: 0 = the unique one, n = the n-th local of that name) with `new_fn`. */
#define RELIVE_FUNC(object, old, sympos, new_fn)                                                  \
    RELIVE__RECORD("func object=" object " old=" #old " sympos=" RELIVE__STR(sympos) " new=" #new_fn \
                   "\n");                                                                          \
    __attribute__((used)) static const void *const RELIVE__UNIQ(relive__keep_) = (const void *)&new_fn

/* A callback of an object: kind is pre_patch, post_patch, pre_unpatch or post_unpatch; fn is
 * `int fn(void)`. Callbacks run in the target on the agent's service thread, and only for objects the
 * process has loaded (SPEC CB1). Only pre_patch can fail a transition: a non-zero return cancels the
 * apply (exit 3, the target unpatched) and that object's post_unpatch does not run (SPEC CB5). relive
 * ignores what post_patch, pre_unpatch and post_unpatch return: the apply or disable goes on and
 * succeeds, so put any check that may refuse in pre_patch. post_unpatch runs only if pre_patch
 * returned 0 or is absent. The patches a replace patch takes over from get no pre_unpatch and no
 * post_unpatch (docs/FAQ.md). */
#define RELIVE_CALLBACK(object, kind, fn)                                               \
    RELIVE__RECORD("callback object=" object " kind=" #kind " fn=" #fn "\n");           \
    __attribute__((used)) static int (*const RELIVE__UNIQ(relive__keep_))(void) = &fn

/* A state (klp_state) the patch declares: id and version, integer literals. */
#define RELIVE_STATE(id, version) \
    RELIVE__RECORD("state id=" RELIVE__STR(id) " version=" RELIVE__STR(version) "\n")

/* An import: defines the exported slot `type slot`, which relive fills with the address of the
 * target symbol `name` (sympos as for RELIVE_FUNC) of `object` before enabling the patch (before
 * pre_patch runs). `name` is a function or a variable (not a thread-local one), and need not be
 * exported: relive looks in .symtab and debug files too.
 *
 * The macro expands to `type slot`, so `type` must end before the slot's name: a function-pointer
 * type needs a typedef first. `void (*)(const char *)` written in place does not compile; this does,
 * and the patch then calls the target's static log_line(msg) as p_log_line(msg):
 *
 *   typedef void (*log_line_fn)(const char *);
 *   RELIVE_IMPORT("exe", log_line, 0, log_line_fn, p_log_line);
 */
#define RELIVE_IMPORT(object, name, sympos, type, slot)                                          \
    RELIVE__RECORD("import object=" object " name=" #name " sympos=" RELIVE__STR(sympos) " slot=" #slot \
                   "\n");                                                                         \
    __attribute__((used, visibility("default"))) type slot

/*
 * System states (SPEC §8, ST1-ST2; the kernel's klp_get_state / klp_get_prev_state), exported by the
 * agent (librelive_agent.so, already loaded in the target; the patch leaves these symbols undefined
 * and the dynamic loader binds them at dlopen). relive tells the agent the states of every installed
 * or transitioning patch (RELIVE_STATE records) before it runs callbacks and after each transition.
 *
 *   relive_state_get("fix-v2", 1)   the state id 1 of patch "fix-v2" (installed or transitioning), or NULL;
 *   relive_state_get_prev(1)        during a transition only (callbacks): the record of the latest patch
 *                                   listed before the transition patch that declares id 1 - the patch
 *                                   being replaced - with the `data` it left there; NULL otherwise.
 *
 * `data` belongs to the patches: store there what a successor should take over (ST4: pre_patch
 * allocates or reuses get_prev()->data, post_unpatch frees). The record of a (patch, id) keeps its
 * address for as long as that patch is installed and is never freed. Both calls are lock-free and
 * async-signal-safe. The record is writable (as klp_get_state's is) so that a patch can set `data`.
 */
struct relive_state {
    unsigned long id;
    unsigned int version;
    void *data;
};
struct relive_state *relive_state_get(const char *patch, unsigned long id);
struct relive_state *relive_state_get_prev(unsigned long id);

#endif /* RELIVE_H */
