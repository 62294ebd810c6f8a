//! Pure unwinding tests over synthetic code with hand-written CFI (tests/targets/stacks_synthetic.c)
//! and fake stack memory (DESIGN §4.5): root detection, "clean end that is not a root", signal
//! frames, the depth limit, stub ranges and unknown code.

use relive_elf::{ElfImage, Svma, SymbolTable, function_ranges, ra_undefined_at};
use relive_unwind::{FrameKind, StartRegs, Unreliable, UnwindModule, Unwinder, Verdict};
use std::collections::HashMap;
use std::sync::Arc;

const BIAS: u64 = 0x7000_0000_0000;
const S: u64 = 0x7ff0_0000_1000;

struct Syn {
    unwinder: Unwinder,
    sym: HashMap<&'static str, u64>,
}

fn syn() -> Syn {
    let so = relive_testkit::compile_c(
        "libstacks_synthetic.so",
        &["stacks_synthetic.c"],
        &["-shared", "-nostdlib", "-fPIC"],
    );
    let data = std::fs::read(&so).unwrap();
    let image = ElfImage::parse("syn", &data).unwrap();
    let syms = SymbolTable::from_elf(&data, None);
    let mut sym = HashMap::new();
    for n in [
        "syn_leaf",
        "syn_root",
        "syn_noroot",
        "syn_rec",
        "syn_restore",
        "syn_nocfi",
    ] {
        sym.insert(n, syms.resolve("syn", n, 0).unwrap().addr.to_avma(BIAS).0);
    }
    let m = UnwindModule {
        name: "syn".into(),
        avma_range: BIAS..BIAS + 0x4000,
        bias: BIAS,
        image: Arc::new(image),
        data: data.into(),
    };
    Syn {
        unwinder: Unwinder::new([m]),
        sym,
    }
}

fn run(s: &mut Syn, ip: u64, mem: &HashMap<u64, u64>, max: usize) -> relive_unwind::Stack {
    let mut reader = |a: u64| mem.get(&a).copied();
    s.unwinder
        .unwind(StartRegs { ip, sp: S, bp: 0 }, &mut reader, max)
}

#[test]
fn t_d45_reliable_only_at_a_cfi_root() {
    let mut s = syn();
    let (leaf, root, noroot) = (s.sym["syn_leaf"], s.sym["syn_root"], s.sym["syn_noroot"]);
    let mem = HashMap::from([(S + 24, root + 5)]);
    let st = run(&mut s, leaf + 4, &mem, 100);
    assert_eq!(st.verdict, Verdict::Reliable, "{st:?}");
    assert_eq!(st.frames.len(), 2);
    assert_eq!(
        (st.frames[0].pc, &st.frames[0].kind),
        (leaf + 4, &FrameKind::Live)
    );
    assert_eq!(
        (st.frames[1].pc, &st.frames[1].kind),
        (root + 5, &FrameKind::Return)
    );

    // A clean end (return address 0) in a function that is not a root is unreliable.
    let mem = HashMap::from([(S + 24, noroot + 5), (S + 32, 0)]);
    let st = run(&mut s, leaf + 4, &mem, 100);
    assert!(
        matches!(st.verdict, Verdict::Unreliable(Unreliable::NoRoot { .. })),
        "{st:?}"
    );

    // A caller without CFI: never guessed through with frame pointers.
    let nocfi = s.sym["syn_nocfi"];
    let mem = HashMap::from([(S + 24, nocfi + 5), (S + 32, root + 5)]);
    let st = run(&mut s, leaf + 4, &mem, 100);
    assert_eq!(
        st.verdict,
        Verdict::Unreliable(Unreliable::NoCfi { pc: nocfi + 5 }),
        "{st:?}"
    );

    // Unreadable stack: unreliable with the error.
    let st = run(&mut s, leaf + 4, &HashMap::new(), 100);
    assert!(
        matches!(st.verdict, Verdict::Unreliable(Unreliable::UnwindError { .. })),
        "{st:?}"
    );
}

#[test]
fn t_d45_steps_through_a_signal_frame() {
    let mut s = syn();
    let (leaf, root, restore) = (s.sym["syn_leaf"], s.sym["syn_root"], s.sym["syn_restore"]);
    assert!(s.unwinder.is_sigreturn_trampoline(restore));
    assert!(!s.unwinder.is_sigreturn_trampoline(restore + 1));
    assert!(!s.unwinder.is_sigreturn_trampoline(leaf));
    // Handler (syn_leaf) returns to the trampoline; the ucontext follows at S+32; its gregs
    // (at +40) hold the interrupted rip (16), rsp (15) and rbp (10).
    let uc = S + 32;
    let s2 = S + 0x1000;
    let mem = HashMap::from([
        (S + 24, restore),
        (uc + 40 + 16 * 8, leaf + 4),
        (uc + 40 + 15 * 8, s2),
        (uc + 40 + 10 * 8, 0),
        (s2 + 24, root + 5),
    ]);
    let mut reader = |a: u64| mem.get(&a).copied();
    let st = s.unwinder.unwind(
        StartRegs {
            ip: leaf + 4,
            sp: S,
            bp: 0,
        },
        &mut reader,
        100,
    );
    assert_eq!(st.verdict, Verdict::Reliable, "{st:?}");
    let kinds: Vec<_> = st.frames.iter().map(|f| (f.pc, f.kind.clone())).collect();
    assert_eq!(
        kinds,
        vec![
            (leaf + 4, FrameKind::Live),
            (restore, FrameKind::SignalTrampoline),
            (leaf + 4, FrameKind::SignalInterrupted),
            (root + 5, FrameKind::Return),
        ]
    );
    // A thread stopped on the trampoline itself (rsp at the ucontext).
    let mem2 = HashMap::from([
        (S + 40 + 16 * 8, leaf + 4),
        (S + 40 + 15 * 8, s2),
        (S + 40 + 10 * 8, 0),
        (s2 + 24, root + 5),
    ]);
    let st = run(&mut s, restore, &mem2, 100);
    assert_eq!(st.verdict, Verdict::Reliable, "{st:?}");
    assert_eq!(st.frames[1].kind, FrameKind::SignalInterrupted);
    // A signal frame that cannot be read is unreliable, never a clean end.
    let st = run(&mut s, leaf + 4, &HashMap::from([(S + 24, restore)]), 100);
    assert!(
        matches!(st.verdict, Verdict::Unreliable(Unreliable::BadSignalFrame { .. })),
        "{st:?}"
    );
}

#[test]
fn t_d45_depth_limit() {
    let mut s = syn();
    let rec = s.sym["syn_rec"];
    let mem: HashMap<u64, u64> = (0..500).map(|i| (S + 8 * i, rec + 5)).collect();
    let st = run(&mut s, rec + 5, &mem, 50);
    assert_eq!(
        st.verdict,
        Verdict::Unreliable(Unreliable::DepthLimit { max: 50 })
    );
    assert_eq!(st.frames.len(), 50);
}

#[test]
fn t_d45_stub_ranges_make_the_function_active() {
    let mut s = syn();
    let (leaf, root) = (s.sym["syn_leaf"], s.sym["syn_root"]);
    s.unwinder.add_code_range(0x5000..0x6000, "fix:compute");
    // Innermost frame in a stub: the return address is at [rsp]; the stack stays checkable.
    let st = run(&mut s, 0x5010, &HashMap::from([(S, root + 5)]), 100);
    assert_eq!(st.verdict, Verdict::Reliable, "{st:?}");
    assert_eq!(st.stub_labels().collect::<Vec<_>>(), vec!["fix:compute"]);
    // A return address into a stub cannot be unwound through: unreliable, stub still reported.
    let st = run(&mut s, leaf + 4, &HashMap::from([(S + 24, 0x5010)]), 100);
    assert!(
        matches!(
            st.verdict,
            Verdict::Unreliable(Unreliable::StubNotInnermost { .. })
        ),
        "{st:?}"
    );
    assert_eq!(st.stub_labels().count(), 1);
    s.unwinder.remove_code_range(0x5000);
    // Without the range, 0x5010 is unknown code.
    let st = run(&mut s, 0x5010, &HashMap::from([(S, root + 5)]), 100);
    assert_eq!(
        st.verdict,
        Verdict::Unreliable(Unreliable::UnknownCode { pc: 0x5010 })
    );
}

#[test]
fn t_eh_frame_ranges_and_root_marker() {
    let so = relive_testkit::compile_c(
        "libstacks_synthetic.so",
        &["stacks_synthetic.c"],
        &["-shared", "-nostdlib", "-fPIC"],
    );
    let data = std::fs::read(&so).unwrap();
    let image = ElfImage::parse("syn", &data).unwrap();
    let syms = SymbolTable::from_elf(&data, None);
    let at = |n: &str| syms.resolve("syn", n, 0).unwrap();
    let ranges = function_ranges(&image, &data);
    for n in ["syn_leaf", "syn_root", "syn_noroot", "syn_rec"] {
        let s = at(n);
        assert!(
            ranges.contains(&(s.addr..Svma(s.addr.0 + s.size))),
            "{n}: {ranges:?}"
        );
    }
    assert_eq!(
        ra_undefined_at(&image, &data, Svma(at("syn_root").addr.0 + 2)),
        Some(true)
    );
    assert_eq!(
        ra_undefined_at(&image, &data, Svma(at("syn_leaf").addr.0 + 4)),
        Some(false)
    );
    assert_eq!(
        ra_undefined_at(&image, &data, Svma(at("syn_restore").addr.0)),
        None
    );
}
