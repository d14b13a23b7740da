//! Why the VMM stops, and the one place every thread reports it.
//!
//! vCPU threads, devices, the QMP `quit` command and signal handling all call
//! [`ExitHandle::request`]; the first reason wins, and the event loop wakes
//! on the handle's `EventFd` to shut down and exit with the reason's code.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Why a vCPU stopped for good (KVM's exit, or its failure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuFault {
    /// The guest triple-faulted.
    #[error("triple fault (KVM_EXIT_SHUTDOWN)")]
    TripleFault,
    /// KVM could not emulate what the guest did.
    #[error("KVM internal error (emulation failure)")]
    InternalError,
    /// VM entry failed (the hardware's reason).
    #[error("VM entry failed: reason {reason:#x} on cpu {cpu}")]
    FailEntry {
        /// The hardware's failure reason.
        reason: u64,
        /// The host CPU.
        cpu: u32,
    },
    /// KVM_RUN returned an error.
    #[error("KVM_RUN failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Run {
        /// Its errno.
        errno: i32,
    },
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (lab port).
    PowerOff,
    /// The guest reset the machine (i8042); cgsvmm does not reboot.
    Reset,
    /// QMP `quit`.
    Quit,
    /// QMP `system_powerdown`: the host asked (no ACPI here, so the VM
    /// powers off at once).
    HostPowerdown,
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// A lab guest reported a failure on its serial port.
    GuestFailure,
    /// A vCPU faulted or KVM failed.
    Fault {
        /// Which vCPU ("vcpu 0", "mirror 1").
        vcpu: String,
        /// What happened.
        fault: VcpuFault,
    },
    /// The incoming migration failed (the guest never ran here).
    IncomingFailed(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => f.write_str("the guest powered off"),
            ExitReason::Reset => f.write_str("the guest reset the machine"),
            ExitReason::Quit => f.write_str("quit"),
            ExitReason::HostPowerdown => f.write_str("system_powerdown"),
            ExitReason::Signal(n) => write!(f, "signal {n}"),
            ExitReason::GuestFailure => f.write_str("the lab guest reported a failure"),
            ExitReason::Fault { vcpu, fault } => write!(f, "{vcpu}: {fault}"),
            ExitReason::IncomingFailed(why) => write!(f, "incoming migration {why}"),
        }
    }
}

impl ExitReason {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::PowerOff
            | ExitReason::Reset
            | ExitReason::Quit
            | ExitReason::HostPowerdown
            | ExitReason::Signal(_) => 0,
            ExitReason::Fault { .. } | ExitReason::IncomingFailed(_) => 1,
            ExitReason::GuestFailure => 2,
        }
    }

    /// The `reason` of QMP's SHUTDOWN event (QEMU's ShutdownCause names).
    pub fn shutdown_cause(&self) -> &'static str {
        match self {
            ExitReason::PowerOff => "guest-shutdown",
            ExitReason::Reset => "guest-reset",
            ExitReason::Quit => "host-qmp-quit",
            ExitReason::HostPowerdown => "host-qmp-system-powerdown",
            ExitReason::Signal(_) => "host-signal",
            ExitReason::GuestFailure => "guest-panic",
            ExitReason::Fault { .. } | ExitReason::IncomingFailed(_) => "host-error",
        }
    }

    /// Whether the guest itself asked to stop.
    pub fn guest_initiated(&self) -> bool {
        matches!(
            self,
            ExitReason::PowerOff | ExitReason::Reset | ExitReason::GuestFailure
        )
    }
}

struct Inner {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

/// Shared by every thread that may end the VM.
#[derive(Clone)]
pub struct ExitHandle(Arc<Inner>);

impl ExitHandle {
    /// A handle with no reason yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(Arc::new(Inner {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })))
    }

    /// Asks the VMM to stop; later requests are logged and ignored.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.0.reason.lock().expect("exit lock poisoned");
        if slot.is_none() {
            log::info!("Stopping: {reason:?}");
            *slot = Some(reason);
            if let Err(e) = self.0.evt.write(1) {
                log::error!("Cannot wake the event loop: {e}");
            }
        } else {
            log::debug!("Already stopping; ignored {reason:?}");
        }
    }

    /// The reason, once one was requested.
    pub fn reason(&self) -> Option<ExitReason> {
        self.0.reason.lock().expect("exit lock poisoned").clone()
    }

    /// Readable when a reason was requested.
    pub fn event(&self) -> &EventFd {
        &self.0.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_loop() {
        let exit = ExitHandle::new().unwrap();
        assert_eq!(exit.reason(), None);
        exit.clone().request(ExitReason::PowerOff);
        exit.request(ExitReason::Fault {
            vcpu: "vcpu 0".into(),
            fault: VcpuFault::TripleFault,
        });
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        assert_eq!(exit.event().read().unwrap(), 1);
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
        assert_eq!(ExitReason::GuestFailure.exit_code(), 2);
        let fault = ExitReason::Fault {
            vcpu: "vcpu 1".into(),
            fault: VcpuFault::FailEntry {
                reason: 0x21,
                cpu: 1,
            },
        };
        assert_eq!(fault.exit_code(), 1);
        assert_eq!(
            fault.to_string(),
            "vcpu 1: VM entry failed: reason 0x21 on cpu 1"
        );
        assert!(ExitReason::Reset.guest_initiated());
        assert!(!ExitReason::Quit.guest_initiated());
    }
}
