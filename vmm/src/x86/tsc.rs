//! The guest's TSC kept one moment's with its KVM clock across a migration.
//!
//! A Linux guest checks its TSC against kvm-clock (the clocksource
//! watchdog) and marks the TSC unstable when the two disagree by more than
//! a fraction of a millisecond. Both keep running while the vCPUs are
//! paused, and KVM saves them by separate calls (KVM_GET_CLOCK once per VM,
//! the IA32_TSC MSR per vCPU, each at its own moment), so the saved pair is
//! made one moment's here: the clock's.
//!
//! ```text
//! source                                  target
//!  KVM_GET_CLOCK  -> C, host TSC h          KVM_SET_CLOCK C
//!  each vCPU: TSC offset o                  KVM_GET_CLOCK -> C + ran, host TSC h'
//!    TSC at the clock = h + o               each vCPU: TSC offset =
//!  record: C and that TSC T                   T + cycles(ran) - h'
//! ```
//!
//! With KVM's TSC offset attribute (KVM_VCPU_TSC_OFFSET, Linux 5.16) and
//! the host TSC the clock calls report (KVM_CLOCK_HOST_TSC) this is exact,
//! with no host thread's timing in it, however long the pause. It needs the
//! guest's TSC to be the host's plus the offset (not scaled to another
//! rate): [`unscaled_offset`] checks exactly that, by reading the guest's
//! TSC between two reads of the host's. Where any of it is missing, the
//! TSC read or written at another moment is moved by the monotonic time
//! between the two at the guest's TSC rate.

use std::time::Instant;

use kvm_bindings::{
    kvm_clock_data, kvm_device_attr, kvm_msr_entry, Msrs, KVMIO, KVM_CLOCK_HOST_TSC,
};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use super::msr::index::IA32_TSC;

ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);

/// The vCPU attribute group of the TSC (KVM_VCPU_TSC_CTRL).
const KVM_VCPU_TSC_CTRL: u32 = 0;
/// Its attribute: the offset of the guest's TSC from the host's.
const KVM_VCPU_TSC_OFFSET: u64 = 0;

/// Cycles the guest TSC may lie outside the two host reads around it and
/// still count as unscaled (RDTSC is not ordered with the ioctl; a scaled
/// TSC is off by its ratio times the host's uptime, far beyond this).
const BRACKET_SLACK: u64 = 4096;

/// When the VM's KVM clock was read (source) or set (target), as the
/// vCPUs' TSCs need it.
#[derive(Debug, Clone, Copy)]
pub struct ClockMoment {
    /// Monotonic time just after the clock call.
    pub at: Instant,
    /// The host TSC KVM reported with the clock, where it does.
    pub host_tsc: Option<u64>,
    /// On the target: how far the clock had run past the saved value when
    /// it was read back (ns); 0 on the source.
    pub ran_ns: u64,
}

impl ClockMoment {
    /// The moment of a KVM_GET_CLOCK that returned `clock`, `ran_ns` past
    /// the value the guest's TSC belongs to.
    pub fn of(clock: &kvm_clock_data, ran_ns: u64) -> Self {
        ClockMoment {
            at: Instant::now(),
            host_tsc: (clock.flags & KVM_CLOCK_HOST_TSC != 0).then_some(clock.host_tsc),
            ran_ns,
        }
    }
}

/// Cycles in `ns` nanoseconds at `khz` kHz.
fn cycles(khz: u32, ns: u128) -> u64 {
    u64::try_from(u128::from(khz) * ns / 1_000_000).unwrap_or(u64::MAX)
}

/// The guest TSC at the clock's moment, from a vCPU's TSC `read` just now
/// and its [`unscaled_offset`], where it has one.
pub fn at_clock(read: u64, offset: Option<u64>, khz: u32, clock: &ClockMoment) -> u64 {
    match (clock.host_tsc, offset) {
        (Some(h), Some(o)) => h.wrapping_add(o),
        _ => read.wrapping_sub(cycles(khz, clock.at.elapsed().as_nanos())),
    }
}

/// How a target vCPU's saved TSC `saved` (the source clock's moment) goes
/// back: as a TSC offset where the arithmetic holds (`unscaled`: the
/// vCPU has an [`unscaled_offset`]), or as the IA32_TSC value to write now.
pub fn to_restore(saved: u64, khz: u32, clock: &ClockMoment, unscaled: bool) -> TscRestore {
    let at_moment = saved.wrapping_add(cycles(khz, u128::from(clock.ran_ns)));
    match clock.host_tsc {
        Some(h) if unscaled => TscRestore::Offset(at_moment.wrapping_sub(h)),
        _ => TscRestore::Msr(at_moment.wrapping_add(cycles(khz, clock.at.elapsed().as_nanos()))),
    }
}

/// Whether `guest`, read between host TSC reads `before` and `after`, is
/// the host's TSC plus `offset` (with [`BRACKET_SLACK`]).
fn bracketed(before: u64, guest: u64, after: u64, offset: u64) -> bool {
    let host = guest.wrapping_sub(offset);
    let early = before.wrapping_sub(BRACKET_SLACK);
    // In wrapping terms: early <= host <= after + slack.
    host.wrapping_sub(early) <= after.wrapping_add(BRACKET_SLACK).wrapping_sub(early)
}

/// The host's TSC, as KVM reads it for the clock and the offset.
fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86-64 (CR4.TSD is clear for
    // user space on Linux hosts, which KVM needs anyway).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The vCPU's TSC offset, when KVM has the attribute and the guest's TSC
/// is the host's plus it: the guest TSC, read between two host reads, lies
/// between them once the offset is taken off. A scaled TSC (a VM that came
/// from a host of another rate) gives `None`.
pub fn unscaled_offset(fd: &VcpuFd) -> Option<u64> {
    let offset = offset(fd)?;
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    let before = host_tsc();
    let read = fd.get_msrs(&mut msrs).ok()?;
    let after = host_tsc();
    let guest = msrs.as_slice().first()?.data;
    (read == 1 && bracketed(before, guest, after, offset)).then_some(offset)
}

/// What [`to_restore`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscRestore {
    /// Set this TSC offset (and leave IA32_TSC out of the MSR writes).
    Offset(u64),
    /// Write IA32_TSC with this value.
    Msr(u64),
}

/// The saved IA32_TSC of an MSR list.
pub fn saved(msrs: &[(u32, u64)]) -> Option<u64> {
    msrs.iter().find(|m| m.0 == IA32_TSC).map(|m| m.1)
}

/// Sets the IA32_TSC of an MSR list to `value`.
pub fn set_saved(msrs: &mut [(u32, u64)], value: u64) {
    for m in msrs.iter_mut().filter(|m| m.0 == IA32_TSC) {
        m.1 = value;
    }
}

fn attr(value: &mut u64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: KVM_VCPU_TSC_OFFSET,
        addr: core::ptr::addr_of_mut!(*value) as u64,
    }
}

/// The vCPU's TSC offset, where KVM has the attribute.
pub fn offset(fd: &VcpuFd) -> Option<u64> {
    let mut value = 0u64;
    let a = attr(&mut value);
    // SAFETY: KVM_GET_DEVICE_ATTR on a vCPU fd writes one u64 of the TSC
    // offset to `addr`, which points at `value`, alive, writable and not
    // otherwise touched during the call; an unknown group or attribute (a
    // kernel before 5.16) is an error and writes nothing.
    let ret = unsafe { ioctl_with_ref(fd, KVM_GET_DEVICE_ATTR(), &a) };
    (ret == 0).then_some(value)
}

/// Sets the vCPU's TSC offset.
pub fn set_offset(fd: &VcpuFd, mut value: u64) -> Result<(), kvm_ioctls::Error> {
    let a = attr(&mut value);
    // SAFETY: KVM_SET_DEVICE_ATTR on a vCPU fd reads one u64 from `addr`,
    // which points at `value`, alive and not otherwise touched during the
    // call.
    let ret = unsafe { ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &a) };
    if ret == 0 {
        Ok(())
    } else {
        Err(kvm_ioctls::Error::last())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn moment(host_tsc: Option<u64>, ran_ns: u64) -> ClockMoment {
        ClockMoment {
            at: Instant::now(),
            host_tsc,
            ran_ns,
        }
    }

    #[test]
    fn the_offset_gives_the_tsc_of_the_clocks_own_moment() {
        // Host TSC 1000 at the clock, offset 500: the guest TSC was 1500
        // then, however long ago, whatever was read since.
        let m = moment(Some(1000), 0);
        assert_eq!(at_clock(1_700, Some(500), 2_000_000, &m), 1_500);
        assert_eq!(at_clock(u64::MAX, Some(500), 2_000_000, &m), 1_500);
        // Without the host TSC or an unscaled offset the read is taken
        // back by the (tiny) time since.
        let got = at_clock(5_000_000, None, 2_000_000, &m);
        assert!((3_000_001..=5_000_000).contains(&got), "{got}");
        let got = at_clock(5_000_000, Some(500), 2_000_000, &moment(None, 0));
        assert!((3_000_001..=5_000_000).contains(&got), "{got}");
    }

    #[test]
    fn a_guest_tsc_between_the_host_reads_is_unscaled_and_a_scaled_one_is_not() {
        let offset = 7_000_000;
        // Host read 1,000,000 before and 1,000,500 after the guest's.
        assert!(bracketed(1_000_000, 1_000_200 + offset, 1_000_500, offset));
        // RDTSC's reordering is allowed for, a little either side.
        assert!(bracketed(1_000_000, 999_000 + offset, 1_000_500, offset));
        assert!(bracketed(1_000_000, 1_002_000 + offset, 1_000_500, offset));
        // Scaled by 1.0005 after 10^12 host cycles: 5*10^8 cycles off.
        let host = 1_000_000_000_000u64;
        assert!(!bracketed(
            host,
            host + host / 2000 + offset,
            host + 500,
            offset
        ));
        assert!(!bracketed(
            host,
            host - host / 2000 + offset,
            host + 500,
            offset
        ));
        // Across the counter's wrap.
        assert!(bracketed(
            u64::MAX - 10,
            5u64.wrapping_add(offset),
            20,
            offset
        ));
        assert!(!bracketed(
            u64::MAX - 10,
            1_000_000u64.wrapping_add(offset),
            20,
            offset
        ));
    }

    #[test]
    fn an_old_moment_takes_the_read_back_by_its_age_at_the_tsc_rate() {
        let m = ClockMoment {
            at: Instant::now() - Duration::from_millis(10),
            host_tsc: None,
            ran_ns: 0,
        };
        // 1 GHz: at least 10 ms is at least 10,000,000 cycles.
        let got = at_clock(100_000_000, None, 1_000_000, &m);
        assert!((80_000_001..=90_000_000).contains(&got), "{got}");
    }

    #[test]
    fn the_target_sets_an_offset_that_puts_the_saved_tsc_where_the_clock_ran() {
        // The clock ran 1 ms past the saved value when read back at host
        // TSC 10,000; at 2 GHz the TSC is 2,000,000 cycles past the saved.
        let m = moment(Some(10_000), 1_000_000);
        assert_eq!(
            to_restore(50_000, 2_000_000, &m, true),
            TscRestore::Offset(50_000 + 2_000_000 - 10_000)
        );
        // Scaled (or without the attribute), or without the host TSC: the
        // MSR, moved on by at least the clock's run.
        for (unscaled, m) in [(false, m), (true, moment(None, 1_000_000))] {
            match to_restore(50_000, 2_000_000, &m, unscaled) {
                TscRestore::Msr(v) => assert!((2_050_000..4_050_000).contains(&v), "{v}"),
                other => panic!("{other:?}"),
            }
        }
        // The counter wraps as the hardware's does.
        assert_eq!(
            to_restore(5, 1_000_000, &moment(Some(10), 0), true),
            TscRestore::Offset(u64::MAX - 4)
        );
    }

    #[test]
    fn the_saved_tsc_is_found_and_replaced_and_nothing_else_is() {
        let mut msrs = vec![(0xc000_0082, 7), (IA32_TSC, 10)];
        assert_eq!(saved(&msrs), Some(10));
        set_saved(&mut msrs, 99);
        assert_eq!(msrs, vec![(0xc000_0082, 7), (IA32_TSC, 99)]);
        assert_eq!(saved(&[(0x174, 1)]), None);
    }

    #[test]
    fn the_attribute_is_the_kernels_layout() {
        let mut v = 0u64;
        let a = attr(&mut v);
        assert_eq!(std::mem::size_of::<kvm_device_attr>(), 24);
        assert_eq!((a.group, a.attr), (0, 0));
        assert_eq!(a.addr, &mut v as *mut u64 as u64);
    }
}
