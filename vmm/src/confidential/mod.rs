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

/// Which backend, without its launch data: what the stream's config record
/// names and both sides must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// No memory encryption.
    None,
    /// AMD SEV.
    Sev,
}

impl Backend {
    /// Its name, as `--confidential` takes it and the stream carries it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::None => "none",
            Backend::Sev => "sev",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Confidential {
    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            Confidential::None => Backend::None,
            Confidential::Sev(_) => Backend::Sev,
        }
    }

    /// The backend's name, as `--confidential` takes it.
    pub fn name(&self) -> &'static str {
        self.backend().name()
    }
}
