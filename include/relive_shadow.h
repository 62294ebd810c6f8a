/*
 * relive_shadow.h: shadow variables for C patches and C programs (SPEC §7, SV1-SV7).
 *
 * New data attached to existing objects without changing their layout, keyed by (obj, id). The
 * functions are exported by the relive agent (librelive_agent.so), which is loaded into the target
 * before any patch: a patch links them as undefined symbols and the dynamic loader binds them to the
 * agent when the patch is dlopen'ed. A program that may run without the agent can declare them weak
 * (define RELIVE_SHADOW_WEAK before including this header) and test for NULL, or look them up with
 * dlsym(RTLD_DEFAULT, "relive_shadow_get").
 *
 * The signatures are the kernel's klp_shadow_* ones. Semantics:
 *  - get(obj, id): the data or NULL. Lock-free; safe on any thread and inside a signal handler
 *    (async-signal-safe). obj is only a key, never dereferenced.
 *  - alloc(...): size zero-filled bytes, 16-byte aligned; ctor(obj, data, ctor_data) runs on them
 *    under the store lock; a non-zero ctor return frees them and returns NULL ("Failed to construct
 *    shadow variable <obj, id> (err)" on stderr). An existing key returns NULL with "Duplicate shadow
 *    variable <obj, id>" on stderr (rate-limited); the existing variable is untouched.
 *  - get_or_alloc(...): the existing data without calling ctor, or alloc. ctor runs at most once
 *    per key.
 *  - free(obj, id, dtor): unlink, dtor(obj, data) under the store lock, free. Absent key: no-op.
 *  - free_all(id, dtor): free for every <*, id>, in unspecified order.
 *  - Nothing is freed implicitly: disabling or replacing a patch leaves its variables alive; a
 *    cumulative patch that uses the same id (and the same layout) inherits them. Free them in the
 *    last patch's post_unpatch callback.
 *  - The lifetime of a pointer returned by get is the caller's business: free a variable only when
 *    no thread can still use it.
 *
 * Async-signal-safe: relive_shadow_get only. alloc/get_or_alloc/free/free_all/count allocate and
 * take the store lock (the kernel needs GFP_ATOMIC and a spinlock for the same calls). ctor and
 * dtor run under that lock: keep them short and never call alloc/free from them (the agent detects
 * it, prints a diagnostic and refuses instead of deadlocking); get is fine there. gfp_flags is
 * accepted for source compatibility and ignored.
 */
#ifndef RELIVE_SHADOW_H
#define RELIVE_SHADOW_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifdef RELIVE_SHADOW_WEAK
#define RELIVE_SHADOW_DECL __attribute__((weak))
#else
#define RELIVE_SHADOW_DECL
#endif

/* The kernel's klp_shadow_ctor_t / klp_shadow_dtor_t. */
typedef int (*relive_shadow_ctor_t)(void *obj, void *shadow_data, void *ctor_data);
typedef void (*relive_shadow_dtor_t)(void *obj, void *shadow_data);

RELIVE_SHADOW_DECL void *relive_shadow_get(const void *obj, unsigned long id);
RELIVE_SHADOW_DECL void *relive_shadow_alloc(const void *obj, unsigned long id, size_t size,
                                             unsigned int gfp_flags, relive_shadow_ctor_t ctor,
                                             void *ctor_data);
RELIVE_SHADOW_DECL void *relive_shadow_get_or_alloc(const void *obj, unsigned long id, size_t size,
                                                    unsigned int gfp_flags, relive_shadow_ctor_t ctor,
                                                    void *ctor_data);
RELIVE_SHADOW_DECL void relive_shadow_free(const void *obj, unsigned long id, relive_shadow_dtor_t dtor);
RELIVE_SHADOW_DECL void relive_shadow_free_all(unsigned long id, relive_shadow_dtor_t dtor);
/* Number of live shadow variables of every id (takes the store lock): a leak check. */
RELIVE_SHADOW_DECL size_t relive_shadow_count(void);

#undef RELIVE_SHADOW_DECL

#ifdef __cplusplus
}
#endif

#endif /* RELIVE_SHADOW_H */
