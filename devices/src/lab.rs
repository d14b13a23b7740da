//! The lab control port: how cgsvmm's bare-metal lab guests ask the VMM for
//! something (power off, report a failure, yield the CPU). Real machines have
//! no such device; see `cgsvmm_fw_abi::LAB_PORT` for the guest side.
//!
//! Stateless for migration: reads return 0 and each write is handed to the
//! VMM at once, so the target's freshly built port is already in the
//! source's state. There is no `LabPortState`.

use cgsvmm_fw_abi as abi;

use crate::BusDevice;

/// Width of the port window (one 32-bit register).
pub const LAB_PORT_LEN: u64 = 4;

/// What a lab guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabRequest {
    /// Power the VM off.
    PowerOff,
    /// The guest failed (it printed why on the serial port).
    Fail,
    /// The vCPU is idle: leave it out of KVM_RUN for a moment.
    Yield,
    /// Helper vCPU `n` waits for work: keep it out of KVM_RUN until its
    /// doorbell rings (or a short timeout passes).
    Wait(u16),
    /// The helper on this vCPU serves nothing (unusable configuration, or
    /// its index refused): keep it out of KVM_RUN.
    HelperRefused,
    /// The guest declares 2 MiB block `block` of RAM shared (`true`) or
    /// private.
    MapBlock {
        /// Block index (GPA / 2 MiB).
        block: u16,
        /// Shared or private.
        shared: bool,
    },
    /// A value this VMM does not know.
    Unknown(u32),
}

impl From<u32> for LabRequest {
    fn from(v: u32) -> Self {
        let arg = (v >> 16) as u16;
        match v & 0xffff {
            abi::LAB_CMD_WAIT => return LabRequest::Wait(arg),
            abi::LAB_CMD_SHARE_2M => {
                return LabRequest::MapBlock {
                    block: arg,
                    shared: true,
                }
            }
            abi::LAB_CMD_PRIVATE_2M => {
                return LabRequest::MapBlock {
                    block: arg,
                    shared: false,
                }
            }
            _ => {}
        }
        match v {
            abi::LAB_CMD_POWER_OFF => LabRequest::PowerOff,
            abi::LAB_CMD_FAIL => LabRequest::Fail,
            abi::LAB_CMD_YIELD => LabRequest::Yield,
            abi::LAB_CMD_HELPER_REFUSED => LabRequest::HelperRefused,
            other => LabRequest::Unknown(other),
        }
    }
}

/// Hands every 32-bit write to a callback.
pub struct LabPort {
    on_request: Box<dyn Fn(LabRequest) + Send + Sync>,
}

impl LabPort {
    /// A port that calls `on_request` for each request.
    pub fn new(on_request: impl Fn(LabRequest) + Send + Sync + 'static) -> Self {
        Self {
            on_request: Box::new(on_request),
        }
    }
}

impl BusDevice for LabPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset != 0 || data.len() != 4 {
            log::warn!(
                "Lab port: ignored {}-byte write at offset {offset}",
                data.len()
            );
            return;
        }
        let value = u32::from_le_bytes(data.try_into().expect("length checked"));
        (self.on_request)(LabRequest::from(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn decodes_requests_and_ignores_odd_widths() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let port = LabPort::new(move |r| s.lock().unwrap().push(r));
        port.write(0, &1u32.to_le_bytes());
        port.write(0, &2u32.to_le_bytes());
        port.write(0, &3u32.to_le_bytes());
        port.write(0, &9u32.to_le_bytes());
        port.write(0, &(4u32 | 3 << 16).to_le_bytes());
        port.write(0, &5u32.to_le_bytes());
        port.write(0, &(6u32 | 9 << 16).to_le_bytes());
        port.write(0, &(7u32 | 2 << 16).to_le_bytes());
        port.write(0, &[1]);
        port.write(2, &[1, 0]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                LabRequest::PowerOff,
                LabRequest::Fail,
                LabRequest::Yield,
                LabRequest::Unknown(9),
                LabRequest::Wait(3),
                LabRequest::HelperRefused,
                LabRequest::MapBlock {
                    block: 9,
                    shared: true
                },
                LabRequest::MapBlock {
                    block: 2,
                    shared: false
                },
            ]
        );
    }
}
