//! Legacy PC devices of cgsvmm and the port I/O bus they sit on.
//!
//! This crate owns device emulation only: the [`Bus`] that routes a port
//! access to a device, and small adapters (most over vm-superio) for the
//! 16550 serial port, the i8042 reset line, the CMOS/RTC, the debug console
//! port, QEMU's fw_cfg interface and the lab control port. It knows nothing of
//! KVM, vCPUs or the migration stream: the VMM wires interrupts (as `EventFd`s)
//! and requests (as callbacks) in when it adds a device.
//!
//! Each device with guest-visible state gives it as a plain serde record
//! (`state(&self) -> XxxState`) and takes one back (`restore(&self, &XxxState)`)
//! into a device the target built from its own configuration. A record comes
//! from an untrusted stream, so `restore` checks every field against what the
//! device could have reached and changes nothing when it refuses one
//! ([`DeviceStateError`]). Devices with no such state (the i8042, the debug
//! port, the lab port) say so in their docs and have no record.

pub mod bus;
pub mod cmos;
pub mod debug_port;
pub mod fw_cfg;
pub mod i8042;
pub mod lab;
pub mod serial;

pub use bus::{Bus, BusDevice, BusError};

use vmm_sys_util::eventfd::EventFd;

/// Errors of restoring a device from a saved state record.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// A register holds a value the device can never be in.
    #[error("Invalid {device} state: {field} is {value:#x}, {expected}")]
    InvalidValue {
        /// The device, as in its module name.
        device: &'static str,
        /// The refused field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What the device allows, as a phrase ("at most 0x7f").
        expected: &'static str,
    },
    /// A buffer is longer than the device can hold.
    #[error("Invalid {device} state: {field} holds {len} bytes, more than its {max}")]
    TooLong {
        /// The device.
        device: &'static str,
        /// The refused field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The device's capacity.
        max: usize,
    },
    /// A buffer whose size is fixed has another.
    #[error("Invalid {device} state: {field} holds {len} bytes, not {expected}")]
    WrongLength {
        /// The device.
        device: &'static str,
        /// The refused field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The only length the device has.
        expected: usize,
    },
    /// The state was taken from a device configured differently from this
    /// one (for fw_cfg: the selected item differs).
    #[error("{device} state does not match this VM: {detail}")]
    Mismatch {
        /// The device.
        device: &'static str,
        /// What differs.
        detail: String,
    },
    /// Re-raising an interrupt that was pending in the saved state failed.
    #[error("Cannot raise the {device} interrupt pending in the restored state")]
    Interrupt {
        /// The device.
        device: &'static str,
        /// The interrupt line's error.
        #[source]
        source: std::io::Error,
    },
}

/// An `EventFd` as the interrupt or reset line of a vm-superio device.
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A closure as the trigger of a vm-superio device (e.g. the i8042 reset
/// line asking the VMM to stop).
pub struct CallbackTrigger(pub Box<dyn Fn() + Send + Sync>);

impl vm_superio::Trigger for CallbackTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}
