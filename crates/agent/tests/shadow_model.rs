//! Model check of the shadow store (SPEC §7): random sequences of get / alloc / get_or_alloc /
//! free / free_all, with and without failing ctors, on a 2-bucket store (every key collides),
//! must behave exactly like a HashMap model of SV1–SV6, and ctor/dtor must run exactly when the
//! rules say.

use core::ffi::{c_int, c_void};
use std::cell::RefCell;
use std::collections::HashMap;

use proptest::prelude::*;
use relive_agent::shadow::ShadowStore;

#[derive(Debug, Clone)]
enum Op {
    Get(usize, u64),
    Alloc(usize, u64, bool),
    GetOrAlloc(usize, u64, bool),
    Free(usize, u64),
    FreeAll(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let obj = 0usize..6;
    let id = 0u64..3;
    prop_oneof![
        (obj.clone(), id.clone()).prop_map(|(o, i)| Op::Get(o, i)),
        (obj.clone(), id.clone(), any::<bool>()).prop_map(|(o, i, f)| Op::Alloc(o, i, f)),
        (obj.clone(), id.clone(), any::<bool>()).prop_map(|(o, i, f)| Op::GetOrAlloc(o, i, f)),
        (obj, id.clone()).prop_map(|(o, i)| Op::Free(o, i)),
        id.prop_map(Op::FreeAll),
    ]
}

thread_local! {
    /// Callback log of the current case: ("ctor"|"dtor", obj, value seen/written).
    static LOG: RefCell<Vec<(&'static str, usize, u64)>> = const { RefCell::new(Vec::new()) };
}

struct CtorArg {
    value: u64,
    fail: bool,
}

unsafe extern "C" fn ctor(obj: *mut c_void, data: *mut c_void, ctor_data: *mut c_void) -> c_int {
    // SAFETY: callers pass a live CtorArg and 8 bytes of data.
    let (arg, slot) = unsafe { (&*ctor_data.cast::<CtorArg>(), &mut *data.cast::<u64>()) };
    assert_eq!(*slot, 0, "data not zeroed before the ctor");
    LOG.with(|l| l.borrow_mut().push(("ctor", obj as usize, arg.value)));
    if arg.fail {
        return -1;
    }
    *slot = arg.value;
    0
}

unsafe extern "C" fn dtor(obj: *mut c_void, data: *mut c_void) {
    // SAFETY: the store passes the variable's live data (8 bytes).
    let v = unsafe { *data.cast::<u64>() };
    LOG.with(|l| l.borrow_mut().push(("dtor", obj as usize, v)));
}

fn key(o: usize) -> *const c_void {
    (0x1000 + o * 8) as *const c_void
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn sv1_to_sv6_random_ops_match_model(ops in proptest::collection::vec(op(), 1..120)) {
        let s = ShadowStore::new(1);
        let mut model: HashMap<(usize, u64), (u64, usize)> = HashMap::new(); // value, pointer
        LOG.with(|l| l.borrow_mut().clear());
        for (step, op) in ops.iter().enumerate() {
            let value = step as u64 + 1;
            let mut want_log: Vec<(&'static str, usize, u64)> = Vec::new();
            match *op {
                Op::Get(o, id) => {
                    let p = s.get(key(o), id) as usize;
                    prop_assert_eq!(p, model.get(&(o, id)).map_or(0, |e| e.1), "step {}: {:?}", step, op);
                }
                Op::Alloc(o, id, fail) | Op::GetOrAlloc(o, id, fail) => {
                    let or_get = matches!(op, Op::GetOrAlloc(..));
                    let mut arg = CtorArg { value, fail };
                    let argp = (&mut arg as *mut CtorArg).cast();
                    // SAFETY: ctor gets a live CtorArg and 8 bytes.
                    let p = unsafe {
                        if or_get { s.get_or_alloc(key(o), id, 8, Some(ctor), argp) }
                        else { s.alloc(key(o), id, 8, Some(ctor), argp) }
                    } as usize;
                    match model.get(&(o, id)) {
                        // SV3.1 / SV4: existing key: no ctor; alloc → NULL, get_or_alloc → existing.
                        Some(&(_, existing)) => prop_assert_eq!(p, if or_get { existing } else { 0 }),
                        None => {
                            want_log.push(("ctor", key(o) as usize, value));
                            if fail {
                                prop_assert_eq!(p, 0, "SV3.4: failing ctor returns NULL");
                            } else {
                                prop_assert!(p != 0 && p.is_multiple_of(16));
                                model.insert((o, id), (value, p));
                            }
                        }
                    }
                }
                Op::Free(o, id) => {
                    if let Some((v, _)) = model.remove(&(o, id)) {
                        want_log.push(("dtor", key(o) as usize, v));
                    }
                    // SAFETY: dtor reads 8 bytes of live data.
                    unsafe { s.free(key(o), id, Some(dtor)) };
                }
                Op::FreeAll(id) => {
                    let mut gone: Vec<(&'static str, usize, u64)> = model
                        .iter()
                        .filter(|(k, _)| k.1 == id)
                        .map(|(k, v)| ("dtor", key(k.0) as usize, v.0))
                        .collect();
                    model.retain(|k, _| k.1 != id);
                    // SAFETY: as above.
                    unsafe { s.free_all(id, Some(dtor)) };
                    gone.sort();
                    want_log.extend(gone);
                }
            }
            let mut got = LOG.with(|l| std::mem::take(&mut *l.borrow_mut()));
            if matches!(op, Op::FreeAll(_)) {
                got.sort(); // SV6: order unspecified
            }
            prop_assert_eq!(got, want_log, "step {}: {:?}", step, op);
            // Every live variable still holds what its ctor wrote.
            for (&(o, id), &(v, p)) in &model {
                prop_assert_eq!(s.get(key(o), id) as usize, p);
                // SAFETY: live variable of 8 bytes.
                prop_assert_eq!(unsafe { *(p as *const u64) }, v);
            }
            prop_assert_eq!(s.count(), model.len());
        }
    }
}
