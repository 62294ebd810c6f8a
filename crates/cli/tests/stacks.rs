//! Live tests of `relive stacks` (issue 3; DESIGN §4.1, §4.5; SPEC D5). Every target is a C
//! program compiled at test time with exact flags, spawned with a readiness handshake,
//! PR_SET_PDEATHSIG and a kill-on-drop guard.

use relive_elf::{Avma, ElfImage, SymSource, SymbolTable};
use relive_proc::{ImageOptions, ProcessImage, thread_info, thread_stack};
use relive_testkit::{GuardedChild, compile_c, spawn_target};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RELIVE: &str = env!("CARGO_BIN_EXE_relive");

/// The flag variants of the issue: -O2 -fomit-frame-pointer; PIE and non-PIE; with and without
/// -g; with -fcf-protection=full.
const VARIANTS: &[(&str, &[&str])] = &[
    (
        "pie",
        &["-O2", "-fomit-frame-pointer", "-fPIE", "-pie", "-pthread"],
    ),
    (
        "nopie_g",
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fno-pie",
            "-no-pie",
            "-g",
            "-pthread",
        ],
    ),
    (
        "pie_g_cet",
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fPIE",
            "-pie",
            "-g",
            "-fcf-protection=full",
            "-pthread",
        ],
    ),
    (
        "nopie_cet",
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fno-pie",
            "-no-pie",
            "-fcf-protection=full",
            "-pthread",
        ],
    ),
    // Beyond the matrix: a static executable (glibc linked in; roots found the same way).
    ("static", &["-O2", "-fomit-frame-pointer", "-static", "-pthread"]),
];

fn spawn_threads(variant: &(&str, &[&str]), args: &[&str]) -> GuardedChild {
    let exe = compile_c(
        &format!("stacks_threads_{}", variant.0),
        &["stacks_threads.c"],
        variant.1,
    );
    spawn_target(&exe, args, "ready")
}

/// Waits (bounded) until the named threads are asleep in the kernel, so their stacks are the
/// blocked ones. Returns name → tid.
fn wait_blocked(pid: i32, names: &[&str]) -> std::collections::HashMap<String, i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut map = std::collections::HashMap::new();
        let mut all = true;
        for tid in relive_proc::list_threads(pid).unwrap() {
            let info = thread_info(pid, tid).unwrap();
            if names.contains(&info.name.as_str()) && info.state != 'S' {
                all = false;
            }
            map.insert(info.name, tid);
        }
        // The main thread too: it prints the readiness line and then blocks (joins, sleeps); a snapshot
        // taken while it still returns from that write differs from gdb's a moment later.
        let main_settled = thread_info(pid, pid).is_ok_and(|i| i.state == 'S')
            && std::fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| {
                s.split_whitespace()
                    .next()
                    .is_some_and(|nr| nr != "1" && nr != "running")
            });
        if all && main_settled && names.iter().all(|n| map.contains_key(*n)) {
            return map;
        }
        assert!(
            Instant::now() < deadline,
            "threads {names:?} of pid {pid} never blocked: {map:?}"
        );
        std::thread::yield_now();
    }
}

fn run_relive(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(RELIVE).args(args).output().expect("run relive");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn stacks_json(pid: i32, extra: &[&str]) -> Value {
    let p = pid.to_string();
    let mut args = vec!["stacks", p.as_str(), "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = run_relive(&args);
    assert_eq!(code, 0, "relive stacks failed: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

fn thread<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no thread {name} in {v:#}"))
}

fn names(t: &Value) -> Vec<String> {
    t["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("??").to_string())
        .collect()
}

fn assert_reliable(t: &Value) {
    assert_eq!(t["reliable"], true, "thread {} not reliable: {:#}", t["name"], t);
    let last = names(t).last().cloned().unwrap();
    assert!(
        matches!(last.as_str(), "clone3" | "clone" | "__clone" | "_start"),
        "{} ends in {last}: {t:#}",
        t["name"]
    );
}

fn position(n: &[String], f: &str) -> usize {
    n.iter()
        .position(|x| x == f)
        .unwrap_or_else(|| panic!("{f} not in {n:?}"))
}

/// DESIGN §4.5: threads blocked in nanosleep, read, a futex and poll, a busy loop, a thread in a
/// signal handler (frames below the handler shown), recursion deeper than the limit (unreliable),
/// on every flag variant.
#[test]
fn t_d45_stacks_of_every_kind_of_thread_all_flag_variants() {
    for variant in VARIANTS {
        let target = spawn_threads(variant, &[]);
        let pid = target.pid();
        wait_blocked(
            pid,
            &["sleeper", "reader", "futex", "poller", "sighandler", "recurse"],
        );
        let v = stacks_json(pid, &[]);
        let ctx = variant.0;

        let t = thread(&v, "sleeper");
        assert_reliable(t);
        let n = names(t);
        assert!(n[0].contains("nanosleep"), "{ctx}: {n:?}");
        assert!(
            position(&n, "sleeper_block") < position(&n, "sleeper_main"),
            "{ctx}: {n:?}"
        );
        assert_eq!(t["state"], "S");

        let t = thread(&v, "reader");
        assert_reliable(t);
        let n = names(t);
        assert!(n[0].contains("read"), "{ctx}: {n:?}");
        position(&n, "reader_block");

        let t = thread(&v, "futex");
        assert_reliable(t);
        let n = names(t);
        assert!(n[0].contains("futex"), "{ctx}: {n:?}");
        assert!(n.iter().any(|x| x.contains("pthread_cond_wait")), "{ctx}: {n:?}");
        position(&n, "futex_block");

        let t = thread(&v, "poller");
        assert_reliable(t);
        let n = names(t);
        assert!(n[0].contains("poll"), "{ctx}: {n:?}");
        position(&n, "poller_block");

        let t = thread(&v, "busy");
        assert_reliable(t);
        let n = names(t);
        assert_eq!(n[0], "busy_loop", "{ctx}: {n:?}");
        assert_eq!(t["frames"][0]["kind"], "live");

        // Signal handler: handler frames, the trampoline, then the interrupted frame and its callers.
        let t = thread(&v, "sighandler");
        assert_reliable(t);
        let n = names(t);
        let h = position(&n, "on_sigusr1");
        assert!(position(&n, "handler_block") < h, "{ctx}: {n:?}");
        let frames = t["frames"].as_array().unwrap();
        assert_eq!(frames[h + 1]["kind"], "signal_trampoline", "{ctx}: {t:#}");
        assert_eq!(frames[h + 2]["kind"], "signal_interrupted", "{ctx}: {t:#}");
        assert_eq!(n[h + 2], "sig_spin", "{ctx}: {n:?}");
        assert_eq!(n[h + 3], "sig_main", "{ctx}: {n:?}");

        // The same with the handler on an alternate signal stack.
        let t = thread(&v, "altstack");
        assert_reliable(t);
        let n = names(t);
        let h = position(&n, "on_sigusr2");
        assert!(position(&n, "alt_handler_block") < h, "{ctx}: {n:?}");
        let frames = t["frames"].as_array().unwrap();
        assert_eq!(frames[h + 1]["kind"], "signal_trampoline", "{ctx}: {t:#}");
        assert_eq!(frames[h + 2]["kind"], "signal_interrupted", "{ctx}: {t:#}");
        assert_eq!(n[h + 2], "alt_spin", "{ctx}: {n:?}");
        assert_eq!(n[h + 3], "alt_main", "{ctx}: {n:?}");

        // Recursion 150 deep: unreliable at the default limit (100), reliable with a larger one.
        let t = thread(&v, "recurse");
        assert_eq!(t["reliable"], false, "{ctx}: {t:#}");
        assert!(
            t["unreliable_reason"].as_str().unwrap().contains("depth limit"),
            "{ctx}: {t:#}"
        );
        assert_eq!(t["frames"].as_array().unwrap().len(), 100);
        let tid = t["tid"].to_string();
        let v2 = stacks_json(pid, &["--tid", &tid, "--max-depth", "200"]);
        assert_eq!(v2["threads"].as_array().unwrap().len(), 1);
        let t2 = thread(&v2, "recurse");
        assert_reliable(t2);
        assert_eq!(names(t2).iter().filter(|x| *x == "recurse").count(), 151, "{ctx}");

        // The main thread ends in _start.
        let main = v["threads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tid"] == pid)
            .unwrap();
        assert_reliable(main);
        assert!(names(main).contains(&"main".to_string()));
    }
}

/// DESIGN §4.5: a thread stopped inside the vDSO unwinds through it (its image read from target
/// memory) to `clone3`.
#[test]
fn t_d45_thread_inside_the_vdso() {
    for variant in [&VARIANTS[0], &VARIANTS[3]] {
        let target = spawn_threads(variant, &[]);
        let pid = target.pid();
        let tid = *wait_blocked(pid, &["sleeper"]).get("vdso").expect("vdso thread");
        let image = ProcessImage::load(pid, &ImageOptions::default()).unwrap();
        let vdso = image
            .modules
            .iter()
            .find(|m| m.path == "[vdso]")
            .expect("a [vdso] module");
        let mut unwinder = image.unwinder();
        let mut hit = None;
        for _ in 0..2000 {
            let ts = thread_stack(pid, tid, &mut unwinder, 100).unwrap();
            if vdso.contains(Avma(ts.stack.frames[0].pc)) {
                hit = Some(ts);
                break;
            }
        }
        let ts = hit.expect("the vdso thread was never stopped inside the vDSO in 2000 tries");
        assert!(ts.stack.verdict.is_reliable(), "{:?}", ts.stack);
        let n: Vec<String> = ts
            .stack
            .frames
            .iter()
            .map(|f| image.symbolize(Avma(f.lookup_pc())).function.unwrap_or_default())
            .collect();
        assert!(n[0].contains("clock_gettime") || n[0].contains("vdso"), "{n:?}");
        assert!(
            n.contains(&"vdso_loop".to_string()) && n.contains(&"vdso_main".to_string()),
            "{n:?}"
        );
    }
}

/// gdb's view of each thread: (pc, function) per frame as printed, inline frames included.
fn gdb_stacks(pid: i32) -> std::collections::HashMap<i32, Vec<(u64, String)>> {
    let out = Command::new("gdb")
        .args([
            "-nx",
            "-batch",
            "-p",
            &pid.to_string(),
            "-ex",
            "set backtrace past-main on",
            "-ex",
            "thread apply all bt -frame-info location-and-address",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run gdb (install it: .ci/run does)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut map = std::collections::HashMap::new();
    let mut cur: Option<i32> = None;
    for line in text.lines() {
        if line.starts_with("Thread ") {
            let lwp = line
                .split("(LWP ")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .and_then(|x| x.trim().parse().ok());
            cur = lwp;
            if let Some(t) = lwp {
                map.insert(t, Vec::new());
            }
            continue;
        }
        let Some(t) = cur else { continue };
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
        let frames: &mut Vec<(u64, String)> = map.get_mut(&t).unwrap();
        if rest.starts_with("<signal handler called>") {
            frames.push((0, "<signal handler called>".into()));
            continue;
        }
        let Some(hex) = rest.strip_prefix("0x") else {
            continue;
        };
        let (pc, after) = hex.split_once(' ').unwrap();
        let pc = u64::from_str_radix(pc, 16).unwrap();
        let func = after
            .strip_prefix("in ")
            .unwrap_or(after)
            .split(' ')
            .next()
            .unwrap()
            .to_string();
        frames.push((pc, func));
    }
    map
}

/// Issue 3 cross-check: on three targets, every thread's frames (pc and function name, aliases
/// allowed) match `gdb -batch -p PID -ex 'thread apply all bt'`.
#[test]
fn serial_t_d45_cross_check_with_gdb() {
    // Three flag variants of the many-kinds target, the two-unit target and the dlopen target.
    for variant in &VARIANTS[..3] {
        let target = spawn_threads(variant, &["blocked-only"]);
        let pid = target.pid();
        wait_blocked(
            pid,
            &[
                "sleeper",
                "reader",
                "futex",
                "poller",
                "sighandler",
                "altstack",
                "recurse",
            ],
        );
        cross_check(variant.0, pid);
    }
    let tu = compile_tu("pie", VARIANTS[0].1);
    let target = spawn_target(&tu, &[], "ready");
    wait_blocked(target.pid(), &["tu1", "tu2"]);
    cross_check("two units", target.pid());
    drop(target);
    let lib = compile_c(
        "libstacks_lib.so",
        &["stacks_lib.c"],
        &["-O2", "-fomit-frame-pointer", "-fPIC", "-shared"],
    );
    let exe = compile_c(
        "stacks_dlopen",
        &["stacks_dlopen.c"],
        &["-O2", "-fomit-frame-pointer", "-pthread", "-ldl"],
    );
    let target = spawn_target(&exe, &[lib.to_str().unwrap()], "ready");
    wait_blocked(target.pid(), &["libthread"]);
    cross_check("dlopen", target.pid());
}

/// Compares every thread of `pid` between `relive stacks` and gdb: same frames (pc), same function
/// names (any alias of the symbol; gdb's inline and tail-call frames folded).
fn cross_check(ctx: &str, pid: i32) {
    let ours = stacks_json(pid, &["--max-depth", "200"]);
    let image = ProcessImage::load(pid, &ImageOptions::default()).unwrap();
    let gdb = gdb_stacks(pid);
    let threads = ours["threads"].as_array().unwrap();
    assert_eq!(
        gdb.len(),
        threads.len(),
        "{}: gdb saw {} threads, relive {}",
        ctx,
        gdb.len(),
        threads.len()
    );
    for t in threads {
        let tid = t["tid"].as_i64().unwrap() as i32;
        // gdb synthesizes "tail call frames" from DWARF call-site info (libc6-dbg): their pc is
        // the address right after a `jmp rel32`, which no stack holds. Drop those.
        let g: Vec<&(u64, String)> = gdb[&tid]
            .iter()
            .filter(|(pc, _)| {
                let mut b = [0u8; 5];
                !(*pc > 5 && relive_proc::read_memory(pid, pc - 5, &mut b).is_ok() && b[0] == 0xe9)
            })
            .collect();
        let frames = t["frames"].as_array().unwrap();
        let pcs: Vec<u64> = frames
            .iter()
            .map(|f| u64::from_str_radix(f["pc"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
            .collect();
        // Group gdb's frames onto ours: a gdb frame with the pc of the previous one is an inline
        // frame of it, unless our next frame has that pc too (recursion).
        let mut groups: Vec<(u64, Vec<&str>)> = Vec::new();
        for (k, (gpc, gname)) in g.iter().enumerate() {
            let j = groups.len();
            if k > 0 && g[k - 1].0 == *gpc && gname != "<signal handler called>" && pcs.get(j) != Some(gpc) {
                groups.last_mut().unwrap().1.push(gname);
            } else {
                groups.push((*gpc, vec![gname]));
            }
        }
        assert_eq!(
            groups.len(),
            frames.len(),
            "{} thread {}: gdb {groups:?}\nrelive {t:#}",
            ctx,
            t["name"]
        );
        for (i, (f, (gpc, gnames))) in frames.iter().zip(&groups).enumerate() {
            let pc = pcs[i];
            let name = f["function"].as_str().unwrap_or("??");
            if gnames[0] == "<signal handler called>" {
                assert_eq!(f["kind"], "signal_trampoline", "{} frame {i}: {t:#}", t["name"]);
                continue;
            }
            assert_eq!(
                pc, *gpc,
                "{} thread {} frame {i}: relive {pc:#x} {name}, gdb {gpc:#x} {gnames:?}",
                ctx, t["name"]
            );
            let lookup = if f["kind"] == "return" { pc - 1 } else { pc };
            let aliases = image.function_aliases(Avma(lookup));
            assert!(
                gnames.iter().any(|g| *g == name
                    || aliases.iter().any(|a| a == g)
                    || (*g == "??" && aliases.is_empty())),
                "{} thread {} frame {i} at {pc:#x}: relive {name} (aliases {aliases:?}), gdb {gnames:?}",
                ctx,
                t["name"]
            );
        }
    }
}

fn compile_tu(tag: &str, flags: &[&str]) -> std::path::PathBuf {
    compile_c(
        &format!("stacks_tu_{tag}"),
        &["stacks_tu1.c", "stacks_tu2.c"],
        flags,
    )
}

/// SPEC D5 and issue 3: a static function found through `.symtab` (it is in no `.dynsym`).
#[test]
fn t_d5_static_function_found_through_symtab() {
    let exe = compile_tu("pie", VARIANTS[0].1);
    let syms = SymbolTable::from_elf(&std::fs::read(&exe).unwrap(), None);
    let helpers: Vec<_> = syms.functions_named("helper").collect();
    assert_eq!(helpers.len(), 2);
    assert!(
        helpers
            .iter()
            .all(|s| s.source == SymSource::Symtab && !s.global && s.size > 0)
    );
    let target = spawn_target(&exe, &[], "ready");
    wait_blocked(target.pid(), &["tu1", "tu2"]);
    let v = stacks_json(target.pid(), &[]);
    for t in ["tu1", "tu2"] {
        let th = thread(&v, t);
        assert_reliable(th);
        assert!(names(th).contains(&"helper".to_string()), "{th:#}");
    }
}

/// SPEC D5: the same static name in two translation units: sympos 1 and 2 resolve to the two
/// functions (in symbol-table order), sympos 0 fails and lists both candidates with addresses.
#[test]
fn t_d5_same_name_in_two_units_sympos() {
    let exe = compile_tu("nopie", VARIANTS[3].1);
    let target = spawn_target(&exe, &[], "ready");
    let pid = target.pid();
    let tids = wait_blocked(pid, &["tu1", "tu2"]);
    let image = ProcessImage::load(pid, &ImageOptions::default()).unwrap();
    let exe_name = exe.file_name().unwrap().to_str().unwrap();
    let (a1, s1) = image.resolve(exe_name, "helper", 1).unwrap();
    let (a2, s2) = image.resolve(exe_name, "helper", 2).unwrap();
    assert_ne!(a1, a2);
    assert!(s1.size > 0 && s2.size > 0);
    let err = image.resolve(exe_name, "helper", 0).unwrap_err().to_string();
    assert!(err.contains("ambiguous") && err.contains("2 candidates"), "{err}");
    for a in [s1.addr, s2.addr] {
        assert!(err.contains(&format!("{:#x}", a.0)), "{err} lacks {:#x}", a.0);
    }
    assert!(image.resolve(exe_name, "helper", 3).is_err());
    // sympos 1 is the helper of the first unit (tu1), running in thread tu1; 2 is tu2's.
    let mut unwinder = image.unwinder();
    for (name, want) in [("tu1", a1), ("tu2", a2)] {
        let ts = thread_stack(pid, tids[name], &mut unwinder, 100).unwrap();
        let hit = ts.stack.frames.iter().any(|f| {
            let pc = f.lookup_pc();
            pc >= want.0 && pc < want.0 + if name == "tu1" { s1.size } else { s2.size }
        });
        assert!(
            hit,
            "thread {name} does not run helper at {want}: {:?}",
            ts.stack.frames
        );
    }
}

/// Issue 3: a function found only in a debug file located by build-id (`--debug-dir`).
#[test]
fn t_symbols_from_build_id_debug_file() {
    let built = compile_tu("g", VARIANTS[1].1);
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("stripped");
    let dbg = dir.path().join("full.debug");
    let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
    ok(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&built)
        .arg(&dbg));
    ok(Command::new("objcopy").arg("--strip-all").arg(&built).arg(&exe));
    let img = ElfImage::parse("stripped", &std::fs::read(&exe).unwrap()).unwrap();
    let id = img.build_id_hex().expect("gcc emits a build-id");
    let dst = dir
        .path()
        .join("dbg/.build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]));
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::rename(&dbg, &dst).unwrap();
    assert!(
        SymbolTable::from_elf(&std::fs::read(&exe).unwrap(), None)
            .functions_named("helper")
            .next()
            .is_none()
    );

    let target = spawn_target(&exe, &[], "ready");
    let pid = target.pid();
    wait_blocked(pid, &["tu1"]);
    let without = stacks_json(pid, &[]);
    assert!(!names(thread(&without, "tu1")).contains(&"helper".to_string()));
    let d = dir.path().join("dbg");
    let with = stacks_json(pid, &["--debug-dir", d.to_str().unwrap()]);
    let t = thread(&with, "tu1");
    assert!(names(t).contains(&"helper".to_string()), "{t:#}");
    assert_reliable(t);
}

/// Issue 3: a library mapped from a file deleted on disk is read through /proc/PID/map_files.
#[test]
fn t_deleted_library_read_through_map_files() {
    let lib = compile_c(
        "libstacks_lib.so",
        &["stacks_lib.c"],
        &["-O2", "-fomit-frame-pointer", "-fPIC", "-shared"],
    );
    let exe = compile_c(
        "stacks_dlopen",
        &["stacks_dlopen.c"],
        &["-O2", "-fomit-frame-pointer", "-pthread", "-ldl"],
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("libgone.so");
    std::fs::copy(&lib, &copy).unwrap();
    let target = spawn_target(&exe, &[copy.to_str().unwrap()], "ready");
    let pid = target.pid();
    std::fs::remove_file(&copy).unwrap();
    wait_blocked(pid, &["libthread"]);
    let image = ProcessImage::load(pid, &ImageOptions::default()).unwrap();
    let m = image
        .modules
        .iter()
        .find(|m| m.path.ends_with("libgone.so"))
        .expect("libgone.so module");
    assert!(m.deleted);
    let v = stacks_json(pid, &[]);
    let t = thread(&v, "libthread");
    assert_reliable(t);
    let f = t["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == "lib_block")
        .expect("lib_block frame");
    assert!(f["object"].as_str().unwrap().ends_with("libgone.so"), "{f:#}");
}

/// The text output: one header per thread with name, state and verdict, frames as
/// function+offset (object).
#[test]
fn t_text_output_and_unknown_tid() {
    let target = spawn_threads(&VARIANTS[1], &["blocked-only"]);
    let pid = target.pid();
    let tids = wait_blocked(pid, &["sleeper", "recurse"]);
    let (code, out, err) = run_relive(&["stacks", &pid.to_string()]);
    assert_eq!(code, 0, "{err}");
    let sleeper = format!("thread {} \"sleeper\" S (sleeping): reliable", tids["sleeper"]);
    assert!(out.contains(&sleeper), "{out}");
    let recurse = format!(
        "thread {} \"recurse\" S (sleeping): UNRELIABLE: more than 100 frames",
        tids["recurse"]
    );
    assert!(out.contains(&recurse), "{out}");
    assert!(
        out.contains("sleeper_block+0x") && out.contains("(libc.so.6)"),
        "{out}"
    );
    assert!(
        out.contains("[signal handler called]") && out.contains("[interrupted by a signal]"),
        "{out}"
    );
    let (code, _, err) = run_relive(&["stacks", &pid.to_string(), "--tid", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("no thread 1 in pid {pid}")), "{err}");
}

/// DESIGN §4.1: a process stopped by job control (SIGSTOP) is inspected and left stopped; it runs
/// on after SIGCONT, and relive never left a stop of its own behind.
#[test]
fn t_d41_job_control_stopped_process_stays_stopped() {
    let target = spawn_threads(&VARIANTS[0], &["blocked-only"]);
    let pid = target.pid();
    let tids = wait_blocked(pid, &["sleeper", "futex"]);
    let all: Vec<i32> = tids.values().copied().collect();
    let wait_all = |want: char| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all.iter().all(|&t| thread_info(pid, t).unwrap().state == want) {
            assert!(Instant::now() < deadline, "threads never reached state {want}");
            std::thread::yield_now();
        }
    };
    assert!(
        Command::new("sh")
            .args(["-c", &format!("kill -STOP {pid}")])
            .status()
            .unwrap()
            .success()
    );
    wait_all('T');
    let v = stacks_json(pid, &[]);
    assert_reliable(thread(&v, "sleeper"));
    wait_all('T');
    assert!(
        Command::new("sh")
            .args(["-c", &format!("kill -CONT {pid}")])
            .status()
            .unwrap()
            .success()
    );
    wait_blocked(pid, &["sleeper", "futex", "reader", "poller"]);
    let v = stacks_json(pid, &[]);
    assert_eq!(thread(&v, "sleeper")["state"], "S");
}

/// Issue 3: `relive stacks` on a process whose threads come and go: threads that exit during the
/// command are reported as gone, the long-lived ones are reliable, the command succeeds.
#[test]
fn serial_t_stacks_under_thread_churn() {
    let exe = compile_c(
        "stacks_churn",
        &["stacks_churn.c"],
        &["-O2", "-fomit-frame-pointer", "-pthread"],
    );
    let target = spawn_target(&exe, &[], "ready");
    let pid = target.pid();
    for _ in 0..3 {
        let v = stacks_json(pid, &[]);
        let threads = v["threads"].as_array().unwrap();
        let sleepers: Vec<&Value> = threads.iter().filter(|t| t["name"] == "sleeper").collect();
        assert_eq!(sleepers.len(), 4, "{v:#}");
        for t in sleepers {
            if t["state"] == "S" {
                assert_reliable(t);
            }
        }
        for t in threads.iter().filter(|t| t["alive"] == false) {
            assert_eq!(t["unreliable_reason"], "the thread exited during the command");
        }
    }
}

/// Errors: a thread another tracer holds (a debugger): the message names that tracer.
#[test]
fn t_error_thread_already_traced_names_the_tracer() {
    let target = spawn_threads(&VARIANTS[0], &["blocked-only"]);
    let pid = target.pid();
    let tid = wait_blocked(pid, &["sleeper"])["sleeper"];
    let held = relive_proc::stop_thread(pid, tid).unwrap();
    let (code, _, err) = run_relive(&["stacks", &pid.to_string(), "--tid", &tid.to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Operation not permitted (os error 1)") && err.contains("already traced by pid"),
        "{err}"
    );
    held.resume().unwrap();
    let v = stacks_json(pid, &["--tid", &tid.to_string()]);
    assert_reliable(thread(&v, "sleeper"));
}

/// Errors: a pid that does not exist.
#[test]
fn t_error_no_such_pid() {
    let (code, out, err) = run_relive(&["stacks", "99999999"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no process with pid 99999999"), "{err}");
    let (code, out, _) = run_relive(&["stacks", "99999999", "--json"]);
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["kind"], "error");
}

/// Copies `files` into a fresh world-readable directory, so that uid 65534 can run them wherever
/// the checkout lives (a clone under /root is not reachable for it).
fn world_copies(files: &[&std::path::Path]) -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = files
        .iter()
        .map(|f| {
            let dst = dir.path().join(f.file_name().unwrap());
            std::fs::copy(f, &dst).unwrap();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
            dst
        })
        .collect();
    (dir, out)
}

/// Errors: a process the user may not trace; the message names the fixes (DESIGN §6).
#[test]
fn t_error_permission_denied_names_the_fix() {
    let target = spawn_threads(&VARIANTS[0], &["blocked-only"]);
    let (_dir, copies) = world_copies(&[std::path::Path::new(RELIVE)]);
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            copies[0].to_str().unwrap(),
            "stacks",
            &target.pid().to_string(),
        ])
        .output()
        .expect("run setpriv (util-linux; .ci/run installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Permission denied (os error 13)"), "{err}");
    assert!(
        err.contains("root") && err.contains("CAP_SYS_PTRACE") && err.contains("SYS_PTRACE"),
        "{err}"
    );
    assert!(err.contains(&target.pid().to_string()), "{err}");
}

/// An unprivileged user may inspect its own processes: no root needed (map_files is then not
/// readable, and relive falls back to the mapped paths).
#[test]
fn t_same_uid_unprivileged_user_works() {
    let built = compile_c("stacks_threads_pie", &["stacks_threads.c"], VARIANTS[0].1);
    let (_dir, copies) = world_copies(&[&built, std::path::Path::new(RELIVE)]);
    let (exe, relive) = (&copies[0], &copies[1]);
    let target = spawn_target(
        std::path::Path::new("setpriv"),
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            exe.to_str().unwrap(),
            "blocked-only",
        ],
        "ready",
    );
    let pid = target.pid();
    wait_blocked(pid, &["sleeper", "futex"]);
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            relive.to_str().unwrap(),
            "stacks",
            &pid.to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for name in ["sleeper", "futex", "sighandler"] {
        let t = thread(&v, name);
        assert_reliable(t);
    }
    assert!(names(thread(&v, "sleeper")).contains(&"sleeper_block".to_string()));
}

/// Errors: the process exits in the middle of the command: "target died", exit 1, no hang.
#[test]
fn serial_t_error_target_exits_mid_command() {
    let exe = compile_c(
        "stacks_many",
        &["stacks_many.c"],
        &["-O2", "-fomit-frame-pointer", "-pthread"],
    );
    let mut target = spawn_target(&exe, &["1500", "2"], "ready");
    let pid = target.pid();
    let mut child = Command::new(RELIVE)
        .args(["-vv", "stacks", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("stopping and unwinding thread") && all.is_empty() {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("relive never started unwinding");
    target.child_mut().kill().unwrap();
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    let unwound = err.matches("stopping and unwinding thread").count();
    assert!(
        unwound < 1501,
        "relive finished all {unwound} threads before the kill: not mid-command"
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("target died") && err.contains(&pid.to_string()),
        "{err}"
    );
}
