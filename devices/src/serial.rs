//! The 16550 UART at COM1 (vm-superio), wired to stdio, a file or nowhere.

use std::io::Write;
use std::sync::Mutex;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::{BusDevice, EventFdTrigger};

/// Base port of COM1.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Number of ports the 16550 decodes.
pub const SERIAL_PORT_LEN: u64 = 8;
/// ISA interrupt line of COM1.
pub const SERIAL_IRQ: u32 = 4;

type Uart = Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// A 16550 UART on the bus.
pub struct SerialDevice {
    uart: Mutex<Uart>,
}

/// The UART's output: once a write fails (a closed pipe, a full disk),
/// that is reported once and the guest's further output is dropped, so a
/// broken sink neither floods the log nor stops the guest.
struct Sink {
    out: Box<dyn Write + Send>,
    failed: bool,
}

impl Sink {
    /// Reports the first failure; later output is dropped.
    fn check(&mut self, result: std::io::Result<()>) {
        if let Err(e) = result {
            log::warn!("Serial output failed ({e}); dropping the guest's further output");
            self.failed = true;
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.failed {
            let result = self.out.write_all(buf);
            self.check(result);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.failed {
            let result = self.out.flush();
            self.check(result);
        }
        Ok(())
    }
}

impl SerialDevice {
    /// A UART that raises `irq` and writes what the guest sends to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        let sink: Box<dyn Write + Send> = Box::new(Sink { out, failed: false });
        Self {
            uart: Mutex::new(Serial::new(irq, sink)),
        }
    }

    /// Queues bytes for the guest to read; returns how many fit the FIFO.
    pub fn enqueue_input(&self, input: &[u8]) -> usize {
        let mut uart = self.uart.lock().expect("serial lock poisoned");
        let room = uart.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match uart.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("Serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut uart = self.uart.lock().expect("serial lock poisoned");
        for b in data.iter_mut() {
            *b = uart.read(offset as u8);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut uart = self.uart.lock().expect("serial lock poisoned");
        for &b in data {
            if let Err(e) = uart.write(offset as u8, b) {
                log::warn!("Serial output failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_the_writer_and_input_raises_the_irq() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(
            EventFdTrigger(irq.try_clone().unwrap()),
            Box::new(out.clone()),
        );
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // Enable the received-data interrupt (IER bit 0), then feed input.
        dev.write(1, &[1]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut data = [0u8];
        dev.read(0, &mut data);
        assert_eq!(data[0], b'a');
    }

    /// A sink that fails every write and counts the attempts.
    #[derive(Clone, Default)]
    struct Broken(Arc<Mutex<usize>>);
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            *self.0.lock().unwrap() += 1;
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink that takes bytes but fails to flush them (a line-buffered
    /// pipe whose reader left).
    #[derive(Clone, Default)]
    struct FailsOnFlush(Arc<Mutex<usize>>);
    impl Write for FailsOnFlush {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            *self.0.lock().unwrap() += 1;
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_sink_that_fails_to_flush_is_flushed_once() {
        let out = FailsOnFlush::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(EventFdTrigger(irq), Box::new(out.clone()));
        for _ in 0..300 {
            dev.write(0, b"x");
        }
        assert_eq!(*out.0.lock().unwrap(), 1);
    }

    #[test]
    fn a_broken_sink_is_tried_once_and_the_guest_goes_on() {
        let out = Broken::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(EventFdTrigger(irq), Box::new(out.clone()));
        for _ in 0..300 {
            dev.write(0, b"x");
        }
        assert_eq!(*out.0.lock().unwrap(), 1, "writes after the first failure");
        // The UART still works for the guest.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter ready");
    }
}
