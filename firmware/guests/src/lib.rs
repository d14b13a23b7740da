//! Runtime shared by cgsvmm's bare-metal guest images.
//!
//! Owns what every image needs and `core` does not give: the image header
//! and entry stub ([`guest_image!`]), the memory functions the compiler
//! calls, port I/O, serial output, the TSC clock and the panic handler. It
//! runs at CPL3 in 64-bit mode on page tables the VMM built; it has no
//! interrupt handlers and never executes a privileged instruction. The
//! helper's building blocks that need no guest (locks, index claims,
//! entropy, range checks, wiping keys) live here too, so that they are
//! unit-tested on the host (`cargo test` in this directory).

#![cfg_attr(not(test), no_std)]

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

pub use cgsvmm_fw_abi as abi;

pub mod entropy;
pub mod ranges;
pub mod sync;
pub mod wiped;

/// Emits the image header (first bytes of the image) and the entry stub that
/// aligns the stack and calls `$main(params)`. Images with a header of their
/// own after the image header (the migration helper) pass its assembly lines
/// and constants after a `;`.
#[macro_export]
macro_rules! guest_image {
    ($kind:expr, $main:path) => {
        $crate::guest_image!($kind, $main; ;);
    };
    ($kind:expr, $main:path; $($extra:literal),* ; $($name:ident = $value:expr),*) => {
        core::arch::global_asm!(
            ".pushsection .header, \"a\"",
            ".ascii \"CGSVFW01\"",
            ".long {version}",
            ".long {kind}",
            ".quad __load_addr",
            ".quad _start",
            ".quad __image_end",
            $($extra,)*
            ".popsection",
            ".pushsection .text.entry, \"ax\"",
            ".global _start",
            "_start:",
            "and rsp, -16",
            "call {main}",
            "ud2",
            ".popsection",
            version = const $crate::abi::IMAGE_HEADER_VERSION,
            kind = const $kind,
            main = sym $main,
            $($name = const $value,)*
        );
    };
}

/// Writes one byte to an I/O port (allowed at CPL3 by the TSS I/O bitmap).
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects in this address space; the VMM
    // grants every port through the TSS bitmap.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

/// Writes one 32-bit value to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack))
    };
}

/// Reads the time-stamp counter (the host's TSC: not virtualised at CPL3).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: RDTSC only reads the counter; CR4.TSD is clear.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The privilege level the code runs at (CS's low two bits).
#[inline(always)]
pub fn cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no effects.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    cs & 3
}

/// CPUID leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
#[inline(always)]
pub fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid(leaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// KVM's hypervisor signature leaf and the feature leaf after it.
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;

/// Whether KVM advertises the paravirtual feature bit `bit` of CPUID
/// 0x40000001 EAX (the VMM clears KVM_FEATURE_HC_MAP_GPA_RANGE when it does
/// not answer that hypercall).
pub fn kvm_feature(bit: u32) -> bool {
    let [max, b, c, d] = cpuid(KVM_CPUID_SIGNATURE);
    let signature = [b, c, d].map(u32::to_le_bytes);
    max > KVM_CPUID_SIGNATURE
        && signature.as_flattened() == b"KVMKVMKVM\0\0\0"
        && cpuid(KVM_CPUID_SIGNATURE + 1)[0] & (1 << bit) != 0
}

/// A KVM hypercall with three arguments (CPL0 only: at CPL3 KVM answers
/// -KVM_EPERM without an exit). VMMCALL on AMD, VMCALL elsewhere; KVM takes
/// both, but the other vendor's costs an emulated #UD.
pub fn kvm_hypercall3(nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let [_, b, c, d] = cpuid(0);
    let amd = [b, d, c].map(u32::to_le_bytes).as_flattened() == b"AuthenticAMD";
    let ret: u64;
    // SAFETY: a hypercall only asks the hypervisor; KVM's ABI takes the
    // number in RAX and arguments in RBX, RCX, RDX and returns in RAX. RBX
    // cannot be named as an asm operand, so it is swapped in and out.
    unsafe {
        if amd {
            core::arch::asm!("xchg {a0}, rbx", "vmmcall", "xchg {a0}, rbx",
                a0 = inout(reg) a0 => _, inout("rax") nr => ret, in("rcx") a1, in("rdx") a2,
                options(nostack))
        } else {
            core::arch::asm!("xchg {a0}, rbx", "vmcall", "xchg {a0}, rbx",
                a0 = inout(reg) a0 => _, inout("rax") nr => ret, in("rcx") a1, in("rdx") a2,
                options(nostack))
        }
    };
    ret
}

/// Asks the VMM to do something (`LAB_CMD_*`) through the lab control port.
pub fn lab_command(cmd: u32) {
    outl(abi::LAB_PORT, cmd);
}

/// Writes text to COM1, one `out` per byte. Use [`sprint!`], which holds
/// the print lock so lines of different vCPUs never interleave.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            outb(abi::SERIAL_PORT, b);
        }
        Ok(())
    }
}

/// Taken while one vCPU prints (images' data is shared by all their vCPUs).
static PRINT_LOCK: AtomicBool = AtomicBool::new(false);

/// Prints `args` to the serial port as one unit.
pub fn print_locked(args: fmt::Arguments) {
    while PRINT_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let _ = fmt::Write::write_fmt(&mut Serial, args);
    PRINT_LOCK.store(false, Ordering::Release);
}

/// Prints to the serial port like `print!`, whole.
#[macro_export]
macro_rules! sprint {
    ($($arg:tt)*) => {
        $crate::print_locked(format_args!($($arg)*))
    };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No IDT: the undefined opcode becomes a triple fault, which the VMM
    // sees as a shutdown exit and reports.
    // SAFETY: deliberately faults; nothing after it runs.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

// The compiler lowers copies and fills to calls to these symbols and there is
// no libc to provide them. `rep movsb`/`rep stosb` keep the compiler from
// turning a loop back into a call to the very function being defined.

/// # Safety
/// As C `memcpy`: `dst` and `src` valid for `n` bytes and not overlapping.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _,
            inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C `memmove`: `dst` and `src` valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dst is below src or past it.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: overlapping with dst above src: copy backwards with DF set,
    // cleared again before returning as the ABI requires.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
            options(nostack));
    }
    dst
}

/// # Safety
/// As C `memset`: `dst` valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _,
            in("al") value as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C `memcmp`: `a` and `b` valid for `n` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees n readable bytes; volatile
        // keeps the loop from being recognised as a call to memcmp.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As C `bcmp`.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Some dependencies (ring) link `alloc` without allocating on the paths
/// these images use; there is no heap, so any allocation fails (and the
/// resulting panic is a triple fault the VMM reports).
#[cfg(not(test))]
struct NoHeap;

// SAFETY: never hands out memory: every allocation fails with null.
#[cfg(not(test))]
unsafe impl core::alloc::GlobalAlloc for NoHeap {
    unsafe fn alloc(&self, _layout: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}

#[cfg(not(test))]
#[global_allocator]
static NO_HEAP: NoHeap = NoHeap;
