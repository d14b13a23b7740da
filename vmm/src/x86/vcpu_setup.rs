//! The KVM calls that give a fresh vCPU its boot-time state: CPUID, MSRs,
//! FPU, XCR0 and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_xcrs, CpuId};
use kvm_ioctls::VcpuFd;

use super::{cpuid, msr};

/// Errors of configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSetupError {
    /// The CPUID table could not be built.
    #[error("Cannot build CPUID table: {0:?}")]
    CpuidTable(vmm_sys_util::fam::Error),
    /// A KVM call failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some boot MSRs.
    #[error("KVM set {set} of {wanted} boot MSRs")]
    PartialMsrs {
        /// How many KVM took.
        set: usize,
        /// How many we asked for.
        wanted: usize,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuSetupError {
    move |source| VcpuSetupError::Kvm { what, source }
}

/// Sets the vCPU's CPUID table from KVM's supported list.
pub fn set_cpuid(
    vcpu: &VcpuFd,
    supported: &CpuId,
    index: u32,
    count: u32,
) -> Result<(), VcpuSetupError> {
    let table = cpuid::for_vcpu(supported, index, count).map_err(VcpuSetupError::CpuidTable)?;
    vcpu.set_cpuid2(&table).map_err(kvm("KVM_SET_CPUID2"))
}

/// Sets the boot MSRs; every one must be accepted.
pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), VcpuSetupError> {
    let msrs = msr::boot_msrs();
    let wanted = msrs.as_slice().len();
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != wanted {
        return Err(VcpuSetupError::PartialMsrs { set, wanted });
    }
    Ok(())
}

/// x87 control word after FNINIT.
const FCW_DEFAULT: u16 = 0x37f;
/// MXCSR at reset: all SIMD exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Puts the FPU and SSE units in their reset state.
pub fn set_fpu(vcpu: &VcpuFd) -> Result<(), VcpuSetupError> {
    let fpu = kvm_fpu {
        fcw: FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

/// XCR0 features the guests may use: x87, SSE, AVX, and the AVX-512 state.
const XCR0_WANTED: u64 = 0b1110_0111;

/// Enables in XCR0 the wanted state components KVM supports (CPUID 0xd.0).
pub fn set_xcr0(vcpu: &VcpuFd, supported: &CpuId) -> Result<u64, VcpuSetupError> {
    let supported_xcr0 = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0b11, |e| u64::from(e.eax) | u64::from(e.edx) << 32);
    let mut xcr0 = supported_xcr0 & XCR0_WANTED | 1;
    // AVX-512 state is all-or-nothing.
    if xcr0 & 0xe0 != 0xe0 {
        xcr0 &= !0xe0;
    }
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = xcr0;
    vcpu.set_xcrs(&xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    Ok(xcr0)
}

/// Local APIC register offsets and delivery modes (SDM vol. 3A §11.5.1).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a PC BIOS does.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), VcpuSetupError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
            .iter()
            .map(|&b| b as u8)
            .collect();
        let reg = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        let new = set_delivery_mode(reg, mode).to_le_bytes();
        for (dst, src) in lapic.regs[offset..offset + 4].iter_mut().zip(new) {
            *dst = src as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_only_touches_bits_8_to_10() {
        assert_eq!(
            set_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(set_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
    }
}
