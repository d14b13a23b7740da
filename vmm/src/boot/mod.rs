//! Boot paths: how a VM's first instructions are put in place.
//!
//! - [`cpl3`]: the lab guests and the mirror payload, entered directly at
//!   CPL3 in 64-bit mode (the only code this lab host runs at full speed);
//! - [`linux`]: a Linux bzImage or ELF (PVH when it has the note) through
//!   linux-loader, with boot params, E820 and an MP table;
//! - [`firmware`]: an OVMF-style image mapped to end at 4 GiB, started at the
//!   reset vector.
//!
//! Each returns the register state of every vCPU; `vmm` applies it.

pub mod cpl3;
pub mod firmware;
pub mod images;
pub mod linux;
pub mod mptable;

use kvm_bindings::{kvm_regs, kvm_sregs};

/// How the boot path wants one vCPU to start.
#[derive(Clone)]
pub enum VcpuBoot {
    /// Leave KVM's reset state alone (firmware at the reset vector; APs
    /// waiting for INIT-SIPI).
    Reset,
    /// Set these registers; `sregs` edits KVM's reset sregs.
    State {
        /// General registers.
        regs: kvm_regs,
        /// Applied on top of the vCPU's current sregs.
        sregs: std::sync::Arc<dyn Fn(&mut kvm_sregs) + Send + Sync>,
    },
}

/// Errors of preparing a boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Writing boot structures into guest memory failed.
    #[error("Cannot write {what} at {gpa:#x} into guest memory")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Where.
        gpa: u64,
    },
    /// The page tables do not fit.
    #[error(transparent)]
    Paging(#[from] crate::x86::paging::PagingError),
    /// An embedded image is malformed.
    #[error("Embedded image {name}: {why}")]
    BadImage {
        /// Image name.
        name: &'static str,
        /// What is wrong.
        why: String,
    },
    /// More vCPUs than the boot area has room for.
    #[error("{0} vCPUs do not fit the boot area (at most {1})")]
    TooManyVcpus(usize, usize),
    /// Loading the kernel failed.
    #[error("Cannot load kernel: {0}")]
    Kernel(#[from] linux_loader::loader::Error),
    /// Reading a file failed.
    #[error("Cannot read {path}: {source}")]
    Read {
        /// Path.
        path: std::path::PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// Something does not fit guest memory.
    #[error("{0}")]
    DoesNotFit(String),
    /// The command line is invalid.
    #[error("Invalid kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// The firmware image is unusable.
    #[error("Firmware image {path}: {why}")]
    Firmware {
        /// Path.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
}
