//! Shadow variables (SPEC §7, SV1–SV7): new data that a patch hangs off existing objects without
//! changing their layout, keyed by `(obj, id)`.
//!
//! # Design
//!
//! A fixed table of buckets (2^16 for the process-wide store), each a singly linked chain of nodes
//! plus a *generation* counter. The hash mixes `obj` and `id` (SV1 hashes `obj` only and compares
//! `id` on a match; hashing both spreads several ids of one object over buckets and changes nothing
//! observable: `free_all` walks every bucket either way).
//!
//! * Readers (`get`) take no lock, allocate nothing, touch no thread-local and never wait for a
//!   writer: they read the bucket's generation, walk the chain with atomic loads, and re-read the
//!   generation; if it moved, a node may have been recycled under them and they walk again.
//! * Writers (`alloc`, `get_or_alloc`, `free`, `free_all`) serialise on one store lock, as the
//!   kernel's `klp_shadow_lock` does. Inserting is a single release store of the bucket head (a
//!   reader sees the chain before or after, both consistent); unlinking is a single release store
//!   of the predecessor's link followed by a generation bump.
//! * Nodes come from an arena that is never returned to the allocator while the store lives (the
//!   user-space analogue of `SLAB_TYPESAFE_BY_RCU`): a reader that still holds an unlinked node reads
//!   valid memory, and the generation check rejects what it read if the node was reused meanwhile.
//!   Every node field is an atomic, so such racing reads are not data races.
//! * The data block of a variable is a separate allocation, zero-filled, 16-byte aligned, freed right
//!   after its `dtor`. As in the kernel (SV2), the lifetime of a pointer returned by `get` is the
//!   caller's business: free a variable only when no thread can still use it (e.g. in
//!   `post_unpatch`, after the transition has completed).
//!
//! Why no seqlock "odd" phase and no grace period: a reader never waits, so a signal handler that
//! interrupts a writer on its own thread (which cannot make progress until the handler returns)
//! still completes its `get`: the frozen writer cannot recycle anything, so one walk validates.
//!
//! # Async-signal safety (the kernel's rules, translated)
//!
//! | call | async-signal-safe | why |
//! |---|---|---|
//! | `get` | **yes**, from any thread and any signal handler | no lock, no allocation, no TLS, bounded retries only while writers make progress |
//! | `alloc`, `get_or_alloc` | no | allocate with `malloc` and take the store lock (the kernel needs GFP_ATOMIC and a spinlock with IRQs off for the same reason) |
//! | `free`, `free_all` | no | take the store lock and call `free` |
//! | `count` | no | takes the store lock |
//!
//! A writer called while its own thread already holds the store lock (from inside a ctor or dtor,
//! or from a signal handler that interrupted a writer) would deadlock; the store detects it, prints
//! a diagnostic and refuses (alloc returns null, free does nothing). `get` is fine there.
//!
//! ctor and dtor run under the store lock (SV3, SV5): they must not block for long and must not call
//! the store's writers; they may call `get`.
//!
//! fork: the process-wide store hands its lock over across `fork` (pthread_atfork), so a child of a
//! multi-threaded target always starts with a usable store holding the parent's variables.
//!
//! Nothing is ever freed implicitly (SV7): the store knows no patches. A variable lives until
//! `free`/`free_all`, whichever patch (old, cumulative successor, or C code) calls it.

mod diag;
pub mod ffi;

use core::ffi::{c_int, c_void};
use core::ptr::{self, null_mut};
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::*, fence};
use std::alloc::Layout;
use std::sync::{Mutex, MutexGuard, PoisonError};

use diag::Diag;
pub use diag::DiagCounts;

/// `int ctor(void *obj, void *shadow_data, void *ctor_data)`: the kernel's `klp_shadow_ctor_t`.
/// Runs under the store lock on zero-filled data; a non-zero return aborts the allocation.
pub type Ctor =
    unsafe extern "C" fn(obj: *mut c_void, shadow_data: *mut c_void, ctor_data: *mut c_void) -> c_int;

/// `void dtor(void *obj, void *shadow_data)`: the kernel's `klp_shadow_dtor_t`. Runs under the store
/// lock after the variable is unlinked, before its data is freed.
pub type Dtor = unsafe extern "C" fn(obj: *mut c_void, shadow_data: *mut c_void);

/// Alignment of every shadow data block (enough for any scalar, SSE vector or `max_align_t`).
pub const DATA_ALIGN: usize = 16;

/// log2 of the process-wide store's bucket count (65536 buckets, 1 MiB of `.bss`, touched lazily).
pub const GLOBAL_BUCKET_BITS: u32 = 16;

/// Nodes added to the arena at a time.
const CHUNK: usize = 256;

/// After this many chain steps a reader checks whether its bucket's generation moved (a reader
/// that wandered onto recycled nodes restarts instead of walking someone else's chain for long).
const STEPS_BETWEEN_CHECKS: u32 = 64;

/// One hash bucket: the chain head and the generation (bumped after every unlink).
#[repr(C, align(16))]
pub struct Bucket {
    head: AtomicPtr<Node>,
    generation: AtomicU64,
}

impl Bucket {
    const fn new() -> Self {
        Bucket {
            head: AtomicPtr::new(null_mut()),
            generation: AtomicU64::new(0),
        }
    }
}

/// One variable. All fields are atomics because a reader may read a node while a writer recycles it.
struct Node {
    obj: AtomicUsize,
    id: AtomicU64,
    data: AtomicPtr<u8>,
    size: AtomicUsize,
    next: AtomicPtr<Node>,
}

impl Node {
    const fn new() -> Self {
        Node {
            obj: AtomicUsize::new(0),
            id: AtomicU64::new(0),
            data: AtomicPtr::new(null_mut()),
            size: AtomicUsize::new(0),
            next: AtomicPtr::new(null_mut()),
        }
    }
}

/// What only the lock holder touches: the free list and the arena's chunks.
struct Writer {
    free: *mut Node,
    chunks: Vec<*mut [Node]>,
}

// SAFETY: the raw pointers point into the store's arena, which is only mutated under the store's
// mutex; moving the `Writer` between threads (inside the mutex) transfers nothing thread-bound.
unsafe impl Send for Writer {}

/// A shadow-variable store. The agent exports the process-wide one ([`global`]) through the C ABI
/// ([`ffi`]); separate instances exist for tests and benchmarks.
pub struct ShadowStore {
    buckets: &'static [Bucket],
    shift: u32,
    /// `buckets` was leaked from a `Box` by [`ShadowStore::new`] and is freed on drop.
    owned: bool,
    writer: Mutex<Writer>,
    /// `pthread_self()` of the thread holding `writer`, or 0: detects writers re-entered on the
    /// lock holder's own thread (ctor/dtor, signal handler), which would deadlock.
    owner: AtomicUsize,
    live: AtomicUsize,
    diag: Diag,
}

// SAFETY: all shared state is atomics, the mutex-protected `Writer`, and the bucket array (atomics
// only); the arena nodes it points to are atomics and outlive every access (freed only in `drop`,
// which has exclusive access).
unsafe impl Sync for ShadowStore {}
// SAFETY: as above; nothing in the store is tied to the thread that created it.
unsafe impl Send for ShadowStore {}

static GLOBAL_BUCKETS: [Bucket; 1 << GLOBAL_BUCKET_BITS] = [const { Bucket::new() }; 1 << GLOBAL_BUCKET_BITS];
static GLOBAL: ShadowStore = ShadowStore::from_static(&GLOBAL_BUCKETS, GLOBAL_BUCKET_BITS);

/// The process-wide store behind `relive_shadow_*`.
#[inline]
pub fn global() -> &'static ShadowStore {
    &GLOBAL
}

struct Locked<'a> {
    writer: MutexGuard<'a, Writer>,
    owner: &'a AtomicUsize,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Cleared before the mutex is released (the guard field drops after this body).
        self.owner.store(0, Relaxed);
    }
}

/// Fork safety of the process-wide store: a child of a multi-threaded process inherits the store
/// lock in whatever state it was, so a fork while another thread held it would leave every writer
/// in the child deadlocked. The prepare handler takes the lock (waiting for a running ctor/dtor to
/// finish) and the parent/child handlers release it, so the child starts with a free lock and a
/// consistent table. Registered on the first write to the global store (before that the lock has
/// never been taken). A fork called from inside a ctor/dtor (lock held by the forking thread)
/// skips the hand-off.
struct ForkHold(core::cell::UnsafeCell<Option<MutexGuard<'static, Writer>>>);

// SAFETY: only the thread that calls fork() touches it, in the prepare handler and then in the
// parent or child handler of that same fork (glibc runs them on the forking thread).
unsafe impl Sync for ForkHold {}

static FORK_HOLD: ForkHold = ForkHold(core::cell::UnsafeCell::new(None));

fn register_atfork() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers are plain functions valid for the life of the process (the agent is
        // never unloaded: DESIGN §4.6).
        let rc = unsafe { libc::pthread_atfork(Some(atfork_prepare), Some(atfork_release), Some(atfork_release)) };
        if rc != 0 {
            GLOBAL.diag.emit(format_args!(
                "pthread_atfork failed ({rc}): a fork during a shadow alloc/free may deadlock the child's writers"
            ));
        }
    });
}

unsafe extern "C" fn atfork_prepare() {
    if GLOBAL.owner.load(Relaxed) == this_thread() {
        return;
    }
    let guard = GLOBAL.writer.lock().unwrap_or_else(PoisonError::into_inner);
    // SAFETY: see `ForkHold`: only the forking thread accesses the cell.
    unsafe { *FORK_HOLD.0.get() = Some(guard) };
}

unsafe extern "C" fn atfork_release() {
    // SAFETY: see `ForkHold`. Dropping the guard unlocks (in the child, the forking thread is the
    // child's only thread and owns the lock).
    drop(unsafe { (*FORK_HOLD.0.get()).take() });
}

fn this_thread() -> usize {
    // SAFETY: pthread_self has no preconditions; glibc reads it from the thread pointer.
    unsafe { libc::pthread_self() as usize }
}

impl ShadowStore {
    const fn from_static(buckets: &'static [Bucket], bits: u32) -> Self {
        assert!(
            bits >= 1 && bits <= 24 && buckets.len() == 1 << bits,
            "bucket count must be 2^bits"
        );
        ShadowStore {
            buckets,
            shift: 64 - bits,
            owned: false,
            writer: Mutex::new(Writer {
                free: null_mut(),
                chunks: Vec::new(),
            }),
            owner: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            diag: Diag::new(),
        }
    }

    /// A private store with `2^bucket_bits` buckets (1..=24).
    pub fn new(bucket_bits: u32) -> Self {
        let bits = bucket_bits.clamp(1, 24);
        let buckets: Box<[Bucket]> = (0..1usize << bits).map(|_| Bucket::new()).collect();
        let mut s = ShadowStore::from_static(Box::leak(buckets), bits);
        s.owned = true;
        s
    }

    #[inline(always)]
    fn bucket(&self, obj: usize, id: u64) -> &Bucket {
        // Pointers are aligned, so their low bits carry nothing: multiply to push the entropy up and
        // take the top bits (Fibonacci hashing), mixing the id in first.
        let h = ((obj as u64) ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        let i = (h >> self.shift) as usize;
        // SAFETY: `shift == 64 - bits` and `buckets.len() == 1 << bits` (checked in `from_static`), so
        // `i < buckets.len()`. Unchecked because the get path must not contain a panic (DESIGN §4.2).
        unsafe { self.buckets.get_unchecked(i) }
    }

    /// SV2: the data of `<obj, id>`, or null. Lock-free, allocation-free, TLS-free and
    /// async-signal-safe; safe against concurrent alloc/free. `obj` is never dereferenced (SV1).
    #[inline]
    pub fn get(&self, obj: *const c_void, id: u64) -> *mut c_void {
        let obj = obj as usize;
        let b = self.bucket(obj, id);
        'walk: loop {
            let g1 = b.generation.load(Acquire);
            let mut p = b.head.load(Acquire);
            let mut found: *mut u8 = null_mut();
            let mut steps = 0u32;
            while !p.is_null() {
                // SAFETY: every node pointer ever stored in a chain or link points into this store's
                // arena, which is freed only when the store is dropped (exclusive access); all
                // fields are atomics, so reading a node that a writer recycles concurrently is
                // defined behaviour, and the generation check below discards such a read.
                let n = unsafe { &*p };
                if n.obj.load(Relaxed) == obj && n.id.load(Relaxed) == id {
                    found = n.data.load(Relaxed);
                    break;
                }
                p = n.next.load(Acquire);
                steps += 1;
                if steps.is_multiple_of(STEPS_BETWEEN_CHECKS) && b.generation.load(Acquire) != g1 {
                    continue 'walk;
                }
            }
            // Pairs with the writer's release fence after its generation bump: if anything read
            // above came from a recycled node, this load sees the bump.
            fence(Acquire);
            if b.generation.load(Relaxed) == g1 {
                return found.cast();
            }
        }
    }

    /// SV3: allocates `<obj, id>` with `size` zero-filled bytes (16-byte aligned), runs `ctor` on
    /// them under the store lock, and returns the data; null (with a diagnostic) if the key
    /// exists, the ctor fails, memory runs out, or the caller already holds the store lock.
    ///
    /// # Safety
    /// `ctor`, if given, must be safe to call with `(obj, data, ctor_data)` under the store lock.
    pub unsafe fn alloc(
        &self,
        obj: *const c_void,
        id: u64,
        size: usize,
        ctor: Option<Ctor>,
        ctor_data: *mut c_void,
    ) -> *mut c_void {
        // SAFETY: forwarded caller contract.
        unsafe { self.alloc_impl(obj, id, size, ctor, ctor_data, true) }
    }

    /// SV4: the existing data of `<obj, id>` (no ctor, no warning), or a new variable as
    /// [`alloc`](Self::alloc) makes it. ctor runs at most once per key.
    ///
    /// # Safety
    /// As for [`alloc`](Self::alloc).
    pub unsafe fn get_or_alloc(
        &self,
        obj: *const c_void,
        id: u64,
        size: usize,
        ctor: Option<Ctor>,
        ctor_data: *mut c_void,
    ) -> *mut c_void {
        // SAFETY: forwarded caller contract.
        unsafe { self.alloc_impl(obj, id, size, ctor, ctor_data, false) }
    }

    unsafe fn alloc_impl(
        &self,
        obj: *const c_void,
        id: u64,
        size: usize,
        ctor: Option<Ctor>,
        ctor_data: *mut c_void,
        warn_on_exist: bool,
    ) -> *mut c_void {
        // SV3.1 / SV4: the lock-free look-up first.
        let existing = self.get(obj, id);
        if !existing.is_null() {
            return self.on_existing(obj, id, existing, warn_on_exist);
        }
        // SV3.2: allocate zero-filled memory outside the lock.
        let Some(data) = alloc_data(size) else {
            self.diag.emit(format_args!(
                "cannot allocate {size} bytes for shadow variable <{obj:p}, {id:#x}>: out of memory"
            ));
            return null_mut();
        };
        let Some(mut locked) = self.lock(obj, id, "alloc") else {
            // SAFETY: `data` came from alloc_data(size) just above and was never shared.
            unsafe { free_data(data, size) };
            return null_mut();
        };
        // SV3.3: re-check under the lock; a racing insert wins.
        let raced = self.find_locked(obj as usize, id);
        if !raced.is_null() {
            drop(locked);
            // SAFETY: as above, `data` is still private.
            unsafe { free_data(data, size) };
            return self.on_existing(obj, id, raced.cast(), warn_on_exist);
        }
        // SV3.4: ctor under the lock, before the variable becomes visible.
        if let Some(ctor) = ctor {
            // SAFETY: caller contract; `data` is `size` zeroed bytes owned by us.
            let rc = unsafe { ctor(obj.cast_mut(), data.cast(), ctor_data) };
            if rc != 0 {
                drop(locked);
                // SAFETY: the ctor failed, the data was never published.
                unsafe { free_data(data, size) };
                self.diag.emit(format_args!(
                    "Failed to construct shadow variable <{obj:p}, {id:#x}> ({rc})"
                ));
                return null_mut();
            }
        }
        let node = self.take_node(&mut locked.writer);
        let b = self.bucket(obj as usize, id);
        // SAFETY: `node` came off the free list under the lock: no chain links to it, only stale
        // readers may still read it, and all fields are atomics.
        let n = unsafe { &*node };
        n.obj.store(obj as usize, Relaxed);
        n.id.store(id, Relaxed);
        n.data.store(data, Relaxed);
        n.size.store(size, Relaxed);
        n.next.store(b.head.load(Relaxed), Relaxed);
        // Publish: readers that see the new head (Acquire) see the fields above.
        b.head.store(node, Release);
        self.live.fetch_add(1, Relaxed);
        drop(locked);
        data.cast()
    }

    fn on_existing(&self, obj: *const c_void, id: u64, existing: *mut c_void, warn: bool) -> *mut c_void {
        if !warn {
            return existing;
        }
        self.diag.emit(format_args!(
            "Duplicate shadow variable <{obj:p}, {id:#x}>: alloc refused and the existing one left untouched; \
             use get_or_alloc to share it"
        ));
        null_mut()
    }

    /// SV5: unlinks `<obj, id>`, runs `dtor(obj, data)` under the lock and frees the data. An absent
    /// key is a silent no-op.
    ///
    /// # Safety
    /// `dtor`, if given, must be safe to call with `(obj, data)` under the store lock. No thread may
    /// use the variable's data afterwards.
    pub unsafe fn free(&self, obj: *const c_void, id: u64, dtor: Option<Dtor>) {
        let Some(mut locked) = self.lock(obj, id, "free") else {
            return;
        };
        let b = self.bucket(obj as usize, id);
        let mut link = &b.head;
        loop {
            let p = link.load(Relaxed);
            if p.is_null() {
                return;
            }
            // SAFETY: `p` is linked in a chain and we hold the lock: a live arena node.
            let n = unsafe { &*p };
            if n.obj.load(Relaxed) == obj as usize && n.id.load(Relaxed) == id {
                // SAFETY: `link` is the link that points to `p`, found under the lock.
                let (data, size) = unsafe { self.unlink_and_destroy(&mut locked.writer, b, link, p, dtor) };
                drop(locked);
                // Outside the lock (the kernel frees after a grace period, also outside it).
                // SAFETY: unlinked and destroyed above: nothing in the store refers to it.
                unsafe { free_data(data, size) };
                return;
            }
            link = &n.next;
        }
    }

    /// SV6: frees every `<*, id>` as [`free`](Self::free) does, in bucket order.
    ///
    /// # Safety
    /// As for [`free`](Self::free), for every matching variable.
    pub unsafe fn free_all(&self, id: u64, dtor: Option<Dtor>) {
        let Some(mut locked) = self.lock(ptr::null(), id, "free_all") else {
            return;
        };
        for b in self.buckets {
            let mut link = &b.head;
            loop {
                let p = link.load(Relaxed);
                if p.is_null() {
                    break;
                }
                // SAFETY: linked node, lock held.
                let n = unsafe { &*p };
                if n.id.load(Relaxed) == id {
                    // SAFETY: `link` points to `p`; after the unlink it points to p's successor,
                    // so the walk continues from the same link. The data is unreachable after it.
                    unsafe {
                        let (data, size) = self.unlink_and_destroy(&mut locked.writer, b, link, p, dtor);
                        free_data(data, size);
                    }
                } else {
                    link = &n.next;
                }
            }
        }
    }

    /// Unlinks `p` (pointed to by `link` in bucket `b`), bumps the generation, runs the dtor and
    /// recycles the node; returns the data block and its size for the caller to free.
    ///
    /// # Safety
    /// The lock is held (`writer` proves it), `link` lies in `b`'s chain and points to `p`.
    unsafe fn unlink_and_destroy(
        &self,
        writer: &mut Writer,
        b: &Bucket,
        link: &AtomicPtr<Node>,
        p: *mut Node,
        dtor: Option<Dtor>,
    ) -> (*mut u8, usize) {
        // SAFETY: caller contract: `p` is a live node.
        let n = unsafe { &*p };
        link.store(n.next.load(Relaxed), Release);
        // Readers that started before this bump and still hold `p` will see it and walk again;
        // readers that load the new generation (Acquire) see the chain without `p`.
        b.generation.fetch_add(1, Release);
        // Orders the bump before every later write to `p` (dtor aside, recycling rewrites it).
        fence(Release);
        let obj = n.obj.load(Relaxed);
        let data = n.data.load(Relaxed);
        let size = n.size.load(Relaxed);
        if let Some(dtor) = dtor {
            // SAFETY: caller contract of free/free_all.
            unsafe { dtor(obj as *mut c_void, data.cast()) };
        }
        n.data.store(null_mut(), Relaxed);
        n.next.store(writer.free, Relaxed);
        writer.free = p;
        self.live.fetch_sub(1, Relaxed);
        (data, size)
    }

    /// Number of variables in the store, counted by walking every bucket under the lock.
    pub fn count(&self) -> usize {
        let Some(_locked) = self.lock(ptr::null(), 0, "count") else {
            return self.live();
        };
        let mut total = 0;
        for b in self.buckets {
            let mut p = b.head.load(Relaxed);
            while !p.is_null() {
                total += 1;
                // SAFETY: linked node, lock held.
                p = unsafe { &*p }.next.load(Relaxed);
            }
        }
        total
    }

    /// Number of variables, from a counter (no lock; exact when no writer runs).
    pub fn live(&self) -> usize {
        self.live.load(Relaxed)
    }

    /// How many diagnostics this store raised and how many the rate limit dropped.
    pub fn diagnostics(&self) -> DiagCounts {
        self.diag.counts()
    }

    fn lock(&self, obj: *const c_void, id: u64, what: &str) -> Option<Locked<'_>> {
        if core::ptr::eq(self, &GLOBAL) {
            register_atfork();
        }
        let me = this_thread();
        if self.owner.load(Relaxed) == me {
            self.diag.emit(format_args!(
                "{what} of shadow variable <{obj:p}, {id:#x}> refused: this thread already holds the shadow \
                 store lock (called from a ctor/dtor or from a signal handler); only get may be called there"
            ));
            return None;
        }
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.owner.store(me, Relaxed);
        Some(Locked {
            writer,
            owner: &self.owner,
        })
    }

    fn find_locked(&self, obj: usize, id: u64) -> *mut u8 {
        let mut p = self.bucket(obj, id).head.load(Relaxed);
        while !p.is_null() {
            // SAFETY: linked node, lock held by the caller.
            let n = unsafe { &*p };
            if n.obj.load(Relaxed) == obj && n.id.load(Relaxed) == id {
                return n.data.load(Relaxed);
            }
            p = n.next.load(Relaxed);
        }
        null_mut()
    }

    fn take_node(&self, writer: &mut Writer) -> *mut Node {
        if writer.free.is_null() {
            let chunk: Box<[Node]> = (0..CHUNK).map(|_| Node::new()).collect();
            let chunk = Box::into_raw(chunk);
            writer.chunks.push(chunk);
            let base = chunk.cast::<Node>();
            for i in 0..CHUNK {
                // SAFETY: `i < CHUNK`, inside the chunk just allocated; not yet visible to anyone.
                let n = unsafe { &*base.add(i) };
                n.next.store(writer.free, Relaxed);
                // SAFETY: as above.
                writer.free = unsafe { base.add(i) };
            }
        }
        let p = writer.free;
        // SAFETY: free-list nodes are arena nodes; the list is only touched under the lock.
        writer.free = unsafe { &*p }.next.load(Relaxed);
        p
    }
}

impl Drop for ShadowStore {
    /// Frees the data of every remaining variable (no dtor runs: dtors belong to explicit frees),
    /// the arena and, for stores made by [`ShadowStore::new`], the bucket array. The process-wide
    /// store is a `static` and is never dropped.
    fn drop(&mut self) {
        for b in self.buckets {
            let mut p = b.head.load(Relaxed);
            while !p.is_null() {
                // SAFETY: `&mut self`: no reader or writer exists; `p` is a linked arena node.
                let n = unsafe { &*p };
                // SAFETY: the data block belongs to this node alone.
                unsafe { free_data(n.data.load(Relaxed), n.size.load(Relaxed)) };
                p = n.next.load(Relaxed);
            }
        }
        let writer = self.writer.get_mut().unwrap_or_else(PoisonError::into_inner);
        for chunk in writer.chunks.drain(..) {
            // SAFETY: each chunk came from Box::into_raw in take_node and is freed once.
            drop(unsafe { Box::from_raw(chunk) });
        }
        if self.owned {
            let buckets = self.buckets as *const [Bucket] as *mut [Bucket];
            // SAFETY: `owned` stores got `buckets` from Box::leak in `new`; nothing else refers to it.
            drop(unsafe { Box::from_raw(buckets) });
        }
    }
}

fn data_layout(size: usize) -> Option<Layout> {
    // A zero-sized variable still gets a unique, non-null block (the kernel's kzalloc(0) is
    // ZERO_SIZE_PTR; a unique pointer is more useful).
    Layout::from_size_align(size.max(1), DATA_ALIGN).ok()
}

fn alloc_data(size: usize) -> Option<*mut u8> {
    let layout = data_layout(size)?;
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    (!p.is_null()).then_some(p)
}

/// # Safety
/// `p` came from `alloc_data(size)` and is not used afterwards.
unsafe fn free_data(p: *mut u8, size: usize) {
    if let Some(layout) = data_layout(size) {
        // SAFETY: caller contract; same layout as the allocation.
        unsafe { std::alloc::dealloc(p, layout) };
    }
}
