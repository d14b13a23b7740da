//! Confidential backends: how guest memory is kept from the host.
//!
//! - `none`: nothing is encrypted (the lab). The VMM writes the transport
//!   key into the migration helper's secret page itself.
//! - `sev`: AMD SEV. Guest RAM and the helper's private pages are encrypted
//!   with the guest's key; the mirror VM shares the encryption context
//!   (`KVM_CAP_VM_COPY_ENC_CONTEXT_FROM`); the helper's page tables map
//!   private memory with the C-bit and only its mailboxes without; the
//!   transport key arrives from the guest owner in a LAUNCH_SECRET packet
//!   after they checked the launch measurement. See [`sev`].

pub mod sev;

pub use sev::{LaunchSecret, SevConfig, SevError};

/// The confidential backend of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Confidential {
    /// No memory encryption.
    #[default]
    None,
    /// AMD SEV.
    Sev(SevConfig),
}

impl Confidential {
    /// The backend's name, as `--confidential` takes it.
    pub fn name(&self) -> &'static str {
        match self {
            Confidential::None => "none",
            Confidential::Sev(_) => "sev",
        }
    }
}
