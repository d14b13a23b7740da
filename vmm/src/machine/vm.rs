//! KVM VMs: the main VM the guest runs in and the mirror VM beside it.
//!
//! Both register the same memslots over the same host memory (docs/LAB.md: plain
//! KVM, same `userspace_addr`). The main VM gets the in-kernel irqchip and
//! PIT; the mirror VM gets neither, since its vCPUs take no interrupts. With
//! SEV the mirror would also share the encryption context
//! (KVM_CAP_VM_COPY_ENC_CONTEXT_FROM); the `none` backend needs nothing more.

use cgsvmm_migration::state::VmRecord;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_mp_state, kvm_pit_config, CpuId, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::boot::VcpuBoot;
use crate::memory::{MemSlot, MemoryError};
use crate::x86::tsc::ClockMoment;
use crate::x86::vcpu_setup::{self, VcpuSetupError};

/// KVM's identity-map page and real-mode TSS (3 pages after it), as QEMU
/// places them: below the firmware window, above the LAPIC page.
pub const IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;
/// See [`IDENTITY_MAP_ADDR`].
pub const TSS_ADDR: usize = 0xfeff_d000;

/// Errors of creating VMs and vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("Cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Memory slot registration failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// vCPU setup failed.
    #[error(transparent)]
    VcpuSetup(#[from] VcpuSetupError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(VmError::OpenKvm)
}

/// KVM's supported CPUID list.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// Creates the main VM: irqchip, PIT, and the memslots.
///
/// # Safety
///
/// The mappings `slots` were made from must outlive the VM (see
/// [`MemSlot::register`]).
pub unsafe fn create_main_vm(kvm: &Kvm, slots: &[MemSlot]) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    for slot in slots {
        // SAFETY: the caller keeps the slots' mappings alive as long as
        // the VM.
        unsafe { slot.register(&vm, false) }?;
    }
    Ok(vm)
}

/// Creates the mirror VM over the same memslots.
///
/// # Safety
///
/// As for [`create_main_vm`].
pub unsafe fn create_mirror_vm(kvm: &Kvm, slots: &[MemSlot]) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM (mirror)"))?;
    vm.set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    for slot in slots {
        // SAFETY: the caller keeps the slots' mappings alive as long as
        // the VM.
        unsafe { slot.register(&vm, false) }?;
    }
    Ok(vm)
}

/// What every vCPU of a VM is set up with.
pub struct VcpuSetup<'a> {
    /// KVM's supported CPUID.
    pub cpuid: &'a CpuId,
    /// vCPUs in the VM.
    pub count: usize,
    /// Whether the VM has the in-kernel irqchip (then LINT0/1 are wired).
    pub irqchip: bool,
}

/// Creates vCPU `index` and gives it CPUID, MSRs, FPU, XCR0 and `boot`.
pub fn create_vcpu(
    vm: &VmFd,
    index: usize,
    setup: &VcpuSetup,
    boot: &VcpuBoot,
) -> Result<VcpuFd, VmError> {
    let fd = vm
        .create_vcpu(index as u64)
        .map_err(kvm_err("KVM_CREATE_VCPU"))?;
    vcpu_setup::set_cpuid(&fd, setup.cpuid, index as u32, setup.count as u32)?;
    vcpu_setup::set_boot_msrs(&fd)?;
    vcpu_setup::set_fpu(&fd)?;
    vcpu_setup::set_xcr0(&fd, setup.cpuid)?;
    if setup.irqchip {
        vcpu_setup::set_lint(&fd)?;
    }
    if let VcpuBoot::State { regs, sregs } = boot {
        let mut s = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        sregs(&mut s);
        fd.set_sregs(&s).map_err(kvm_err("KVM_SET_SREGS"))?;
        fd.set_regs(regs).map_err(kvm_err("KVM_SET_REGS"))?;
        // With the in-kernel irqchip only vCPU 0 starts runnable; the others
        // would wait for INIT-SIPI, which a directly-entered guest never sends.
        let runnable = kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        };
        fd.set_mp_state(runnable)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    }
    Ok(fd)
}

/// The main VM's KVM clock, and its moment (`x86::tsc`).
pub fn read_clock(vm: &VmFd) -> Result<(kvm_clock_data, ClockMoment), VmError> {
    let clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    Ok((clock, ClockMoment::of(&clock, 0)))
}

/// The main VM's in-kernel state (main vCPUs paused): both PICs, the
/// IOAPIC, the PIT, and the KVM `clock` as [`read_clock`] read it (when
/// the guest's time stops for the migration; the vCPUs' TSCs are saved as
/// of the same moment).
pub fn save_state(vm: &VmFd, clock: kvm_clock_data) -> Result<VmRecord, VmError> {
    let chip = |id| {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map(|()| c)
    };
    Ok(VmRecord {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)
            .map_err(kvm_err("KVM_GET_IRQCHIP (PIC master)"))?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE).map_err(kvm_err("KVM_GET_IRQCHIP (PIC slave)"))?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC).map_err(kvm_err("KVM_GET_IRQCHIP (IOAPIC)"))?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        clock,
        running: false,
    })
}

/// Gives the main VM a saved in-kernel state, each chip checked to be the
/// one it claims to be; returns the clock's moment just after it was set,
/// which the vCPUs' saved TSCs are restored against (`x86::tsc`).
pub fn restore_state(vm: &VmFd, r: &VmRecord) -> Result<ClockMoment, VmError> {
    for (want, chip, what) in [
        (
            KVM_IRQCHIP_PIC_MASTER,
            &r.pic_master,
            "KVM_SET_IRQCHIP (PIC master)",
        ),
        (
            KVM_IRQCHIP_PIC_SLAVE,
            &r.pic_slave,
            "KVM_SET_IRQCHIP (PIC slave)",
        ),
        (KVM_IRQCHIP_IOAPIC, &r.ioapic, "KVM_SET_IRQCHIP (IOAPIC)"),
    ] {
        if chip.chip_id != want {
            return Err(VmError::Kvm {
                what,
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        vm.set_irqchip(chip).map_err(kvm_err(what))?;
    }
    vm.set_pit2(&r.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    // Only the clock value goes back: the flags and host TSC/realtime
    // readings describe the source host's moment of saving.
    let clock = kvm_clock_data {
        clock: r.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    let now = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    Ok(ClockMoment::of(
        &now,
        now.clock.saturating_sub(r.clock.clock),
    ))
}

pub use cgsvmm_fw_abi::{KVM_FEATURE_HC_MAP_GPA_RANGE, KVM_HC_MAP_GPA_RANGE};
/// Its `attrs` bit for "private" (encrypted).
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// The KVM paravirtual feature leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// Sets or clears KVM_FEATURE_HC_MAP_GPA_RANGE in the KVM feature leaf (if
/// the table has that leaf: without it the guest sees no KVM features).
fn advertise_map_gpa(cpuid: &mut CpuId, on: bool) {
    for e in cpuid.as_mut_slice() {
        if e.function == KVM_CPUID_FEATURES {
            if on {
                e.eax |= 1 << KVM_FEATURE_HC_MAP_GPA_RANGE;
            } else {
                e.eax &= !(1 << KVM_FEATURE_HC_MAP_GPA_RANGE);
            }
        }
    }
}

/// Asks KVM to hand KVM_HC_MAP_GPA_RANGE to the VMM (KVM_CAP_EXIT_HYPERCALL)
/// and makes `cpuid` advertise the hypercall if and only if it will: a guest
/// must never call a hypercall nobody answers, and KVM's supported CPUID
/// never has the bit (the VMM that enables the exit sets it; found on the
/// real-KVM lab, where a ring-0 guest saw no feature). Whether it is on.
pub fn enable_map_gpa_exits(vm: &VmFd, cpuid: &mut CpuId) -> bool {
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_EXIT_HYPERCALL,
        ..Default::default()
    };
    cap.args[0] = 1 << KVM_HC_MAP_GPA_RANGE;
    let on = vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_EXIT_HYPERCALL)) > 0
        && vm.enable_cap(&cap).is_ok();
    advertise_map_gpa(cpuid, on);
    log::debug!(
        "KVM_HC_MAP_GPA_RANGE exits: {}",
        if on { "on" } else { "not available" }
    );
    on
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_gpa_feature_bit_follows_the_exit() {
        let leaf = |eax| kvm_bindings::kvm_cpuid_entry2 {
            function: KVM_CPUID_FEATURES,
            eax,
            ..Default::default()
        };
        let bit = 1 << KVM_FEATURE_HC_MAP_GPA_RANGE;
        let mut cpuid = CpuId::from_entries(&[leaf(0x1)]).unwrap();
        advertise_map_gpa(&mut cpuid, true);
        assert_eq!(
            cpuid.as_slice()[0].eax,
            0x1 | bit,
            "set when the exit is on"
        );
        advertise_map_gpa(&mut cpuid, false);
        assert_eq!(cpuid.as_slice()[0].eax, 0x1, "cleared when it is not");
    }
}
