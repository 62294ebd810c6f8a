// A Rust target for agent injection tests (issue 4, DESIGN §4.6), compiled by the cli tests with
// `rustc --edition 2024 -C opt-level=2 -C debuginfo=1` (crates/cli/tests/agent_live.rs).
//
// Threads: one sleeps 2 s with magic values in xmm8-xmm15 (raw nanosleep syscall) and prints
// "simd-sleep elapsed=<ms> ret=<r> xmm=ok|CLOBBERED"; one std::thread::sleep(2 s) in a loop; one
// busy in user code; one allocating in a loop. The main thread reads stdin (exits at EOF).
// Prints "ready pid=<pid>" once the threads are started.

use std::time::{Duration, Instant};

/// Like tests/targets/agent_target.c, in Rust.
fn main() {
    std::thread::spawn(|| {
        let magic: [u64; 16] = core::array::from_fn(|i| 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1));
        loop {
            let mut out = [0u64; 16];
            let ts = [2i64, 0];
            let t0 = Instant::now();
            let ret: i64;
            // SAFETY: loads/stores 128 bytes from/to local arrays and makes a nanosleep syscall on
            // a local timespec; every register touched is declared.
            unsafe {
                core::arch::asm!(
                    "movdqu xmm8, [{i}]", "movdqu xmm9, [{i}+16]", "movdqu xmm10, [{i}+32]",
                    "movdqu xmm11, [{i}+48]", "movdqu xmm12, [{i}+64]", "movdqu xmm13, [{i}+80]",
                    "movdqu xmm14, [{i}+96]", "movdqu xmm15, [{i}+112]",
                    "syscall",
                    "movdqu [{o}], xmm8", "movdqu [{o}+16], xmm9", "movdqu [{o}+32], xmm10",
                    "movdqu [{o}+48], xmm11", "movdqu [{o}+64], xmm12", "movdqu [{o}+80], xmm13",
                    "movdqu [{o}+96], xmm14", "movdqu [{o}+112], xmm15",
                    i = in(reg) magic.as_ptr(), o = in(reg) out.as_mut_ptr(),
                    inlateout("rax") 35i64 => ret, in("rdi") ts.as_ptr(), in("rsi") 0usize,
                    out("rcx") _, out("r11") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                    out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                );
            }
            let ok = out == magic;
            println!(
                "simd-sleep elapsed={:.1} ret={ret} xmm={}",
                t0.elapsed().as_secs_f64() * 1e3,
                if ok { "ok" } else { "CLOBBERED" }
            );
        }
    });
    std::thread::spawn(|| {
        loop {
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_secs(2));
            println!("sleep elapsed={:.1}", t0.elapsed().as_secs_f64() * 1e3);
        }
    });
    std::thread::spawn(|| {
        let mut x = 0u64;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    });
    std::thread::spawn(|| {
        let mut keep: Vec<Vec<u8>> = Vec::new();
        for i in 0u64.. {
            keep.push(vec![i as u8; 16 + (i as usize * 7919) % 4000]);
            if keep.len() > 64 {
                keep.remove(0);
            }
        }
    });
    println!("ready pid={}", std::process::id());
    let mut line = String::new();
    while std::io::stdin()
        .read_line(&mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        line.clear();
    }
    std::process::exit(0)
}

