/* Synthetic code with hand-written CFI for relive-unwind's pure tests (issue 3, DESIGN §4.5).
 * Built as a shared object (-shared -nostdlib); never run: the tests read its bytes and unwind
 * fake stacks through it.
 *   syn_leaf:    sub $24,%rsp; CFA = rsp+32 from offset 4        (a frame of 32 bytes)
 *   syn_root:    cfi_undefined rip; call syn_leaf                (a thread root, like clone3)
 *   syn_noroot:  ordinary CFI; call syn_leaf                     (not a root)
 *   syn_rec:     call syn_rec                                    (recursion, CFA = rsp+8)
 *   syn_nocfi:   call syn_leaf, no CFI at all
 *   syn_restore: mov $15,%rax; syscall                           (glibc's __restore_rt) */
__asm__(
    ".text\n"
    ".globl syn_leaf\n.type syn_leaf,@function\nsyn_leaf:\n"
    ".cfi_startproc\n"
    "  sub $24, %rsp\n"
    ".cfi_def_cfa_offset 32\n"
    "  nop\n  nop\n"
    "  add $24, %rsp\n"
    ".cfi_def_cfa_offset 8\n"
    "  ret\n"
    ".cfi_endproc\n.size syn_leaf, .-syn_leaf\n"
    ".globl syn_root\n.type syn_root,@function\nsyn_root:\n"
    ".cfi_startproc\n.cfi_undefined rip\n"
    "  call syn_leaf\n  hlt\n"
    ".cfi_endproc\n.size syn_root, .-syn_root\n"
    ".globl syn_noroot\n.type syn_noroot,@function\nsyn_noroot:\n"
    ".cfi_startproc\n"
    "  call syn_leaf\n  hlt\n"
    ".cfi_endproc\n.size syn_noroot, .-syn_noroot\n"
    ".globl syn_rec\n.type syn_rec,@function\nsyn_rec:\n"
    ".cfi_startproc\n"
    "  call syn_rec\n  ret\n"
    ".cfi_endproc\n.size syn_rec, .-syn_rec\n"
    ".globl syn_nocfi\n.type syn_nocfi,@function\nsyn_nocfi:\n"
    "  call syn_leaf\n  ret\n"
    ".size syn_nocfi, .-syn_nocfi\n"
    ".globl syn_restore\n.type syn_restore,@function\nsyn_restore:\n"
    "  mov $15, %rax\n  syscall\n"
    ".size syn_restore, .-syn_restore\n");
