//! What the control API can do to a running VM: the run state (QEMU's
//! names, owned by [`lifecycle`]), pausing and resuming the main vCPUs
//! while the mirror vCPUs keep running, quitting, migrating (the work runs
//! in a worker of `crate::migration`, started through [`Migrator`]; the
//! controller keeps the [`job::MigrationJob`] and the worker's thread),
//! and the queries. It executes typed [`Command`]s and answers typed
//! [`Reply`]s and [`Event`]s; QMP (`qmp::commands`) translates JSON to and
//! from them, and tests drive it directly.
//!
//! Locks, in the order they are taken: the controller (one `Mutex`, held
//! by the QMP server, the event loop and a migration worker for each step
//! it takes on the VM, a vCPU pause included: up to the vCPUs' response
//! timeout), then a vCPU's channels. Nothing holding the controller waits
//! for a migration worker or the throttle thread: they take it
//! themselves, so they are joined outside it ([`Controller::take_workers`]).

pub mod job;
pub mod lifecycle;

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::SystemTime;

use vmm_sys_util::eventfd::EventFd;

use cgsvmm_fw_abi::helper::HelperHeader;
use cgsvmm_migration::helper::HelperLink;
use cgsvmm_migration::source::Params;
use cgsvmm_migration::transport::Uri;

use crate::config::Incoming;
use crate::machine::exit::{ExitHandle, ExitReason};
use crate::machine::helper_link::HelperLinks;
use crate::machine::mirror;
use crate::machine::vcpu::{VcpuError, VcpuGroup};
use crate::memory::Memory;
use job::{MigrationInfo, MigrationJob, MigrationStatus, StartError};
pub use lifecycle::RunState;
use lifecycle::{Lifecycle, Transition, Vcpus};

/// What starts migration workers, as the controller sees them (the
/// `migration` module implements it; the controller holds it weakly).
pub trait Migrator: Send + Sync {
    /// Starts sending the VM to `uri`.
    fn outgoing(self: Arc<Self>, uri: Uri, params: Params) -> Worker;
    /// Listens at `uri` now and receives the VM in a worker.
    fn incoming(self: Arc<Self>, uri: &Uri, helpers: usize) -> Result<Worker, StartError>;
}

/// A migration under way: its job and its thread (None if the thread
/// could not start; the job then says why).
pub struct Worker {
    /// What `query-migrate` reports.
    pub job: Arc<MigrationJob>,
    /// The worker's thread.
    pub thread: Option<JoinHandle<()>>,
}

/// What the control API can be asked (QMP's commands, typed; `qmp` turns
/// JSON into these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The run state.
    QueryStatus,
    /// Pause the main vCPUs.
    Stop,
    /// Resume them (`force`: also after a migration whose outcome is
    /// unknown).
    Cont {
        /// `x-force`.
        force: bool,
    },
    /// End the VMM.
    Quit,
    /// Power the VM off (no ACPI: at once).
    SystemPowerdown,
    /// The main vCPUs and their threads.
    QueryCpus,
    /// What each mirror vCPU last published.
    QueryMirror,
    /// The SEV launch measurement.
    QuerySevLaunchMeasure,
    /// Send the VM to `uri`.
    Migrate {
        /// Where.
        uri: Uri,
        /// `x-force`: also after a migration whose outcome is unknown.
        force: bool,
    },
    /// Receive the VM from `uri` (`--incoming defer` only).
    MigrateIncoming {
        /// Where from.
        uri: Uri,
    },
    /// Cancel the outgoing migration.
    MigrateCancel,
    /// The current or last migration.
    QueryMigrate,
    /// SHA-256 over guest RAM (tests).
    QueryRamDigest,
    /// Changes how the next migration goes.
    MigrateSetParameters(ParamsChange),
    /// How the next migration goes.
    QueryMigrateParameters,
    /// QEMU's migration capabilities, on or off.
    MigrateSetCapabilities(Vec<(CapabilityName, bool)>),
    /// Their states.
    QueryMigrateCapabilities,
}

/// The migration capabilities cgsvmm has (QEMU's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Throttle a guest whose precopy does not converge.
    AutoConverge,
    /// MIGRATION events (always sent).
    Events,
}

impl Capability {
    /// Every one, as `query-migrate-capabilities` lists them.
    pub const ALL: [Capability; 2] = [Capability::AutoConverge, Capability::Events];

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Capability::AutoConverge => "auto-converge",
            Capability::Events => "events",
        }
    }
}

/// A capability `migrate-set-capabilities` names: one cgsvmm has, or one
/// of QEMU's it does not (which may only be turned off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapabilityName {
    /// One cgsvmm has.
    Known(Capability),
    /// Any other name.
    Other(String),
}

impl From<&str> for CapabilityName {
    fn from(name: &str) -> Self {
        Capability::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .map_or_else(
                || CapabilityName::Other(name.to_string()),
                CapabilityName::Known,
            )
    }
}

/// The parameters `migrate-set-parameters` changes (None: unchanged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamsChange {
    /// `downtime-limit`, milliseconds.
    pub downtime_limit_ms: Option<u64>,
    /// `max-bandwidth`, bytes per second (0: no limit).
    pub max_bandwidth: Option<u64>,
    /// `x-helpers`.
    pub helpers: Option<u64>,
    /// `x-batch`, pages.
    pub batch: Option<u64>,
    /// `x-auto-converge`.
    pub auto_converge: Option<bool>,
}

/// QEMU's bound on `downtime-limit` (ms).
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// What a command answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Done, nothing to tell.
    Done,
    /// The run state.
    Status(RunState),
    /// The main vCPUs.
    Cpus(Vec<CpuInfo>),
    /// The mirror vCPUs.
    Mirror(Vec<MirrorInfo>),
    /// The SEV launch measurement.
    SevMeasurement(Vec<u8>),
    /// The current or last migration, if there was one.
    Migration(Option<MigrationInfo>),
    /// Hex SHA-256 of guest RAM.
    RamDigest(String),
    /// The migration parameters.
    MigrationParameters(Params),
    /// The capabilities and their states.
    Capabilities(Vec<(Capability, bool)>),
}

/// A command that could not be done, and why (for the operator).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Not in the VM's present state.
    #[error("{0}")]
    WrongState(String),
    /// A migration is under way.
    #[error("There's a migration process in progress")]
    MigrationInProgress,
    /// A migration is under way and this cannot change while it runs.
    #[error(
        "A migration is in progress: only downtime-limit and max-bandwidth change while it \
         runs (cancel it to change the others)"
    )]
    FixedWhileMigrating,
    /// A parameter out of its range.
    #[error("Parameter '{name}' expects {expects}")]
    InvalidParameter {
        /// Its QMP name.
        name: &'static str,
        /// What it takes.
        expects: String,
    },
    /// A capability cgsvmm does not have.
    #[error("Capability '{0}' is not supported by cgsvmm")]
    UnknownCapability(String),
    /// Not for this VM (no SEV, no helper, SEV keeps its memory).
    #[error("{0}")]
    Unavailable(&'static str),
    /// `migrate` to a snapshot file that exists.
    #[error(
        "{} exists: cgsvmm never overwrites a snapshot; remove it or choose another name",
        .0.display()
    )]
    SnapshotExists(std::path::PathBuf),
    /// The migration worker could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The vCPUs did not do what was asked.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The VMM is shutting down: the run state no longer changes.
    #[error("The VM is shutting down")]
    ShuttingDown,
}

impl ControlError {
    /// The QMP error class QEMU gives such a failure.
    pub fn qmp_class(&self) -> &'static str {
        // QEMU reports every one of these as a GenericError.
        "GenericError"
    }
}

/// A main vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuInfo {
    /// Its index.
    pub index: usize,
    /// Its thread.
    pub thread_id: i32,
}

/// Something that happened, for the QMP clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The main vCPUs paused.
    Stop,
    /// They run again.
    Resume,
    /// A migration changed status.
    Migration(MigrationStatus),
}

/// An event and when it was raised.
pub type TimedEvent = (Event, SystemTime);

/// What runs on the mirror vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorPayload {
    /// The counting payload (no helper configured).
    Counter,
    /// The migration helper.
    Helper,
}

impl MirrorPayload {
    /// Its name in `x-query-mirror`.
    pub fn name(self) -> &'static str {
        match self {
            MirrorPayload::Counter => "counter",
            MirrorPayload::Helper => "helper",
        }
    }
}

/// One mirror vCPU, as the debug query reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorInfo {
    /// Mirror vCPU index.
    pub index: usize,
    /// What runs there.
    pub payload: MirrorPayload,
    /// The counting payload's loop counter, or the helper's idle wake-ups:
    /// increases while the vCPU runs.
    pub counter: u64,
    /// The guest-RAM word it last read.
    pub probe: u64,
    /// Its thread.
    pub thread_id: i32,
    /// Why it stopped, if it faulted.
    pub fault: Option<String>,
}

/// The VM as the control API sees it.
pub struct Controller {
    main: VcpuGroup,
    mirror: VcpuGroup,
    memory: Arc<Memory>,
    exit: ExitHandle,
    life: Lifecycle,
    mirror_started: bool,
    /// Events raised, with the time they were.
    events: Vec<TimedEvent>,
    helper: Option<HelperHeader>,
    links: Arc<HelperLinks>,
    sev_measurement: Option<Vec<u8>>,
    /// Woken whenever an event is raised (the QMP server sends it then).
    event_wake: Option<EventFd>,
    /// What starts migrations (None: this VM cannot be migrated).
    migrator: Option<Weak<dyn Migrator>>,
    /// The last (or current) outgoing or incoming migration.
    migration: Option<Arc<MigrationJob>>,
    /// Migration worker threads not yet joined (the last one, and any
    /// still finishing its report).
    workers: Vec<JoinHandle<()>>,
    /// How this VM was built to receive a migration, if it was.
    incoming: Option<Incoming>,
    /// How the next migration goes.
    params: Params,
    /// The VMM is shutting down ([`Controller::take_workers`]): no more
    /// transitions, so a migration stopped by it leaves the guest as it is.
    closing: bool,
}

impl Controller {
    /// A controller for started (paused) vCPU groups.
    pub fn new(
        main: VcpuGroup,
        mirror: VcpuGroup,
        memory: Arc<Memory>,
        exit: ExitHandle,
        helper: Option<HelperHeader>,
        links: Arc<HelperLinks>,
    ) -> Self {
        Self {
            main,
            mirror,
            memory,
            exit,
            life: Lifecycle::new(false, true),
            mirror_started: false,
            events: Vec::new(),
            helper,
            links,
            sev_measurement: None,
            event_wake: None,
            migrator: None,
            migration: None,
            workers: Vec::new(),
            incoming: None,
            params: Params::default(),
            closing: false,
        }
    }

    /// Wires the controller to migration: what starts workers, how the VM
    /// was built (for incoming), whether the guest starts on its own, and
    /// the eventfd to write when events are raised.
    pub fn configure(
        &mut self,
        migrator: Option<Weak<dyn Migrator>>,
        incoming: Option<Incoming>,
        autostart: bool,
        event_wake: Option<EventFd>,
    ) {
        self.migrator = migrator;
        self.life = Lifecycle::new(incoming.is_some(), autostart);
        self.incoming = incoming;
        self.event_wake = event_wake;
    }

    /// Queues an event for the QMP clients and wakes the server.
    pub fn raise(&mut self, event: Event) {
        self.events.push((event, SystemTime::now()));
        if let Some(wake) = &self.event_wake {
            let _ = wake.write(1);
        }
    }

    /// Takes transition `t`: the main vCPUs do what it needs, then the run
    /// state changes and its event is raised; a refusal or a vCPU failure
    /// changes nothing.
    fn go(&mut self, t: Transition) -> Result<(), ControlError> {
        let step = self.life.plan(t)?;
        // At shutdown the guest never runs again; a worker's last word
        // (failed, completed, outcome unknown) is still recorded.
        if self.closing && step.vcpus == Vcpus::Resume {
            return Err(ControlError::ShuttingDown);
        }
        let began = std::time::Instant::now();
        match step.vcpus {
            Vcpus::Stay => {}
            Vcpus::Pause => self.main.pause()?,
            Vcpus::Resume => self.main.resume()?,
        }
        match step.vcpus {
            Vcpus::Stay => {}
            Vcpus::Pause => log::debug!(
                "Paused the main vCPUs in {:?} (the mirror runs on; {t:?})",
                began.elapsed()
            ),
            Vcpus::Resume => log::debug!("Resumed the main vCPUs in {:?} ({t:?})", began.elapsed()),
        }
        if let Some(event) = self.life.commit(step) {
            self.raise(event);
        }
        Ok(())
    }

    /// Pauses the main vCPUs for an outgoing migration; whether they ran.
    pub fn pause_for_migration(&mut self) -> Result<bool, ControlError> {
        self.go(Transition::PauseForMigration)?;
        Ok(self.life.ran_before_migration())
    }

    /// Whether the guest ran when the current outgoing migration paused it.
    pub fn ran_before_migration(&self) -> bool {
        self.life.ran_before_migration()
    }

    /// The arriving guest's state is restored: `running` on its source or
    /// not (it runs on here only then, as in QEMU).
    pub fn restored(&mut self, running: bool) -> Result<(), ControlError> {
        self.go(Transition::Restored {
            source_running: running,
        })
    }

    /// An outgoing migration completed: the guest runs elsewhere now
    /// (`postmigrate`); after a snapshot it may also go on here.
    pub fn finish_outgoing(&mut self, snapshot: bool) {
        if let Err(e) = self.go(Transition::MigrationDone { snapshot }) {
            log::error!("The completed migration: {e}");
        }
    }

    /// Undoes [`Controller::pause_for_migration`] after a failure.
    /// At shutdown the guest stays paused, as it is meant to.
    pub fn resume_after_migration(&mut self) -> Result<(), ControlError> {
        match self.go(Transition::MigrationFailed) {
            Err(ControlError::ShuttingDown) => {
                log::debug!("The migration ended at shutdown: the guest stays paused");
                Ok(())
            }
            other => other,
        }
    }

    /// The migration worker died: whatever it paused runs again.
    pub fn worker_failed(&mut self) -> Result<(), ControlError> {
        if self.life.state() == RunState::FinishMigrate {
            self.resume_after_migration()?;
        }
        Ok(())
    }

    /// Everything was sent but no authenticated answer came: the guest
    /// stays paused here (`cont` resumes it).
    pub fn outcome_unknown(&mut self) {
        if let Err(e) = self.go(Transition::OutcomeUnknown) {
            log::error!("The migration's unknown outcome: {e}");
        }
    }

    /// An incoming migration arrived and verified: the guest runs, or
    /// stays paused if it was told to.
    pub fn finish_incoming(&mut self) -> Result<(), ControlError> {
        self.go(Transition::Arrived)
    }

    /// Auto-converge's pause: only a running guest's main vCPUs, and the
    /// run state stays `running` (a throttled guest still runs).
    pub fn throttle_pause(&self) {
        if self.life.state() == RunState::Running {
            let _ = self.main.pause();
        }
    }

    /// The end of auto-converge's pause: only while the guest is meant to
    /// run (a `stop` meanwhile wins).
    pub fn throttle_resume(&self) {
        if self.life.state() == RunState::Running {
            let _ = self.main.resume();
        }
    }

    /// Records the SEV launch measurement (for `query-sev-launch-measure`).
    pub fn set_sev_measurement(&mut self, measurement: Vec<u8>) {
        self.sev_measurement = Some(measurement);
    }

    /// Starts only the mirror vCPUs (an incoming VM waits for its state).
    pub fn start_mirror(&mut self) -> Result<(), VcpuError> {
        if !self.mirror_started {
            self.mirror.resume()?;
            self.mirror_started = true;
        }
        Ok(())
    }

    /// Runs mirror vCPU `index` on host CPU `cpu` only.
    pub fn pin_mirror(&self, index: usize, cpu: usize) -> Result<(), VcpuError> {
        match self.mirror.handles().get(index) {
            Some(h) => h.pin(cpu),
            None => Err(VcpuError::Gone(format!("mirror {index}"))),
        }
    }

    /// Starts both groups for the first time (only the mirror for an
    /// incoming VM, and only the mirror if the guest is to wait for `cont`).
    pub fn start(&mut self) -> Result<(), ControlError> {
        let began = std::time::Instant::now();
        self.start_mirror()?;
        self.go(Transition::Start)?;
        match self.life.state() {
            RunState::InMigrate => {
                log::debug!("Started the mirror vCPUs; the guest waits for its migration")
            }
            RunState::Prelaunch => {
                log::debug!("Started the mirror vCPUs; the guest waits for cont")
            }
            _ => log::debug!(
                "Started {} main and {} mirror vCPUs in {:?}",
                self.main.handles().len(),
                self.mirror.handles().len(),
                began.elapsed()
            ),
        }
        Ok(())
    }

    /// The run state.
    pub fn state(&self) -> RunState {
        self.life.state()
    }

    /// Pauses the main vCPUs only; the mirror keeps running.
    pub fn stop(&mut self) -> Result<(), ControlError> {
        self.go(Transition::Stop)
    }

    /// Resumes the main vCPUs (starts them, from `prelaunch`).
    pub fn cont(&mut self) -> Result<(), ControlError> {
        self.go(Transition::Cont)
    }

    /// [`Controller::cont`], also after a migration whose outcome is
    /// unknown (the operator knows the guest does not run elsewhere).
    pub fn force_cont(&mut self) -> Result<(), ControlError> {
        self.go(Transition::ForceCont)
    }

    /// The main vCPU group.
    pub fn main_vcpus(&self) -> &VcpuGroup {
        &self.main
    }

    /// What every mirror vCPU last published: for the counting payload its
    /// loop counter and probe word; for the migration helper its idle
    /// wake-ups (heartbeat) and no probe.
    pub fn mirror_info(&self) -> Vec<MirrorInfo> {
        self.mirror
            .handles()
            .iter()
            .map(|h| {
                let i = h.index();
                let (counter, probe) = match &self.helper {
                    Some(header) => (mirror::helper_heartbeat(&self.memory, header, i), 0),
                    None => {
                        let s = mirror::read_status(&self.memory, i);
                        (s.counter, s.probe_value)
                    }
                };
                MirrorInfo {
                    index: i,
                    payload: if self.helper.is_some() {
                        MirrorPayload::Helper
                    } else {
                        MirrorPayload::Counter
                    },
                    counter,
                    probe,
                    thread_id: h.thread_id(),
                    fault: self.links.fault(i),
                }
            })
            .collect()
    }

    /// The VMM is shutting down: the run state stays as it is (a stopped
    /// migration does not resume the guest), the migration under way (if
    /// any) is asked to stop, and the worker threads are handed over to
    /// join: the caller joins them without holding the controller, which a
    /// worker takes to finish.
    pub fn take_workers(&mut self) -> Vec<JoinHandle<()>> {
        self.closing = true;
        if let Some(job) = &self.migration {
            if job.is_active() {
                job.stop();
            }
        }
        std::mem::take(&mut self.workers)
    }

    /// Ends every vCPU thread (mirror last, so it outlives the guest).
    pub fn shutdown(&mut self) {
        std::mem::take(&mut self.main).finish();
        std::mem::take(&mut self.mirror).finish();
    }

    /// The main vCPUs, as `query-cpus-fast` lists them.
    fn cpus(&self) -> Vec<CpuInfo> {
        self.main
            .handles()
            .iter()
            .map(|h| CpuInfo {
                index: h.index(),
                thread_id: h.thread_id(),
            })
            .collect()
    }

    /// Runs one command of the control API.
    pub fn execute(&mut self, command: Command) -> Result<Reply, ControlError> {
        match command {
            Command::QueryStatus => Ok(Reply::Status(self.life.state())),
            Command::Stop => self.stop().map(|()| Reply::Done),
            Command::Cont { force: false } => self.cont().map(|()| Reply::Done),
            Command::Cont { force: true } => self.force_cont().map(|()| Reply::Done),
            Command::Quit => {
                self.exit.request(ExitReason::Quit);
                Ok(Reply::Done)
            }
            // No ACPI here: powering down is powering off.
            Command::SystemPowerdown => {
                self.exit.request(ExitReason::HostPowerdown);
                Ok(Reply::Done)
            }
            Command::QueryCpus => Ok(Reply::Cpus(self.cpus())),
            Command::QueryMirror => Ok(Reply::Mirror(self.mirror_info())),
            Command::QuerySevLaunchMeasure => match &self.sev_measurement {
                Some(m) => Ok(Reply::SevMeasurement(m.clone())),
                None => Err(ControlError::Unavailable("SEV is not enabled for this VM")),
            },
            Command::Migrate { uri, force } => self.migrate(uri, force),
            Command::MigrateIncoming { uri } => self.migrate_incoming(&uri),
            Command::MigrateCancel => {
                self.cancel_migration();
                Ok(Reply::Done)
            }
            Command::QueryMigrate => {
                Ok(Reply::Migration(self.migration.as_ref().map(|m| m.info())))
            }
            Command::QueryRamDigest => self.ram_digest(),
            Command::MigrateSetParameters(change) => self.set_params(change),
            Command::MigrateSetCapabilities(caps) => {
                if self.migration_running() {
                    return Err(ControlError::MigrationInProgress);
                }
                for (name, on) in &caps {
                    if let (CapabilityName::Other(name), true) = (name, on) {
                        return Err(ControlError::UnknownCapability(name.clone()));
                    }
                }
                for (name, on) in caps {
                    if name == CapabilityName::Known(Capability::AutoConverge) {
                        self.params.auto_converge = on;
                    }
                }
                Ok(Reply::Done)
            }
            // Events are always sent.
            Command::QueryMigrateCapabilities => Ok(Reply::Capabilities(vec![
                (Capability::AutoConverge, self.params.auto_converge),
                (Capability::Events, true),
            ])),
            Command::QueryMigrateParameters => Ok(Reply::MigrationParameters(Params {
                helpers: self.params.helpers.min(self.mirror.handles().len()),
                ..self.params
            })),
        }
    }

    /// `migrate-set-parameters`: every value checked before any is taken.
    fn set_params(&mut self, change: ParamsChange) -> Result<Reply, ControlError> {
        let running = self.migration_running();
        if running && (change.helpers.is_some() || change.batch.is_some()) {
            return Err(ControlError::FixedWhileMigrating);
        }
        let helpers = self.mirror.handles().len();
        let bad = |name, expects| Err(ControlError::InvalidParameter { name, expects });
        let mut next = self.params;
        if let Some(ms) = change.downtime_limit_ms {
            if ms > MAX_DOWNTIME_LIMIT_MS {
                return bad(
                    "downtime-limit",
                    format!("a number of milliseconds from 0 to {MAX_DOWNTIME_LIMIT_MS}"),
                );
            }
            next.downtime_limit = std::time::Duration::from_millis(ms);
        }
        if let Some(b) = change.max_bandwidth {
            next.max_bandwidth = b;
        }
        if let Some(h) = change.helpers {
            match usize::try_from(h) {
                Ok(h) if (1..=helpers).contains(&h) => next.helpers = h,
                _ => return bad("x-helpers", format!("1 to {helpers} (this VM's helpers)")),
            }
        }
        if let Some(b) = change.batch {
            let max = cgsvmm_migration::source::PAGES_PER_FRAME;
            match usize::try_from(b) {
                Ok(b) if (1..=max).contains(&b) => next.batch = b,
                _ => return bad("x-batch", format!("1 to {max} pages")),
            }
        }
        if let Some(on) = change.auto_converge {
            next.auto_converge = on;
        }
        self.params = next;
        // The migration under way takes the new limits at its next round.
        if let (true, Some(job)) = (running, &self.migration) {
            let ms = u64::try_from(next.downtime_limit.as_millis()).unwrap_or(u64::MAX);
            job.progress
                .downtime_limit_ms
                .store(ms, std::sync::atomic::Ordering::Relaxed);
            job.progress
                .max_bandwidth
                .store(next.max_bandwidth, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Reply::Done)
    }

    /// Events raised since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<TimedEvent> {
        std::mem::take(&mut self.events)
    }

    fn migrator(&self) -> Result<Arc<dyn Migrator>, ControlError> {
        self.migrator
            .as_ref()
            .and_then(Weak::upgrade)
            .ok_or(ControlError::Unavailable("This VM cannot be migrated"))
    }

    fn migration_running(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| m.is_active())
    }

    /// Keeps a new worker. Earlier ones whose threads have ended are
    /// joined now; one still reporting its end (it takes this controller's
    /// lock to do so) is kept for [`Controller::take_workers`].
    fn keep(&mut self, worker: Worker) {
        let (ended, finishing): (Vec<_>, Vec<_>) = std::mem::take(&mut self.workers)
            .into_iter()
            .partition(JoinHandle::is_finished);
        for t in ended {
            let _ = t.join();
        }
        self.workers = finishing;
        self.workers.extend(worker.thread);
        self.migration = Some(worker.job);
    }

    fn migrate(&mut self, uri: Uri, force: bool) -> Result<Reply, ControlError> {
        if self.helper.is_none() {
            return Err(ControlError::Unavailable(
                "This VM runs no migration helper, so its private pages cannot leave it: \
                 start it with --transport-key-file (or --confidential sev)",
            ));
        }
        if self.closing {
            return Err(ControlError::ShuttingDown);
        }
        if self.migration_running() {
            return Err(ControlError::MigrationInProgress);
        }
        self.life.may_migrate(force)?;
        if let Uri::File(path) = &uri {
            if path.exists() {
                return Err(ControlError::SnapshotExists(path.clone()));
            }
        }
        let worker = self.migrator()?.outgoing(uri, self.params);
        self.keep(worker);
        Ok(Reply::Done)
    }

    fn migrate_incoming(&mut self, uri: &Uri) -> Result<Reply, ControlError> {
        match &self.incoming {
            Some(Incoming::Defer) => {}
            Some(Incoming::Uri(u)) => {
                return Err(ControlError::WrongState(format!(
                    "migrate-incoming is for use with '--incoming defer'; this VM waits on {u}"
                )))
            }
            None => {
                return Err(ControlError::WrongState(
                    "migrate-incoming is for use with '--incoming defer'; this VM was not \
                     started to receive a migration"
                        .into(),
                ))
            }
        }
        if self.migration.is_some() {
            return Err(ControlError::WrongState(
                "The incoming migration has already been started".into(),
            ));
        }
        self.start_incoming(uri)?;
        Ok(Reply::Done)
    }

    /// Starts listening for the migration `--incoming URI` (or
    /// `migrate-incoming`) named.
    pub fn start_incoming(&mut self, uri: &Uri) -> Result<(), StartError> {
        if self.closing {
            return Err(StartError::NoLink);
        }
        let migrator = self
            .migrator
            .as_ref()
            .and_then(Weak::upgrade)
            .ok_or(StartError::NoLink)?;
        let worker = migrator.incoming(uri, self.mirror.handles().len())?;
        self.keep(worker);
        Ok(())
    }

    /// Cancels an outgoing migration in progress (a no-op otherwise, as in
    /// QEMU).
    pub fn cancel_migration(&self) {
        if let Some(job) = &self.migration {
            if job.is_active() {
                job.cancel();
            }
        }
    }

    fn ram_digest(&self) -> Result<Reply, ControlError> {
        if self.sev_measurement.is_some() {
            return Err(ControlError::Unavailable(
                "x-query-ram-digest reads guest memory, which SEV keeps from the host",
            ));
        }
        Ok(Reply::RamDigest(self.memory.ram_digest()))
    }
}
