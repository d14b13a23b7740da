//! A migration as the control API sees it: its status in QEMU's names,
//! its counters (shared with the worker without locks) and what
//! `query-migrate` reports of it. The worker that runs it is
//! `crate::migration`'s; the controller keeps the job and the worker's
//! thread.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cgsvmm_migration::source::Cancel;
use cgsvmm_migration::transport::TransportError;
use cgsvmm_migration::{MigrationError, Progress};

/// Errors of starting a migration worker.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The VM is gone, or cannot be migrated.
    #[error("The VM is shutting down")]
    NoLink,
    /// Listening failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The worker thread could not start.
    #[error("Cannot start the migration thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// QEMU's MigrationStatus values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MigrationStatus {
    /// Connecting, pausing.
    Setup = 0,
    /// Sending or receiving.
    Active = 1,
    /// Done.
    Completed = 2,
    /// Failed (the guest runs on where it was).
    Failed = 3,
    /// `migrate_cancel` asked.
    Cancelling = 4,
    /// Cancelled (the guest runs on where it was).
    Cancelled = 5,
}

impl MigrationStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Setup,
            1 => Self::Active,
            2 => Self::Completed,
            3 => Self::Failed,
            4 => Self::Cancelling,
            _ => Self::Cancelled,
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Setup => "setup",
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One migration, as `query-migrate` reports it; shared with its worker.
pub struct MigrationJob {
    /// Counters.
    pub progress: Progress,
    cancel: Cancel,
    started: Mutex<Instant>,
    status: AtomicU8,
    total_us: AtomicU64,
    error: Mutex<Option<String>>,
    helpers: usize,
    /// Sending (cancellable) rather than receiving.
    outgoing: bool,
}

impl MigrationJob {
    /// A job for `helpers` helpers, sending (`outgoing`) or receiving.
    pub fn new(helpers: usize, outgoing: bool) -> Self {
        Self {
            progress: Progress::default(),
            cancel: Cancel::default(),
            started: Mutex::new(Instant::now()),
            status: AtomicU8::new(MigrationStatus::Setup as u8),
            total_us: AtomicU64::new(0),
            error: Mutex::new(None),
            helpers,
            outgoing,
        }
    }

    /// Counts time from now (an incoming migration, from its connection).
    pub fn restart_clock(&self) {
        *self.started.lock().expect("clock lock poisoned") = Instant::now();
    }

    fn elapsed(&self) -> Duration {
        self.started.lock().expect("clock lock poisoned").elapsed()
    }

    /// Where it stands.
    pub fn status(&self) -> MigrationStatus {
        MigrationStatus::from_u8(self.status.load(Ordering::SeqCst))
    }

    /// Moves it to `s` (the worker).
    pub fn set_status(&self, s: MigrationStatus) {
        self.status.store(s as u8, Ordering::SeqCst);
    }

    /// Setup becomes Active (the worker began; a cancel that came first
    /// stays).
    pub fn activate(&self) {
        self.advance(MigrationStatus::Setup, MigrationStatus::Active);
    }

    /// Moves the status from `from` to `to`, and only from `from`.
    fn advance(&self, from: MigrationStatus, to: MigrationStatus) {
        let _ =
            self.status
                .compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Whether it is still under way.
    pub fn is_active(&self) -> bool {
        matches!(
            self.status(),
            MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Cancelling
        )
    }

    /// `migrate_cancel`: an outgoing migration stops; an incoming one is
    /// not the target's to cancel (as in QEMU).
    pub fn cancel(&self) {
        if self.outgoing {
            // Only from a state under way: a cancel that comes as the
            // worker finishes does not overwrite its outcome.
            for from in [MigrationStatus::Setup, MigrationStatus::Active] {
                self.advance(from, MigrationStatus::Cancelling);
            }
            self.cancel.cancel();
        }
    }

    /// Stops it whatever its direction (the VMM is going away): an
    /// outgoing one as [`MigrationJob::cancel`] does, an incoming one's
    /// wait for the source or its stream cut.
    pub fn stop(&self) {
        if self.outgoing {
            self.cancel();
        } else {
            self.cancel.cancel();
        }
    }

    /// What the worker hands its connection to, so that a cancel or stop
    /// reaches it at once.
    pub fn canceller(&self) -> &Cancel {
        &self.cancel
    }

    /// Records how it ended; the status it ended in.
    pub fn finish(&self, result: &Result<(), MigrationError>) -> MigrationStatus {
        self.total_us
            .store(self.elapsed().as_micros() as u64, Ordering::SeqCst);
        let status = match result {
            Ok(()) => MigrationStatus::Completed,
            Err(MigrationError::Cancelled) => MigrationStatus::Cancelled,
            Err(e) => {
                *self.error.lock().expect("error lock poisoned") = Some(e.to_string());
                MigrationStatus::Failed
            }
        };
        self.set_status(status);
        status
    }

    /// Milliseconds from the start to the end (or to now).
    pub fn total_ms(&self) -> u64 {
        let done = self.total_us.load(Ordering::SeqCst);
        let us = if done > 0 {
            done
        } else {
            self.elapsed().as_micros() as u64
        };
        us / 1000
    }

    /// A snapshot of where it stands, for `query-migrate`.
    pub fn info(&self) -> MigrationInfo {
        let p = &self.progress;
        let status = self.status();
        MigrationInfo {
            status,
            total_ms: self.total_ms(),
            setup_ms: Progress::get(&p.setup_us) / 1000,
            downtime_ms: (status == MigrationStatus::Completed)
                .then(|| Progress::get(&p.downtime_us) / 1000),
            transferred: Progress::get(&p.transferred),
            remaining: Progress::get(&p.remaining),
            total: Progress::get(&p.total),
            private_pages: Progress::get(&p.private_pages),
            shared_pages: Progress::get(&p.shared_pages),
            helpers: self.helpers,
            error: self.error.lock().expect("error lock poisoned").clone(),
            rounds: Progress::get(&p.rounds),
            dirty_pages_rate: Progress::get(&p.dirty_rate),
            expected_downtime_ms: Progress::get(&p.expected_downtime_us) / 1000,
            downtime_private_pages: Progress::get(&p.downtime_private_pages),
            throttle_percent: Progress::get(&p.throttle),
        }
    }
}

/// A migration as `query-migrate` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInfo {
    /// Where it stands.
    pub status: MigrationStatus,
    /// Milliseconds from start to end (or now).
    pub total_ms: u64,
    /// Milliseconds until the guest was paused.
    pub setup_ms: u64,
    /// Milliseconds the guest was paused (once completed).
    pub downtime_ms: Option<u64>,
    /// Bytes on the wire.
    pub transferred: u64,
    /// Bytes of RAM still to go.
    pub remaining: u64,
    /// Bytes of RAM.
    pub total: u64,
    /// Pages through the helpers.
    pub private_pages: u64,
    /// Pages as plaintext.
    pub shared_pages: u64,
    /// Helpers at work.
    pub helpers: usize,
    /// Why it failed.
    pub error: Option<String>,
    /// Precopy rounds (`dirty-sync-count`).
    pub rounds: u64,
    /// Pages dirtied per second in the last round.
    pub dirty_pages_rate: u64,
    /// What the last round expected the pause to take.
    pub expected_downtime_ms: u64,
    /// Private pages the helpers sealed while the guest was paused.
    pub downtime_private_pages: u64,
    /// How much precopy slowed the guest down at most (percent).
    pub throttle_percent: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_never_overwrites_an_outcome() {
        let job = MigrationJob::new(1, true);
        job.activate();
        assert_eq!(job.status(), MigrationStatus::Active);
        assert_eq!(job.finish(&Ok(())), MigrationStatus::Completed);
        job.cancel();
        assert_eq!(job.status(), MigrationStatus::Completed);
        assert!(!job.is_active());
        // Cancelled before the worker began: it stays cancelling, and the
        // worker's start does not make it active again.
        let early = MigrationJob::new(1, true);
        early.cancel();
        early.activate();
        assert_eq!(early.status(), MigrationStatus::Cancelling);
        assert!(early.canceller().is_cancelled());
        // An incoming job is not the target's to cancel.
        let incoming = MigrationJob::new(1, false);
        incoming.cancel();
        assert_eq!(incoming.status(), MigrationStatus::Setup);
    }
}
