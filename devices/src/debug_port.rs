//! The debug console port (0x402, as QEMU's isa-debugcon and OVMF use it):
//! bytes written become log lines.
//!
//! Stateless for migration: reads return a constant, and the line being
//! collected is the host's log buffering, which the guest cannot read back.
//! A line the guest has half written when the source stops is not carried
//! over; the target's log starts a new one. There is no `DebugPortState`.

use std::sync::Mutex;

use crate::BusDevice;

/// The port OVMF's debug library writes to.
pub const DEBUG_PORT: u64 = 0x402;
/// What a read returns: QEMU's debugcon answers 0xe9 so firmware can probe it.
pub const DEBUG_PORT_READBACK: u8 = 0xe9;
/// A line longer than this is logged in pieces.
const MAX_LINE: usize = 1024;

/// Collects bytes into lines and logs each one.
#[derive(Default)]
pub struct DebugPort {
    line: Mutex<Vec<u8>>,
}

impl DebugPort {
    /// Takes the bytes and returns the completed lines (for the log).
    fn push(&self, data: &[u8]) -> Vec<String> {
        let mut line = self.line.lock().expect("debug port lock poisoned");
        let mut done = Vec::new();
        for &b in data {
            if b != b'\n' {
                line.push(b);
            }
            if b == b'\n' || line.len() >= MAX_LINE {
                done.push(
                    String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string(),
                );
                line.clear();
            }
        }
        done
    }
}

impl BusDevice for DebugPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(DEBUG_PORT_READBACK);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        for line in self.push(data) {
            log::info!(target: "debugcon", "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_bounds_them() {
        let port = DebugPort::default();
        assert!(port.push(b"abc").is_empty());
        assert_eq!(
            port.push(b"d\r\nef\n"),
            vec!["abcd".to_string(), "ef".to_string()]
        );
        let long = vec![b'x'; MAX_LINE + 3];
        let lines = port.push(&long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
        let mut data = [0u8; 1];
        port.read(0, &mut data);
        assert_eq!(data[0], 0xe9);
    }
}
