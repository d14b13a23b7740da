//! cgsvmm's live migration.
//!
//! Owns, as the migration issues land: the stream format, the RAM sender and
//! receiver (dirty rounds, shared vs private pages), the migration-helper
//! mailbox client, vCPU and device state records, transports and the
//! convergence policy. It depends on the firmware ABI crate and never on
//! `vmm`: the VMM hands it memory and state, it hands back bytes.
//!
//! Today it holds the migration-helper client ([`helper`]), which moves
//! private pages through the helper's mailbox, dirty-bitmap ranges
//! ([`dirty`]), the stream's wire format ([`protocol`]: frames, kinds,
//! bounds, checksums) and its transports ([`transport`]: tcp, unix, file),
//! which the sender and receiver will build on.

pub mod dirty;
pub mod helper;
pub mod protocol;
pub mod transport;
