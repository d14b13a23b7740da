//! x86 building blocks the boot paths share: segment descriptors, identity
//! page tables, CPUID, boot MSRs and the local APIC's LINT pins. Pure
//! functions over data where possible; the KVM calls sit in `vcpu_setup`.

pub mod cpuid;
pub mod gdt;
pub mod msr;
pub mod paging;
pub mod tsc;
pub mod vcpu_setup;

/// CR0 bits.
pub mod cr0 {
    /// Protected mode.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// Extension type (always 1 on modern CPUs).
    pub const ET: u64 = 1 << 4;
    /// Native FPU error reporting.
    pub const NE: u64 = 1 << 5;
    /// Write protect also for supervisor writes.
    pub const WP: u64 = 1 << 16;
    /// Paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    /// Physical address extension.
    pub const PAE: u64 = 1 << 5;
    /// FXSAVE/FXRSTOR and SSE.
    pub const OSFXSR: u64 = 1 << 9;
    /// Unmasked SIMD exceptions.
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// XSAVE and XGETBV/XSETBV.
    pub const OSXSAVE: u64 = 1 << 18;
}

/// EFER bits.
pub mod efer {
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
}
