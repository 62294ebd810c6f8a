//! Micro benchmark of relive-x86 on real code: every sized function of the system's libc.so.6 (.dynsym).
//! Prints a table of per-function medians and p99s, each with its ratio to decoding the same bytes (the
//! baseline, measured in the same run), and the plans/refusals by kind.
//!
//!     cargo bench -p relive-x86 --bench x86            (optionally: -- /path/to/other.so)

use std::collections::BTreeMap;
use std::time::Instant;

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use relive_x86::*;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "/lib/x86_64-linux-gnu/libc.so.6".into());
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let file = object::File::parse(&*data).unwrap();
    let text = file.section_by_name(".text").unwrap();
    let mut funcs: Vec<(String, u64, &[u8])> = file
        .dynamic_symbols()
        .chain(file.symbols())
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
        .filter_map(|s| {
            let bytes = text.data_range(s.address(), s.size()).ok().flatten()?;
            Some((s.name().ok()?.to_string(), s.address(), bytes))
        })
        .collect();
    funcs.sort_by_key(|f| f.1);
    funcs.dedup_by_key(|f| f.1);
    let by_addr: BTreeMap<u64, usize> = funcs.iter().enumerate().map(|(i, f)| (f.1, i)).collect();
    let read = |a: u64, n: usize| -> Option<Vec<u8>> {
        file.sections()
            .find_map(|s| s.data_range(a, n as u64).ok().flatten().map(<[u8]>::to_vec))
    };

    let mut t_decode = Vec::new();
    let mut t_analyze = Vec::new();
    let mut t_clobber = Vec::new();
    let mut t_reloc = Vec::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut plans = Vec::new();
    let mut refusals: Vec<String> = Vec::new();
    for (name, addr, bytes) in &funcs {
        let t = Instant::now();
        let d = decode_all(*addr, bytes);
        t_decode.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(&d);

        let ctx = EntryContext {
            read_data: Some(&read),
            ..EntryContext::default()
        };
        let t = Instant::now();
        let r = analyze_entry(
            FunctionBytes {
                name,
                addr: *addr,
                bytes,
            },
            &ctx,
        );
        t_analyze.push(t.elapsed().as_secs_f64() * 1e6);
        let k = match &r {
            Ok(p) => match &p.kind {
                EntryKind::Pad { .. } => "plan: pad".to_string(),
                EntryKind::PrePad { .. } => "plan: pre-entry pad".to_string(),
                EntryKind::Displaced { .. } => "plan: displaced".to_string(),
            },
            Err(e) => {
                if !matches!(e, EntryError::TooShort { .. }) {
                    refusals.push(e.to_string());
                }
                format!(
                    "refused: {}",
                    format!("{e:?}").split([' ', '{']).next().unwrap_or("?")
                )
            }
        };
        *kinds.entry(k).or_default() += 1;

        let mut callee = |t: u64| {
            let (_, &i) = by_addr.range(..=t).next_back()?;
            let (n, a, b) = &funcs[i];
            (t < a + b.len() as u64).then(|| FunctionCode {
                name: n.clone(),
                addr: *a,
                bytes: b.to_vec(),
            })
        };
        let t = Instant::now();
        let c = clobbered_registers(
            FunctionBytes {
                name,
                addr: *addr,
                bytes,
            },
            &mut callee,
        );
        t_clobber.push(t.elapsed().as_secs_f64() * 1e6);
        match c {
            Ok(Clobbers::Known(_)) => {
                *kinds
                    .entry("clobbers: known (thunk may be needed)".into())
                    .or_default() += 1
            }
            Ok(Clobbers::All { .. }) => *kinds.entry("clobbers: all".into()).or_default() += 1,
            Err(_) => *kinds.entry("clobbers: undecodable".into()).or_default() += 1,
        }
        if let Ok(p) = r {
            plans.push(p);
        }
    }
    for p in &plans {
        let stub = p.stub_window.start + (p.stub_window.end - p.stub_window.start) / 2;
        let t = Instant::now();
        let r = p.encode_old_path(stub);
        t_reloc.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(&r);
    }
    let slot = TlsSlot {
        tpoff: -152,
        width: StateWidth::Dword,
        patched: 1,
        unpatched: 0,
    };
    let mut t_disp = Vec::new();
    let mut t_thunk = Vec::new();
    for p in &plans {
        let d = Dispatch {
            slot,
            direction: Direction::Patching,
            new_version: 0x7f00_0000_0000,
            old_version: p.resume,
        };
        let t = Instant::now();
        std::hint::black_box(encode_dispatcher(p.site - 0x1000, &d).unwrap());
        t_disp.push(t.elapsed().as_secs_f64() * 1e6);
        let keep = RegSet::sysv_call_clobbered(16).minus(RegSet { gpr: 1, vec: 1 });
        let t = Instant::now();
        std::hint::black_box(
            encode_preserving_thunk(p.site - 0x2000, 0x7f00_0000_0000, keep, VectorWidth::Ymm, 16).unwrap(),
        );
        t_thunk.push(t.elapsed().as_secs_f64() * 1e6);
    }

    // Module-wide branch index: build it, then analyse again with it.
    let t = Instant::now();
    let mut ix = TargetIndex::new();
    for (name, addr, bytes) in &funcs {
        ix.add(FunctionBytes {
            name,
            addr: *addr,
            bytes,
        });
    }
    let t_index_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut extra = Vec::new();
    for (name, addr, bytes) in &funcs {
        let ctx = EntryContext {
            read_data: Some(&read),
            index: Some(&ix),
            ..EntryContext::default()
        };
        let with = analyze_entry(
            FunctionBytes {
                name,
                addr: *addr,
                bytes,
            },
            &ctx,
        );
        if let Err(e) = with
            && plans.iter().any(|p| p.addr == *addr)
        {
            extra.push(e.to_string());
        }
    }

    println!(
        "relive-x86 on {path}: {} functions, {} plans",
        funcs.len(),
        plans.len()
    );
    println!(
        "{:<44} {:>7} {:>10} {:>10} {:>14}",
        "operation (per function)", "n", "median µs", "p99 µs", "median/decode"
    );
    let base = percentile(&mut t_decode.clone(), 0.5);
    for (name, v) in [
        ("decode_all (baseline)", &mut t_decode),
        ("analyze_entry (whole function, jump tables)", &mut t_analyze),
        ("clobbered_registers (transitive)", &mut t_clobber),
        ("encode_old_path (BlockEncoder)", &mut t_reloc),
        ("encode_dispatcher", &mut t_disp),
        ("encode_preserving_thunk (15 regs, ymm)", &mut t_thunk),
    ] {
        let n = v.len();
        let med = percentile(v, 0.5);
        let p99 = percentile(v, 0.99);
        println!("{name:<44} {n:>7} {med:>10.2} {p99:>10.2} {:>14.2}", med / base);
    }
    println!();
    for (k, n) in &kinds {
        println!("{k:<44} {n:>7}");
    }
    for r in refusals.iter().take(8) {
        println!("  {r}");
    }
    println!();
    println!(
        "module-wide TargetIndex: {} targets, built in {t_index_ms:.1} ms; {} more refusals with it",
        ix.len(),
        extra.len()
    );
    for r in extra.iter().take(8) {
        println!("  {r}");
    }
}
