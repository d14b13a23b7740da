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
//! with no host thread's timing in it. Where either is missing, or the
//! guest's TSC is scaled against the host's (offset arithmetic would not
//! hold), the TSC read or written at another moment is moved by the
//! monotonic time between the two at the guest's TSC rate.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_clock_data, kvm_device_attr, KVMIO, KVM_CLOCK_HOST_TSC};
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

/// How long after the clock a source's TSC may be read for the offset
/// arithmetic to be believed (a scaled TSC lands far outside).
const PLAUSIBLE_AFTER: Duration = Duration::from_secs(10);

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
/// and, where KVM gives it, its TSC offset.
pub fn at_clock(read: u64, offset: Option<u64>, khz: u32, clock: &ClockMoment) -> u64 {
    if let (Some(h), Some(o)) = (clock.host_tsc, offset) {
        let exact = h.wrapping_add(o);
        // Unscaled, the TSC read after the clock is a little ahead of it.
        if read.wrapping_sub(exact) <= cycles(khz, PLAUSIBLE_AFTER.as_nanos()) {
            return exact;
        }
    }
    read.wrapping_sub(cycles(khz, clock.at.elapsed().as_nanos()))
}

/// How a target vCPU's saved TSC `saved` (the source clock's moment) goes
/// back: as a TSC offset where the arithmetic holds (`unscaled`: the vCPU
/// runs at the host's TSC rate; `has_offset`: KVM has the attribute), or
/// as the IA32_TSC value to write now.
pub fn to_restore(
    saved: u64,
    khz: u32,
    clock: &ClockMoment,
    unscaled: bool,
    has_offset: bool,
) -> TscRestore {
    let at_moment = saved.wrapping_add(cycles(khz, u128::from(clock.ran_ns)));
    match clock.host_tsc {
        Some(h) if unscaled && has_offset => TscRestore::Offset(at_moment.wrapping_sub(h)),
        _ => TscRestore::Msr(at_moment.wrapping_add(cycles(khz, clock.at.elapsed().as_nanos()))),
    }
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
        addr: value as *mut u64 as u64,
    }
}

/// The vCPU's TSC offset, where KVM has the attribute.
pub fn offset(fd: &VcpuFd) -> Option<u64> {
    let mut value = 0u64;
    let a = attr(&mut value);
    // SAFETY: KVM_GET_DEVICE_ATTR on a vCPU fd writes one u64 of the TSC
    // offset to `addr`, which points at `value`, alive and writable for the
    // call; an unknown group or attribute is an error and writes nothing.
    let ret = unsafe { ioctl_with_ref(fd, KVM_GET_DEVICE_ATTR(), &a) };
    (ret == 0).then_some(value)
}

/// Sets the vCPU's TSC offset.
pub fn set_offset(fd: &VcpuFd, mut value: u64) -> Result<(), kvm_ioctls::Error> {
    let a = attr(&mut value);
    // SAFETY: KVM_SET_DEVICE_ATTR on a vCPU fd reads one u64 from `addr`,
    // which points at `value`, alive for the call.
    let ret = unsafe { ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &a) };
    if ret == 0 {
        Ok(())
    } else {
        Err(kvm_ioctls::Error::last())
    }
}

#[cfg(test)]
mod tests {
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
        // then, whenever it was read since.
        let m = moment(Some(1000), 0);
        assert_eq!(at_clock(1_700, Some(500), 2_000_000, &m), 1_500);
        // A scaled TSC (the read far from host + offset) is not believed:
        // the read is taken back by the (tiny) time since, instead.
        let far = 1_500 + 11 * 2_000_000_000;
        let got = at_clock(far, Some(500), 2_000_000, &m);
        assert!(got <= far && far - got < 2_000_000, "{got}");
        // Without the host TSC or the offset, likewise.
        let got = at_clock(5_000_000, None, 2_000_000, &m);
        assert!((3_000_001..=5_000_000).contains(&got), "{got}");
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
            to_restore(50_000, 2_000_000, &m, true, true),
            TscRestore::Offset(50_000 + 2_000_000 - 10_000)
        );
        // Scaled, or without the attribute: the MSR, moved on by at least
        // the clock's run.
        for (unscaled, has) in [(false, true), (true, false)] {
            match to_restore(50_000, 2_000_000, &m, unscaled, has) {
                TscRestore::Msr(v) => assert!((2_050_000..4_050_000).contains(&v), "{v}"),
                other => panic!("{other:?}"),
            }
        }
        // The counter wraps as the hardware's does.
        assert_eq!(
            to_restore(5, 1_000_000, &moment(Some(10), 0), true, true),
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
