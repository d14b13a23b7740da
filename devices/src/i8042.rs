//! The i8042 keyboard controller, only for its CPU reset line (vm-superio).
//!
//! Guests reboot by writing 0xfe to port 0x64; cgsvmm treats that as a
//! request to end the VM cleanly.
//!
//! Stateless for migration: vm-superio's `I8042Device` keeps nothing but the
//! reset line, every read returns 0 and every write other than the reset
//! command is dropped, so the target's freshly built device is already in
//! the source's state. There is no `I8042State`.

use std::sync::Mutex;

use vm_superio::{I8042Device, Trigger};

use crate::BusDevice;

/// Data port of the i8042; the command port is 4 above it.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports decoded: 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT_LEN: u64 = 5;

/// The i8042 on the bus.
pub struct I8042<T: Trigger> {
    dev: Mutex<I8042Device<T>>,
}

impl<T: Trigger> I8042<T> {
    /// An i8042 that fires `reset` when the guest pulses the reset line.
    pub fn new(reset: T) -> Self {
        Self {
            dev: Mutex::new(I8042Device::new(reset)),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T>
where
    T::E: std::fmt::Debug,
{
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut dev = self.dev.lock().expect("i8042 lock poisoned");
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = dev.read(offset as u8);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut dev = self.dev.lock().expect("i8042 lock poisoned");
        if let Some(&b) = data.first() {
            if let Err(e) = dev.write(offset as u8, b) {
                log::warn!("i8042 reset signal failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFdTrigger;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn reset_command_fires_the_reset_event() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(EventFdTrigger(evt.try_clone().unwrap()));
        dev.write(4, &[0x20]); // read command byte: not a reset
        assert!(evt.read().is_err());
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn nothing_the_guest_writes_is_kept() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(EventFdTrigger(evt));
        for (offset, value) in [(4, 0x60), (0, 0x47), (4, 0xd1), (0, 0xdf), (4, 0xaa)] {
            dev.write(offset, &[value]);
        }
        for offset in [0, 4] {
            let mut data = [0xffu8; 2];
            dev.read(offset, &mut data);
            assert_eq!(data, [0, 0]);
        }
    }
}
