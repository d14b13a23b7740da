//! The MSR values a vCPU starts with (what a BIOS would leave behind).

use kvm_bindings::{kvm_msr_entry, Msrs};

/// MSR numbers (Intel SDM vol. 4).
pub mod index {
    /// SYSENTER CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// SYSENTER ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// SYSCALL target selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// 64-bit SYSCALL target.
    pub const LSTAR: u32 = 0xc000_0082;
    /// Compatibility-mode SYSCALL target.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL RFLAGS mask.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// SWAPGS target.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// Time-stamp counter.
    pub const IA32_TSC: u32 = 0x10;
    /// Miscellaneous enables.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// Default memory type of the MTRRs.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
}

/// IA32_MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The boot MSR list.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    use index::*;
    [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// The boot MSR list as a KVM FAM struct.
pub fn boot_msrs() -> Msrs {
    Msrs::from_entries(&boot_msr_entries()).expect("a short fixed list fits a FAM struct")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_list_enables_fast_strings_and_write_back_mtrrs() {
        let msrs = boot_msr_entries();
        let get = |i| msrs.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(index::IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(index::MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(index::LSTAR), Some(0));
        assert_eq!(boot_msrs().as_slice().len(), msrs.len());
    }
}
