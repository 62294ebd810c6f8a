//! relive-patch's typed state API (`relive_patch::state::State`) against the agent's exported C ABI
//! (`relive_state_get`, `relive_state_get_prev`), linked the way a patch is: relive-patch declares them
//! as undefined symbols and this binary gets them from the agent rlib (in a target: from the preloaded
//! librelive_agent.so). The table is filled as the agent's `SetStates` handler fills it (SPEC §8).

use relive_abi::proto::{PrevEntry, StateEntry};
use relive_agent::state::{ReliveState, relive_state_get, relive_state_get_prev, set_states};
use relive_patch::state::State;

/// Keeps the agent's exports in this binary (see shadow_patch_api.rs).
#[used]
static KEEP: (
    unsafe extern "C" fn(*const core::ffi::c_char, u64) -> *mut ReliveState,
    extern "C" fn(u64) -> *mut ReliveState,
) = (relive_state_get, relive_state_get_prev);

fn st(patch: &str, id: u64, version: u32) -> StateEntry {
    StateEntry {
        patch: patch.into(),
        id,
        version,
    }
}

// One test: the table is process-wide.
#[test]
fn t_st1_st2_typed_state_take_over_through_prev() {
    assert!(State::get(c"fix-v1", 1).is_none(), "empty table");
    assert!(State::get_prev(1).is_none(), "ST2: nothing outside a transition");

    set_states(&[st("fix-v1", 1, 1)], &[]).unwrap();
    let v1 = State::get(c"fix-v1", 1).expect("ST1: the installed patch's state");
    assert_eq!((v1.id(), v1.version()), (1, 1));
    assert!(v1.data().is_null());
    let mut payload = 42u64;
    v1.set_data((&raw mut payload).cast());
    assert!(State::get(c"fix-v1", 2).is_none() && State::get(c"other", 1).is_none());

    // The cumulative fix-v2 (state 1 at version 2) in transition: get_prev hands it v1's record.
    set_states(
        &[st("fix-v1", 1, 1), st("fix-v2", 1, 2)],
        &[PrevEntry {
            patch: "fix-v1".into(),
            id: 1,
        }],
    )
    .unwrap();
    let v2 = State::get(c"fix-v2", 1).unwrap();
    let prev = State::get_prev(1).expect("ST2 during the transition");
    assert_eq!((prev.version(), prev.data()), (1, (&raw mut payload).cast()));
    v2.set_data(prev.data());
    // SAFETY: `payload` is alive; the pointer was set just above from its address.
    assert_eq!(unsafe { *v2.data().cast::<u64>() }, 42);

    // Completion: fix-v1 leaves; fix-v2's record (and its data) stay.
    set_states(&[st("fix-v2", 1, 2)], &[]).unwrap();
    assert!(State::get(c"fix-v1", 1).is_none());
    assert!(State::get_prev(1).is_none());
    let again = State::get(c"fix-v2", 1).unwrap();
    assert_eq!(again.data(), (&raw mut payload).cast());
    assert!(format!("{again:?}").contains("version: 2"));
}
