//! The 16550 UART at COM1 (vm-superio), wired to stdio, a file or nowhere.
//!
//! Its migratable state is vm-superio's [`vm_superio::SerialState`] (the
//! registers and the receive FIFO) as a serde record, [`SerialState`]. The
//! output sink's "already failed" flag is the host's business and stays
//! behind: the target writes to its own sink.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::{BusDevice, DeviceStateError, EventFdTrigger};

/// Base port of COM1.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Number of ports the 16550 decodes.
pub const SERIAL_PORT_LEN: u64 = 8;
/// ISA interrupt line of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// Bytes the receive FIFO holds: vm-superio's `FIFO_SIZE` (a real 16550A
/// holds 16; vm-superio keeps 64 and does not export the number).
pub const SERIAL_FIFO_LEN: usize = 64;

/// Register bits, as vm-superio 0.8 `serial.rs` sets them; a restored state
/// may hold only values the model itself reaches.
const IER_VALID_BITS: u8 = 0x0f;
const IIR_NONE: u8 = 0x01;
const IIR_THR_EMPTY: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const LSR_DATA_READY: u8 = 0x01;
/// THR empty and transmitter idle: always set in this model.
const LSR_ALWAYS: u8 = 0x60;
/// CTS, DSR, RI and DCD; the delta bits (0..3) are never set.
const MSR_VALID_BITS: u8 = 0xf0;

type Uart = Serial<SharedIrq, NoEvents, SharedSink>;

/// A 16550 UART on the bus.
pub struct SerialDevice {
    uart: Mutex<Uart>,
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`, which
/// has no serde support, field for field).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register (pending interrupts).
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet, oldest first.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::SerialState> for SerialState {
    fn from(s: vm_superio::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialState {
    /// Refuses values the UART model never holds. The divisor, LCR, MCR and
    /// scratch registers take any byte the guest writes.
    fn check(&self) -> Result<(), DeviceStateError> {
        let invalid = |field, value: u8, expected| DeviceStateError::InvalidValue {
            device: "serial",
            field,
            value: u64::from(value),
            expected,
        };
        if self.in_buffer.len() > SERIAL_FIFO_LEN {
            return Err(DeviceStateError::TooLong {
                device: "serial",
                field: "in_buffer",
                len: self.in_buffer.len(),
                max: SERIAL_FIFO_LEN,
            });
        }
        if self.interrupt_enable & !IER_VALID_BITS != 0 {
            return Err(invalid(
                "interrupt_enable",
                self.interrupt_enable,
                "only bits 0-3 exist on a 16550",
            ));
        }
        // Either "none pending" alone, or some of THR-empty and RDA.
        let iir = self.interrupt_identification;
        let pending = IIR_THR_EMPTY | IIR_RDA;
        if iir != IIR_NONE && (iir == 0 || iir & !pending != 0) {
            return Err(invalid(
                "interrupt_identification",
                iir,
                "expected 0x1 or a mix of 0x2 and 0x4",
            ));
        }
        let data_ready = if self.in_buffer.is_empty() {
            0
        } else {
            LSR_DATA_READY
        };
        if self.line_status != LSR_ALWAYS | data_ready {
            return Err(invalid(
                "line_status",
                self.line_status,
                "expected 0x60, with data-ready (0x1) set exactly when in_buffer is not empty",
            ));
        }
        if self.modem_status & !MSR_VALID_BITS != 0 {
            return Err(invalid(
                "modem_status",
                self.modem_status,
                "the delta bits 0-3 are never set",
            ));
        }
        Ok(())
    }
}

/// The interrupt line, shared so that a restore can build a new UART on the
/// line the old one used.
#[derive(Clone)]
struct SharedIrq(Arc<EventFdTrigger>);

impl Trigger for SharedIrq {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// The output sink, shared for the same reason as [`SharedIrq`]. Only the
/// UART, under its own lock, writes to it, so this lock is never contended.
#[derive(Clone)]
struct SharedSink(Arc<Mutex<Sink>>);

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A panic mid-write leaves at worst a half-written line: go on.
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }
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
        let sink = SharedSink(Arc::new(Mutex::new(Sink { out, failed: false })));
        Self {
            uart: Mutex::new(Serial::new(SharedIrq(Arc::new(irq)), sink)),
        }
    }

    /// The registers and unread input, for migration.
    pub fn state(&self) -> SerialState {
        self.uart
            .lock()
            .expect("serial lock poisoned")
            .state()
            .into()
    }

    /// Takes on `state` (from [`SerialDevice::state`] on the source), keeping
    /// this device's interrupt line and output. An interrupt pending and
    /// enabled in `state` is raised again, as vm-superio's `from_state` does,
    /// so the guest does not wait for one the source had already sent. On
    /// error the device is unchanged.
    pub fn restore(&self, state: &SerialState) -> Result<(), DeviceStateError> {
        state.check()?;
        let mut uart = self.uart.lock().expect("serial lock poisoned");
        let restored = Serial::from_state(
            &state.into(),
            uart.interrupt_evt().clone(),
            NoEvents,
            uart.writer().clone(),
        )
        .map_err(|e| match e {
            vm_superio::serial::Error::FullFifo => DeviceStateError::TooLong {
                device: "serial",
                field: "in_buffer",
                len: state.in_buffer.len(),
                max: SERIAL_FIFO_LEN,
            },
            // from_state writes no output: only the interrupt can fail.
            vm_superio::serial::Error::Trigger(source)
            | vm_superio::serial::Error::IOError(source) => DeviceStateError::Interrupt {
                device: "serial",
                source,
            },
        })?;
        *uart = restored;
        Ok(())
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

    /// A UART with its interrupt line and a record of its output.
    fn uart() -> (SerialDevice, EventFd, Shared) {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(
            EventFdTrigger(irq.try_clone().unwrap()),
            Box::new(out.clone()),
        );
        (dev, irq, out)
    }

    /// Drives `dev` through its ports alone into a state with something in
    /// every register and two loopback bytes in the FIFO.
    fn drive(dev: &SerialDevice) {
        dev.write(3, &[0x80]); // DLAB
        dev.write(0, &[0x01]); // divisor 1 (115200 baud)
        dev.write(1, &[0x00]);
        dev.write(3, &[0x1b]); // 8E1, DLAB off
        dev.write(7, &[0x5a]); // scratch
        dev.write(0, b"x"); // to the sink
        dev.write(4, &[0x1b]); // DTR, RTS, OUT2, loopback
        dev.write(1, &[0x03]); // RDA and THR-empty interrupts: THR pends
        dev.write(0, b"abc"); // looped back into the FIFO: RDA pends
        let mut b = [0u8];
        dev.read(0, &mut b); // takes 'a', clears RDA
        assert_eq!(b[0], b'a');
    }

    /// What the guest sees from here on: every register, the FIFO drained,
    /// the divisor, and output once loopback is off.
    fn observe(dev: &SerialDevice) -> Vec<u8> {
        let mut seen = Vec::new();
        let mut read = |offset| {
            let mut b = [0u8];
            dev.read(offset, &mut b);
            seen.push(b[0]);
        };
        for offset in [2, 5, 6, 7, 3, 4, 1, 0, 5, 0, 0, 5, 2] {
            read(offset);
        }
        dev.write(3, &[0x9b]);
        read(0);
        read(1);
        dev.write(3, &[0x1b]);
        dev.write(4, &[0x08]);
        dev.write(0, b"z");
        read(2);
        seen
    }

    #[test]
    fn restored_uart_behaves_like_the_source() {
        let (src, _src_irq, src_out) = uart();
        drive(&src);
        let state = src.state();
        assert_eq!(state.in_buffer, b"bc");
        assert_eq!(state.interrupt_identification, IIR_THR_EMPTY);
        assert_eq!(
            (state.baud_divisor_low, state.scratch, state.line_status),
            (1, 0x5a, 0x61)
        );

        let (dst, dst_irq, dst_out) = uart();
        dst.restore(&state).unwrap();
        assert_eq!(dst.state(), state);
        // The THR-empty interrupt pending on the source is raised again.
        assert_eq!(dst_irq.read().unwrap(), 1);

        let seen = observe(&src);
        assert_eq!(observe(&dst), seen);
        // IIR with FIFO bits and THR pending; the two bytes; the divisor.
        assert_eq!(seen[0], 0xc2);
        assert_eq!(&seen[7..11], &[b'b', 0x61, b'c', 0]);
        assert_eq!(&seen[13..15], &[1, 0]);
        assert_eq!(&*src_out.0.lock().unwrap(), b"xz");
        assert_eq!(&*dst_out.0.lock().unwrap(), b"z");
    }

    #[test]
    fn a_full_fifo_round_trips() {
        let (src, _irq, _) = uart();
        assert_eq!(src.enqueue_input(&[7; 100]), SERIAL_FIFO_LEN);
        let state = src.state();
        assert_eq!(state.in_buffer.len(), SERIAL_FIFO_LEN);
        let (dst, _irq, _) = uart();
        dst.restore(&state).unwrap();
        assert_eq!(dst.enqueue_input(b"more"), 0);
        assert_eq!(dst.state(), state);
    }

    #[test]
    fn bad_states_are_refused_and_change_nothing() {
        let (dev, _irq, _) = uart();
        drive(&dev);
        let before = dev.state();
        let refused = |edit: fn(&mut SerialState), field: &str| {
            let mut bad = before.clone();
            edit(&mut bad);
            let err = dev.restore(&bad).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
            assert!(err.to_string().contains("serial"), "{err}");
            assert_eq!(dev.state(), before);
        };
        refused(|s| s.in_buffer = vec![0; SERIAL_FIFO_LEN + 1], "in_buffer");
        refused(|s| s.interrupt_enable = 0x10, "interrupt_enable");
        refused(
            |s| s.interrupt_identification = 0,
            "interrupt_identification",
        );
        refused(
            |s| s.interrupt_identification = 0x03,
            "interrupt_identification",
        );
        refused(
            |s| s.interrupt_identification = 0x08,
            "interrupt_identification",
        );
        refused(|s| s.line_status = 0x60, "line_status");
        refused(|s| s.in_buffer.clear(), "line_status");
        refused(|s| s.line_status = 0xe1, "line_status");
        refused(|s| s.modem_status = 0xb1, "modem_status");
        assert!(matches!(
            dev.restore(&SerialState {
                in_buffer: vec![0; 1000],
                ..before.clone()
            }),
            Err(DeviceStateError::TooLong {
                len: 1000,
                max: 64,
                ..
            })
        ));
    }

    #[test]
    fn fifo_len_is_vm_superios() {
        let (dev, _irq, _) = uart();
        let uart = dev.uart.lock().unwrap();
        assert_eq!(uart.fifo_capacity(), SERIAL_FIFO_LEN);
        assert_eq!(
            SerialState::from(uart.state()),
            SerialState::from(vm_superio::SerialState::default())
        );
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
