//! cgsvmm's migration: a VM's whole state leaves one cgsvmm process and
//! resumes in another, every private page through the migration helpers.
//!
//! Module map (docs/ARCHITECTURE.md in the repository):
//! - [`protocol`]: the wire format only (frames, kinds, bounds, checksums;
//!   the sequence diagram);
//! - [`transport`]: tcp, unix and file, the only module that knows about
//!   sockets and files;
//! - [`state`]: versioned, bounded state records (vCPU, irqchip/PIT/clock,
//!   configuration);
//! - [`ranges`]: the shared/private map; [`dirty`]: dirty bitmaps as
//!   ranges;
//! - [`helper`]: the migration-helper client (mailbox, batches, seal);
//! - [`policy`]: when precopy switches over (a pure function);
//! - [`source`]: precopy rounds, the switchover, the seal and the
//!   authenticated answer; [`target`]: the receiver, the stream in its fixed
//!   order, which
//!   verifies the seal before any vCPU runs.
//!
//! The crate never depends on `vmm`: what it needs from a VM is the
//! [`MigratableVm`] trait, which the VMM implements in one file.

pub mod dirty;
pub mod helper;
pub mod policy;
pub mod protocol;
pub mod ranges;
pub mod source;
pub mod state;
pub mod target;
pub mod transport;

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::GuestMemoryMmap;

use crate::helper::HelperClient;
use crate::ranges::SharedMap;
use crate::state::{ConfigRecord, StreamMode, VcpuRecord, VmRecord};

/// A VM's state besides its RAM, as the source saved it.
#[derive(Debug)]
pub struct SavedState {
    /// irqchip, PIT, clock.
    pub vm: VmRecord,
    /// Every main vCPU, by index.
    pub vcpus: Vec<VcpuRecord>,
    /// The devices, an encoded record of the VMM's own.
    pub devices: Vec<u8>,
}

/// A step of the VM that failed (what the VMM was doing), and why.
#[derive(Debug, thiserror::Error)]
#[error("{what}{}", cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default())]
pub struct VmError {
    what: std::borrow::Cow<'static, str>,
    #[source]
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl VmError {
    /// `what` failed because of `cause`.
    pub fn new(
        what: impl Into<std::borrow::Cow<'static, str>>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what: what.into(),
            cause: Some(cause.into()),
        }
    }

    /// `what` cannot be done (nothing failed beneath it).
    pub fn refused(what: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self {
            what: what.into(),
            cause: None,
        }
    }
}

/// What migration needs from a VM. A failed step is a [`VmError`]: the
/// VMM's words for the step, with its cause kept as the error's source.
pub trait MigratableVm: Send + Sync {
    /// What the target checks first.
    fn config(&self, mode: StreamMode) -> ConfigRecord;
    /// Guest RAM (the main VM's memory, without the mirror region).
    fn ram(&self) -> &GuestMemoryMmap;
    /// Guest RAM ranges: (start, length).
    fn ram_ranges(&self) -> Vec<(u64, u64)>;
    /// What the guest declared shared.
    fn shared_map(&self) -> SharedMap;
    /// Keeps of `gpas` only the pages the guest shares now (the live map,
    /// not a copy: a page it made private since the copy is dropped).
    fn keep_shared(&self, gpas: &mut Vec<u64>);
    /// How many conversions the live map has seen (a sender copying pages
    /// knows no page changed hands while it copied if this did not move).
    fn conversions(&self) -> u64;
    /// Replaces the shared map (the target, from the stream).
    fn set_shared_map(&self, map: SharedMap);
    /// One client per migration helper, each having answered HELLO.
    fn helpers(&self) -> Result<Vec<HelperClient>, VmError>;
    /// Pauses the main vCPUs (the mirror runs on); whether they ran.
    fn pause(&self) -> Result<bool, VmError>;
    /// Resumes the main vCPUs after a failed or cancelled migration.
    fn resume(&self) -> Result<(), VmError>;
    /// Saves vCPU, VM and device state (main vCPUs paused).
    fn save(&self) -> Result<SavedState, VmError>;
    /// Restores what [`MigratableVm::save`] saved (main vCPUs never run).
    fn restore(&self, state: SavedState) -> Result<(), VmError>;
    /// Lets the guest run here (or leaves it paused, as asked).
    fn start(&self) -> Result<(), VmError>;
    /// Starts logging the guest's writes to RAM (precopy).
    fn start_dirty_log(&self) -> Result<(), VmError>;
    /// The pages written, or converted between shared and private, since
    /// the log started or this was last called: page GPAs, ascending, each
    /// once.
    fn dirty_pages(&self) -> Result<Vec<u64>, VmError>;
    /// Stops logging.
    fn stop_dirty_log(&self);
    /// Keeps the main vCPUs paused `percent` of the time (0: not at all),
    /// so that a guest that dirties memory faster than it can be sent
    /// slows down enough for precopy to converge (QEMU's auto-converge).
    /// Back to 0 before the switchover and whenever the migration ends.
    fn throttle(&self, percent: u8);
}

/// Most helpers a VM runs.
pub const MAX_HELPERS: usize = cgsvmm_fw_abi::helper::MAX_HELPERS as usize;

/// Counters of a migration in progress, shared without locks with whoever
/// reports them (`query-migrate`).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of guest RAM.
    pub total: AtomicU64,
    /// Bytes of guest RAM not yet sent (or received).
    pub remaining: AtomicU64,
    /// Bytes put on (or taken off) the wire.
    pub transferred: AtomicU64,
    /// Private pages sent through the helpers.
    pub private_pages: AtomicU64,
    /// Shared pages sent as plaintext.
    pub shared_pages: AtomicU64,
    /// Microseconds from the start to the main vCPUs' pause.
    pub setup_us: AtomicU64,
    /// Microseconds the guest was paused (from the main vCPUs' pause to
    /// the target's acknowledgement).
    pub downtime_us: AtomicU64,
    /// Precopy rounds done (QEMU's `dirty-sync-count`).
    pub rounds: AtomicU64,
    /// Pages dirtied per second in the last round.
    pub dirty_rate: AtomicU64,
    /// What the last round expects the pause to take, in microseconds.
    pub expected_downtime_us: AtomicU64,
    /// Private pages the helpers sealed while the main vCPUs were paused
    /// (the mirror runs on through the switchover).
    pub downtime_private_pages: AtomicU64,
    /// The guest's throttle (percent of time paused; QEMU's
    /// `cpu-throttle-percentage`).
    pub throttle: AtomicU64,
    /// `downtime-limit` in force (ms); the operator may change it while
    /// the migration runs, as in QEMU.
    pub downtime_limit_ms: AtomicU64,
    /// `max-bandwidth` in force (bytes/s, 0: none); changeable too.
    pub max_bandwidth: AtomicU64,
    /// The seal may have left (a live target may run the guest from here
    /// on): whatever goes wrong after, the source's guest must not simply
    /// resume.
    pub sealed: std::sync::atomic::AtomicBool,
}

impl Progress {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes `n` from a counter, stopping at 0 (pages sent again).
    pub fn sub(counter: &AtomicU64, n: u64) {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// `n` buffers for a page frame's payload, their memory touched now: on
/// the lab host a first touch of a page costs more than encrypting it, so
/// the buffers that circulate between the helpers and the socket are
/// faulted in before the first page moves, not while it does.
pub(crate) fn buffers(n: usize) -> Vec<Vec<u8>> {
    let len = protocol::FrameKind::HelperRecords.max_length() as usize;
    (0..n)
        .map(|_| {
            let mut b = vec![0xa5u8; len];
            b.clear();
            b
        })
        .collect()
}

/// A side of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The sender.
    Source,
    /// The receiver.
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// Why a migration failed, in one sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream is damaged or does not follow the protocol.
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// A state record was refused.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// A helper failed or refused.
    #[error(transparent)]
    Helper(#[from] helper::HelperError),
    /// Source and target differ where they must not.
    #[error("Source and target do not match: {0}")]
    Mismatch(String),
    /// The peer gave up and said why.
    #[error("The {side} reported: {why}")]
    Peer {
        /// Which side said it.
        side: Side,
        /// Its message.
        why: String,
    },
    /// A frame that does not belong where it came.
    #[error("Unexpected migration frame: {0}")]
    Sequence(String),
    /// The VMM failed a step.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// `migrate_cancel`.
    #[error("Migration cancelled")]
    Cancelled,
    /// The peer never spoke the migration protocol (nothing happened).
    #[error("Not a cgsvmm migration: {0}")]
    NotAMigration(String),
    /// Everything was sent, but no answer the target's helpers vouch for
    /// came back: the guest may run on the target, so it stays paused here.
    #[error(
        "No authenticated answer from the target after the whole VM was sent ({0}): the guest \
         may run there, so it stays paused here; `cont` resumes it here, do that only if the \
         target does not run it"
    )]
    OutcomeUnknown(String),
}
