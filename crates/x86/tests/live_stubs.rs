//! Generated code run in a real process (DESIGN.md §4.3, §4.3a, §4.4). tests/c/harness.c (built with -O2
//! -fcf-protection=full -no-pie) maps the stub page that relive-x86 encodes, applies the entry writes that
//! EntryPlan gives, and calls the patched functions from threads whose `fs:[tpoff]` state differs. The
//! harness writes its own text (mprotect): that stands in for the driver's /proc/PID/mem writes, which are
//! not this crate's business. Guarded child: readiness line, kill-on-drop, PR_SET_PDEATHSIG, timeouts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use relive_testkit::{compile_c, fixtures_out, spawn_target};
use relive_x86::*;

const STUB: u64 = 0x2000_0000; // within ±2 GiB of the non-PIE text at 0x400000
const IDLE: i32 = 9; // the harness's relive_state initialiser (.tdata)

fn harness() -> PathBuf {
    // One compile per test process: compile_c's temporary name is per process, not per thread.
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/harness.c");
        compile_c(
            "x86-harness",
            &[src.to_str().unwrap()],
            &["-O2", "-fcf-protection=full", "-no-pie", "-pthread"],
        )
    })
    .clone()
}

struct Elf(Vec<u8>);
impl Elf {
    fn sym(&self, name: &str) -> (u64, Vec<u8>) {
        let f = object::File::parse(&*self.0).unwrap();
        let s = f
            .symbols()
            .find(|s| s.name() == Ok(name) && s.kind() == SymbolKind::Text)
            .unwrap();
        let bytes = f
            .sections()
            .find_map(|sec| sec.data_range(s.address(), s.size()).ok().flatten())
            .unwrap()
            .to_vec();
        (s.address(), bytes)
    }
    fn plan(&self, name: &str) -> EntryPlan {
        let (addr, bytes) = self.sym(name);
        analyze_entry(
            FunctionBytes {
                name,
                addr,
                bytes: &bytes,
            },
            &EntryContext::default(),
        )
        .unwrap()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn write_cmd(w: &EntryWrite) -> String {
    format!("write {:x} {}\n", w.addr, hex(&w.bytes))
}

/// Runs the harness on `cmds`; returns its output lines (without "done").
fn run(test: &str, cmds: &str) -> Vec<String> {
    let file = fixtures_out().join(format!("x86-{test}-{}.cmds", std::process::id()));
    std::fs::write(&file, cmds).unwrap();
    let child = spawn_target(&harness(), &["run", file.to_str().unwrap()], "ready");
    let mut out = Vec::new();
    loop {
        let l = child
            .next_line(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("harness stalled after {out:?}"));
        if l == "done" {
            break;
        }
        out.push(l);
    }
    let _ = std::fs::remove_file(&file);
    out
}

fn tpoff() -> i32 {
    let child = spawn_target(&harness(), &["info"], "ready");
    let l = child.next_line(Duration::from_secs(20)).expect("tpoff line");
    l.strip_prefix("tpoff=").unwrap().parse().unwrap()
}

fn page(pieces: &[(u64, &[u8])]) -> String {
    let mut p = vec![0xccu8; 4096];
    let mut end = 0;
    for (at, code) in pieces {
        let o = (at - STUB) as usize;
        p[o..o + code.len()].copy_from_slice(code);
        end = end.max(o + code.len());
    }
    format!("map {STUB:x} {}\n", hex(&p[..end]))
}

/// SPEC H3 / DESIGN.md §4.4 end to end: a displaced prologue with a RIP-relative lea (compute), its
/// relocated old path, dispatchers for both directions, completion to a direct jump, and unpatch.
#[test]
fn t_h3_live_dispatch_patch_complete_unpatch() {
    let elf = Elf(std::fs::read(harness()).unwrap());
    let (compute_new, _) = elf.sym("compute_new");
    let p = elf.plan("compute");
    assert!(matches!(p.kind, EntryKind::Displaced { .. }), "{:?}", p.kind);
    let slot = TlsSlot {
        tpoff: tpoff(),
        width: StateWidth::Dword,
        patched: 1,
        unpatched: 0,
    };
    let mut stubs = StubPage::new(STUB, 4096);
    let old = stubs.place(|at| p.encode_old_path(at).map(|r| r.code)).unwrap();
    let d_patch = stubs
        .place(|at| {
            encode_dispatcher(
                at,
                &Dispatch {
                    slot,
                    direction: Direction::Patching,
                    new_version: compute_new,
                    old_version: old,
                },
            )
        })
        .unwrap();
    let d_unpatch = stubs
        .place(|at| {
            encode_dispatcher(
                at,
                &Dispatch {
                    slot,
                    direction: Direction::Unpatching,
                    new_version: compute_new,
                    old_version: old,
                },
            )
        })
        .unwrap();
    let mut cmds = page(&[(STUB, stubs.bytes())]);
    let calls = |c: &mut String| {
        for st in [1, 0, IDLE] {
            c.push_str(&format!("compute 5 {st}\ncompute 6 {st}\n"));
        }
    };
    calls(&mut cmds); // original
    p.install(d_patch)
        .unwrap()
        .iter()
        .for_each(|w| cmds.push_str(&write_cmd(w)));
    calls(&mut cmds); // patching transition
    p.retarget(d_patch, d_unpatch)
        .unwrap()
        .iter()
        .for_each(|w| cmds.push_str(&write_cmd(w)));
    calls(&mut cmds); // unpatching transition
    p.retarget(d_unpatch, compute_new)
        .unwrap()
        .iter()
        .for_each(|w| cmds.push_str(&write_cmd(w)));
    calls(&mut cmds); // completed: a direct jump
    p.restore(compute_new)
        .unwrap()
        .iter()
        .for_each(|w| cmds.push_str(&write_cmd(w)));
    calls(&mut cmds); // unpatched
    let out: Vec<String> = run("dispatch", &cmds)
        .into_iter()
        .filter(|l| l.starts_with("compute"))
        .collect();
    let results: Vec<i32> = out
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    // compute(5) = 15 + table[5] = 24, compute(6) = 18 + table[6] = 20; compute_new(x) = 1000x + 1.
    let (o5, o6, n5, n6) = (24, 20, 5001, 6001);
    #[rustfmt::skip]
    let want = vec![
        o5, o6, o5, o6, o5, o6, // original, whatever the state
        n5, n6, o5, o6, o5, o6, // patching: PATCHED → new; UNPATCHED and IDLE → old (relocated copy)
        n5, n6, o5, o6, n5, n6, // unpatching: IDLE counts as PATCHED
        n5, n6, n5, n6, n5, n6, // completed: everyone on the new version
        o5, o6, o5, o6, o5, o6, // original bytes restored
    ];
    assert_eq!(results, want, "{out:#?}");
}

/// DESIGN.md §4.3a end to end: a caller keeps rsi, rdx, rcx, r8–r11, xmm5, xmm9, xmm15 live across `call
/// leafy` (which writes only eax). leafy_new clobbers them all. Through the thunk the caller sees its values;
/// with a plain jump (the negative control) it does not.
#[test]
fn t_x86_4_3a_live_thunk_preserves_what_callers_rely_on() {
    let elf = Elf(std::fs::read(harness()).unwrap());
    let (leafy_new, _) = elf.sym("leafy_new");
    let (leafy, leafy_bytes) = elf.sym("leafy");
    let mut none = |_: u64| None;
    let clob = clobbered_registers(
        FunctionBytes {
            name: "leafy",
            addr: leafy,
            bytes: &leafy_bytes,
        },
        &mut none,
    )
    .unwrap();
    let keep = clob.to_preserve(16);
    for r in [
        iced_x86::Register::RSI,
        iced_x86::Register::R11,
        iced_x86::Register::XMM15,
    ] {
        assert!(keep.contains(r), "{clob:?}");
    }
    let p = elf.plan("leafy");
    let thunk = encode_preserving_thunk(STUB, leafy_new, keep, VectorWidth::Xmm, 0).unwrap();
    let expect = "keep 5 -> 132 1111 2222 3333 8888 9999 aaaa bbbb 3333 2222 1111";

    let mut cmds = page(&[(STUB, &thunk.code)]);
    cmds.push_str("keep 5\n");
    p.install(STUB)
        .unwrap()
        .iter()
        .for_each(|w| cmds.push_str(&write_cmd(w)));
    cmds.push_str("keep 5\n");
    let out = run("thunk", &cmds);
    let keeps: Vec<&String> = out.iter().filter(|l| l.starts_with("keep")).collect();
    assert_eq!(keeps, vec![expect, expect], "{out:#?}");

    // Negative control: entering leafy_new directly breaks the caller.
    let mut cmds = page(&[(STUB, &thunk.code)]);
    p.install(leafy_new)
        .unwrap()
        .iter()
        .for_each(|w| cmds.push_str(&write_cmd(w)));
    cmds.push_str("keep 5\n");
    let out = run("nothunk", &cmds);
    let k = out.iter().find(|l| l.starts_with("keep")).unwrap();
    assert!(
        k.starts_with("keep 5 -> 132 ") && k.contains("ffffffffffffffff"),
        "{k}"
    );
}

fn int3_plan_cmd(k: char, plan: &Int3Plan) -> String {
    let steps: Vec<String> = plan
        .steps
        .iter()
        .map(|s| match s {
            Int3Step::Write { addr, bytes } => format!("w:{addr:x}:{}", hex(bytes)),
            Int3Step::SyncCores => "s".into(),
        })
        .collect();
    format!("int3plan {k} {:x} {}\n", plan.handler_dest, steps.join(";"))
}

/// PAUSE-FREE.md §2 with relive-x86's steps: f5 starts with one 5-byte NOP, so its entry is patched and
/// unpatched while three threads call it, with no thread stopped. The harness's SIGTRAP handler sends a
/// thread that hits the int3 to `handler_dest`. Every result must be the old or the new one, never a crash.
#[test]
fn t_x86_int3_protocol_live_no_stop() {
    let elf = Elf(std::fs::read(harness()).unwrap());
    let (f5_new, _) = elf.sym("f5_new");
    let p = elf.plan("f5");
    assert_eq!(
        p.kind,
        EntryKind::Pad {
            pad_len: 5,
            single_nop: true
        }
    );
    let install = &p.install(f5_new).unwrap()[0];
    let restore = &p.restore(f5_new).unwrap()[0];
    let patch = int3_protocol(install, f5_new).unwrap();
    let unpatch = int3_protocol(restore, p.resume).unwrap();
    let mut cmds = int3_plan_cmd('p', &patch);
    cmds.push_str(&int3_plan_cmd('u', &unpatch));
    cmds.push_str("int3run 2000 3\n");
    let out = run("int3", &cmds);
    let line = out
        .iter()
        .find(|l| l.starts_with("int3run"))
        .unwrap_or_else(|| panic!("{out:?}"));
    let field = |k: &str| -> i64 {
        line.split(' ')
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(field("bad"), 0, "{line}");
    assert!(field("old") > 0 && field("new") > 0, "both versions ran: {line}");
    assert_eq!(
        line.rsplit("first=").next(),
        Some("0f"),
        "the NOP is back at the end: {line}"
    );
    eprintln!("{line}");
}
