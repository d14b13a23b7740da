//! Legacy PC devices of cgsvmm and the port I/O bus they sit on.
//!
//! This crate owns device emulation only: the [`Bus`] that routes a port
//! access to a device, and small adapters (most over vm-superio) for the
//! 16550 serial port, the i8042 reset line, the CMOS/RTC, the debug console
//! port, QEMU's fw_cfg interface and the lab control port. It knows nothing of
//! KVM, vCPUs or migration: the VMM wires interrupts (as `EventFd`s) and
//! requests (as callbacks) in when it adds a device.

pub mod bus;
pub mod cmos;
pub mod debug_port;
pub mod fw_cfg;
pub mod i8042;
pub mod lab;
pub mod serial;

pub use bus::{Bus, BusDevice, BusError};

use vmm_sys_util::eventfd::EventFd;

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
