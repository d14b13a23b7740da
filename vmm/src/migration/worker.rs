//! The migration workers: one thread per migration, started by the
//! controller through [`Migrator`] and owning the migration while it runs.
//! The controller keeps the job (which `query-migrate` reads without
//! waiting) and the thread's handle, and joins it when the VMM goes away
//! (after [`MigrationJob::stop`], which cuts a connection it waits on).
//! The worker takes the controller's lock only for the moments it changes
//! the VM (pause, save, restore, resume) and to report.

use std::sync::Arc;

use cgsvmm_migration::source::{self, Params};
use cgsvmm_migration::transport::{Listener, Uri};
use cgsvmm_migration::{target, MigratableVm, MigrationError, Progress, VmError};

use super::link::VmLink;
use crate::control::job::{MigrationJob, MigrationStatus, StartError};
use crate::control::{Migrator, Worker};
use crate::machine::exit::ExitReason;

impl Migrator for VmLink {
    /// Starts sending the VM to `uri`; the caller holds the controller
    /// (the worker waits for it before it pauses the guest).
    fn outgoing(self: Arc<Self>, uri: Uri, params: Params) -> Worker {
        let helpers = params.helpers.clamp(1, self.helpers);
        let job = Arc::new(MigrationJob::new(helpers, true));
        let worker_job = job.clone();
        let spawned = std::thread::Builder::new()
            .name("migrate-out".into())
            .spawn(move || send(&self, &worker_job, &uri, &params));
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                let e = VmError::new("Cannot start the migration thread", e);
                job.finish(&Err(e.into()));
                None
            }
        };
        Worker { job, thread }
    }

    /// Listens at `uri` now (so a source can connect as soon as this
    /// returns) and receives the VM in a worker. A failed incoming
    /// migration ends the process with the reason; the guest never ran.
    fn incoming(self: Arc<Self>, uri: &Uri, helpers: usize) -> Result<Worker, StartError> {
        let listener = Listener::bind(uri)?;
        let shown = match (uri, listener.port()) {
            (Uri::Tcp(addr), Some(port)) => {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                Uri::Tcp(format!("{host}:{port}"))
            }
            _ => uri.clone(),
        };
        log::info!("Waiting for an incoming migration on {shown}");
        let job = Arc::new(MigrationJob::new(helpers, false));
        let worker_job = job.clone();
        let thread = std::thread::Builder::new()
            .name("migrate-in".into())
            .spawn(move || receive(&self, &worker_job, &listener, &shown))
            .map_err(StartError::Spawn)?;
        Ok(Worker {
            job,
            thread: Some(thread),
        })
    }
}

/// The outgoing worker: the migration, then what its end means for the
/// run state.
fn send(link: &VmLink, job: &MigrationJob, uri: &Uri, params: &Params) {
    link.raise_migration(MigrationStatus::Setup);
    job.activate();
    link.raise_migration(MigrationStatus::Active);
    log::info!("Migrating to {uri}");
    let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        source::send(link, uri, params, &job.progress, job.canceller())
    }));
    // Its connection closes now, not when the job is forgotten.
    job.canceller().detach();
    let result = sent.unwrap_or_else(|_| {
        // Whatever the worker left half done: the guest at full speed, no
        // dirty log, running again if it was paused here; but once the
        // seal may have left, the target may run it: its outcome is
        // unknown, and it stays paused.
        link.throttle(0);
        link.stop_dirty_log();
        if job
            .progress
            .sealed
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // (The run state follows below, as for any unknown outcome.)
            return Err(MigrationError::OutcomeUnknown(
                "the migration thread failed after the seal went out".into(),
            ));
        }
        link.with_controller(|c| {
            c.worker_failed()
                .map_err(|e| VmError::new("Cannot resume the guest", e))
        })
        .unwrap_or_else(|e| log::error!("{e}"));
        Err(VmError::refused("the migration thread failed unexpectedly").into())
    });
    let status = job.finish(&result);
    match &result {
        Ok(()) => {
            let snapshot = matches!(uri, Uri::File(_));
            let _ = link.with_controller(|c| {
                c.finish_outgoing(snapshot);
                Ok(())
            });
            log::info!(
                "Migrated to {uri} in {} ms ({} ms paused)",
                job.total_ms(),
                Progress::get(&job.progress.downtime_us) / 1000
            );
        }
        Err(MigrationError::Cancelled) => log::info!("Migration to {uri} cancelled"),
        Err(e @ MigrationError::OutcomeUnknown(_)) => {
            let _ = link.with_controller(|c| {
                c.outcome_unknown();
                Ok(())
            });
            log::error!("Migration to {uri}: {e}");
        }
        Err(e) => log::error!("Migration to {uri} failed: {e}"),
    }
    link.raise_migration(status);
}

/// The incoming worker: waits for the source (a connection that does not
/// speak the protocol is ignored on a socket), receives the VM, and ends
/// the process if that fails.
fn receive(link: &VmLink, job: &MigrationJob, listener: &Listener, shown: &Uri) {
    let result = loop {
        let channel = match listener.accept_unless(job.canceller()) {
            Ok(c) => c,
            Err(e) => break Err(MigrationError::from(e)),
        };
        job.canceller().attach(&channel);
        job.restart_clock();
        job.activate();
        // A panic in the receiver (restore reaches KVM and the device
        // models) fails the incoming migration like any error: the
        // process exits instead of waiting in inmigrate for ever.
        let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            target::receive(link, channel, &job.progress, job.canceller())
        }))
        .unwrap_or_else(|_| {
            Err(VmError::refused("the incoming migration thread failed unexpectedly").into())
        });
        job.canceller().detach();
        match received {
            // On a socket, someone who does not speak the protocol (a port
            // scanner, a squatter that says nothing): wait for the real
            // source.
            Err(MigrationError::NotAMigration(why)) if !matches!(shown, Uri::File(_)) => {
                log::warn!("Ignored a connection on {shown}: {why}");
                job.set_status(MigrationStatus::Setup);
            }
            other => break other,
        }
    };
    let status = job.finish(&result);
    // Completed was raised before the guest started.
    if status != MigrationStatus::Completed {
        link.raise_migration(status);
    }
    match result {
        Ok(()) => log::info!(
            "Incoming migration from {shown} done in {} ms",
            job.total_ms()
        ),
        Err(e) => link
            .exit
            .request(ExitReason::IncomingFailed(format!("from {shown}: {e}"))),
    }
}
