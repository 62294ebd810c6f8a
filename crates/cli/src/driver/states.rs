//! SPEC §8 (ST1, ST2) in the target: the controller tells the agent the states of every installed or
//! transitioning patch and, during a transition, which earlier patch `relive_state_get_prev(id)`
//! answers with (relive-core's `RunCallback.prev_states`, i.e. `Model::prev_states`). Sent right
//! before a callback runs and after each model output that ran callbacks or dropped a patch
//! (completion, reversal), so patch code always sees the model's table.

use anyhow::anyhow;
use relive_abi::proto::{PrevEntry, Request, Response, StateEntry, StateTable};
use relive_core::PrevState;
use std::sync::Mutex;

use super::Fail;
use super::session::Session;

/// The table as the model has it now, plus the records of `prev` patches the model may already have
/// dropped (R4: the replaced patches leave before the new patch's post_patch runs), plus those of
/// `callback_patch` if the model already dropped it (L4.5: post_unpatch of a disabled patch runs after the
/// model forgot it, before its library is unloaded): taken from what was last sent, else from its file.
pub fn table(
    s: &Session,
    callback_patch: Option<&str>,
    prev: &[PrevState],
    sent: Option<&[StateEntry]>,
) -> (Vec<StateEntry>, Vec<PrevEntry>) {
    let mut states: Vec<StateEntry> = vec![];
    for p in s.doc.model.patches() {
        for st in &p.states {
            states.push(StateEntry {
                patch: p.name.clone(),
                id: st.id,
                version: st.version,
            });
        }
    }
    if let Some(name) = callback_patch.filter(|n| s.doc.model.patch(n).is_none()) {
        let known: Vec<StateEntry> = sent
            .unwrap_or_default()
            .iter()
            .filter(|e| e.patch == name)
            .cloned()
            .collect();
        if !known.is_empty() {
            states.extend(known);
        } else if let Some(rec) = s.doc.patches.iter().find(|p| p.name == name) {
            let m = std::fs::read(&rec.path)
                .ok()
                .and_then(|b| relive_elf::manifest::read_manifest(&b).ok());
            for st in m.map(|m| m.states).unwrap_or_default() {
                states.push(StateEntry {
                    patch: name.to_owned(),
                    id: st.id,
                    version: st.version,
                });
            }
        }
    }
    for p in prev {
        if !states.iter().any(|e| e.patch == p.patch && e.id == p.id) {
            states.push(StateEntry {
                patch: p.patch.clone(),
                id: p.id,
                version: p.version,
            });
        }
    }
    let prev = prev
        .iter()
        .map(|p| PrevEntry {
            patch: p.patch.clone(),
            id: p.id,
        })
        .collect();
    (states, prev)
}

/// What this controller last sent, per pid: one controller holds the agent's lock for a whole command,
/// so an unchanged table needs no round trip. The first sync of a command always sends (a controller
/// killed earlier may have left another table).
static SENT: Mutex<Option<(i32, StateTable)>> = Mutex::new(None);

/// Sends the table (ST1) and the previous states (ST2) to the agent, unless it already has them.
/// `callback_patch`: the patch whose callback runs next, if any.
pub fn sync(s: &mut Session, callback_patch: Option<&str>, prev: &[PrevState]) -> Result<(), Fail> {
    let pid = s.pid;
    let mut sent = SENT.lock().unwrap_or_else(|e| e.into_inner());
    let last = sent
        .as_ref()
        .filter(|(p, _)| *p == pid)
        .map(|(_, t)| t.states.as_slice());
    let (states, prev) = table(s, callback_patch, prev, last);
    let table = StateTable { states, prev };
    if sent.as_ref().is_some_and(|(p, t)| *p == pid && *t == table) {
        return Ok(());
    }
    *sent = None;
    let req = Request::SetStates { table: table.clone() };
    match s.conn.call(&req) {
        Ok(Response::Done) => {
            *sent = Some((pid, table));
            Ok(())
        }
        Ok(r) => Err(Fail::Error(anyhow!(
            "pid {pid}: the agent answered {r:?} to the state table (SPEC §8); use a relive and agent of the same build"
        ))),
        Err(e) => Err(Fail::Error(anyhow!(
            "pid {pid}: sending the state table (SPEC §8) to the agent failed: {e}"
        ))),
    }
}
