//! What the control API can do to a running VM: the run state (QEMU's
//! names: running, paused, inmigrate, finish-migrate, postmigrate), pausing
//! and resuming the main vCPUs while the mirror vCPUs keep running,
//! quitting, migrating (the work runs in a worker, `migration_link.rs`; the
//! controller only starts, cancels and reports it), and the queries. It
//! executes typed [`Command`]s and answers typed [`Reply`]s and [`Event`]s;
//! QMP (`qmp::commands`) translates JSON to and from them, and tests drive
//! it directly.

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use vmm_sys_util::eventfd::EventFd;

use cgsvmm_fw_abi::helper::HelperHeader;
use cgsvmm_migration::helper::HelperLink;
use cgsvmm_migration::source::Params;
use cgsvmm_migration::transport::Uri;

use crate::config::Incoming;
use crate::exit::{ExitHandle, ExitReason};
use crate::helper_link::HelperLinks;
use crate::memory::Memory;
use crate::migration_link::{self, MigrationInfo, MigrationJob, MigrationStatus, VmLink};
use crate::mirror;
use crate::vcpu::{VcpuError, VcpuGroup};

/// What the control API can be asked (QMP's commands, typed; `qmp` turns
/// JSON into these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The run state.
    QueryStatus,
    /// Pause the main vCPUs.
    Stop,
    /// Resume them.
    Cont,
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
    /// QEMU's migration capabilities: (name, on).
    MigrateSetCapabilities(Vec<(String, bool)>),
    /// Their states.
    QueryMigrateCapabilities,
}

/// The capabilities `migrate-set-capabilities` knows; any other may only be
/// turned off (it is not there to turn on).
pub const CAPABILITIES: [&str; 2] = ["auto-converge", "events"];

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
    Capabilities(Vec<(&'static str, bool)>),
}

/// A command that could not be done, and why (for the operator).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ControlError(pub String);

impl From<VcpuError> for ControlError {
    fn from(e: VcpuError) -> Self {
        ControlError(e.to_string())
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

/// The VM's run state, as `query-status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Main vCPUs run.
    Running,
    /// Main vCPUs are paused (`stop`).
    Paused,
    /// Waiting for (or receiving) an incoming migration; the main vCPUs
    /// have never run.
    InMigrate,
    /// Paused to be migrated.
    FinishMigrate,
    /// Migrated away: the guest runs on the target now.
    PostMigrate,
    /// Built, never run: waits for `cont` (`--paused` without
    /// `--incoming`, QEMU's `-S`).
    Prelaunch,
}

impl RunState {
    /// QEMU's RunState name.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
            RunState::Prelaunch => "prelaunch",
        }
    }
}

/// One mirror vCPU, as the debug query reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorInfo {
    /// Mirror vCPU index.
    pub index: usize,
    /// What runs there: "counter" or "helper".
    pub payload: &'static str,
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
    state: RunState,
    mirror_started: bool,
    /// Events raised, with the time they were.
    events: Vec<TimedEvent>,
    helper: Option<HelperHeader>,
    links: Arc<HelperLinks>,
    sev_measurement: Option<Vec<u8>>,
    /// Woken whenever an event is raised (the QMP server sends it then).
    event_wake: Option<EventFd>,
    /// What migration reaches the VM through.
    link: Weak<VmLink>,
    /// The last (or current) outgoing or incoming migration.
    migration: Option<Arc<MigrationJob>>,
    /// How this VM was built to receive a migration, if it was.
    incoming: Option<Incoming>,
    /// Run the guest once it arrives (cleared by `--paused` or `stop`).
    autostart: bool,
    /// The state before an outgoing migration paused the guest.
    before_migration: RunState,
    /// Whether the incoming guest ran on its source (it runs on here only
    /// then, as in QEMU).
    source_running: bool,
    /// The last outgoing migration was a snapshot (the guest may go on).
    snapshotted: bool,
    /// How the next migration goes.
    params: Params,
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
            state: RunState::Paused,
            mirror_started: false,
            events: Vec::new(),
            helper,
            links,
            sev_measurement: None,
            event_wake: None,
            link: Weak::new(),
            migration: None,
            incoming: None,
            autostart: true,
            before_migration: RunState::Paused,
            source_running: true,
            snapshotted: false,
            params: Params::default(),
        }
    }

    /// Wires the controller to migration: the VM link, how the VM was
    /// built (for incoming), whether the guest starts on its own, and the
    /// eventfd to write when events are raised.
    pub fn configure(
        &mut self,
        link: Option<&Arc<VmLink>>,
        incoming: Option<Incoming>,
        autostart: bool,
        event_wake: Option<EventFd>,
    ) {
        if let Some(link) = link {
            self.link = Arc::downgrade(link);
        }
        if incoming.is_some() {
            self.state = RunState::InMigrate;
        }
        self.incoming = incoming;
        self.autostart = autostart;
        self.event_wake = event_wake;
    }

    /// Queues an event for the QMP clients and wakes the server.
    pub fn raise(&mut self, event: Event) {
        self.events.push((event, SystemTime::now()));
        if let Some(wake) = &self.event_wake {
            let _ = wake.write(1);
        }
    }

    /// Sets the run state (migration steps).
    pub fn set_state(&mut self, state: RunState) {
        self.state = state;
    }

    /// Pauses the main vCPUs for an outgoing migration; whether they ran.
    pub fn pause_for_migration(&mut self) -> Result<bool, VcpuError> {
        let was = self.state;
        if was == RunState::Running {
            self.main.pause()?;
            self.raise(Event::Stop);
        }
        self.before_migration = was;
        self.state = RunState::FinishMigrate;
        Ok(was == RunState::Running)
    }

    /// Whether the guest ran when the current outgoing migration paused it.
    pub fn ran_before_migration(&self) -> bool {
        self.before_migration == RunState::Running
    }

    /// Records whether the arriving guest ran on its source.
    pub fn set_source_running(&mut self, running: bool) {
        self.source_running = running;
    }

    /// An outgoing migration completed: the guest runs elsewhere now
    /// (`postmigrate`); after a snapshot it may also go on here.
    pub fn finish_outgoing(&mut self, snapshot: bool) {
        self.state = RunState::PostMigrate;
        self.snapshotted = snapshot;
    }

    /// Undoes [`Controller::pause_for_migration`] after a failure.
    pub fn resume_after_migration(&mut self) -> Result<(), VcpuError> {
        if self.before_migration == RunState::Running {
            self.main.resume()?;
            self.raise(Event::Resume);
        }
        self.state = self.before_migration;
        Ok(())
    }

    /// An incoming migration arrived and verified: the guest runs, or
    /// stays paused if it was told to.
    pub fn finish_incoming(&mut self) -> Result<(), VcpuError> {
        if self.autostart && self.source_running {
            self.main.resume()?;
            self.state = RunState::Running;
            self.raise(Event::Resume);
        } else {
            self.state = RunState::Paused;
        }
        Ok(())
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
    pub fn start(&mut self) -> Result<(), VcpuError> {
        let began = std::time::Instant::now();
        self.start_mirror()?;
        if self.state == RunState::InMigrate {
            log::debug!("Started the mirror vCPUs; the guest waits for its migration");
            return Ok(());
        }
        if !self.autostart {
            self.state = RunState::Prelaunch;
            return Ok(());
        }
        self.main.resume()?;
        self.state = RunState::Running;
        log::debug!(
            "Started {} main and {} mirror vCPUs in {:?}",
            self.main.handles().len(),
            self.mirror.handles().len(),
            began.elapsed()
        );
        Ok(())
    }

    /// The run state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Pauses the main vCPUs only; the mirror keeps running.
    pub fn stop(&mut self) -> Result<(), VcpuError> {
        if self.state == RunState::Running {
            let began = std::time::Instant::now();
            self.main.pause()?;
            log::debug!(
                "Paused the main vCPUs in {:?} (the mirror runs on)",
                began.elapsed()
            );
            self.state = RunState::Paused;
            self.raise(Event::Stop);
        }
        Ok(())
    }

    /// Resumes the main vCPUs (starts them, from `prelaunch`).
    pub fn cont(&mut self) -> Result<(), VcpuError> {
        if matches!(self.state, RunState::Paused | RunState::Prelaunch) {
            let began = std::time::Instant::now();
            self.main.resume()?;
            log::debug!("Resumed the main vCPUs in {:?}", began.elapsed());
            self.state = RunState::Running;
            self.raise(Event::Resume);
        }
        Ok(())
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
                        "helper"
                    } else {
                        "counter"
                    },
                    counter,
                    probe,
                    thread_id: h.thread_id(),
                    fault: self.links.fault(i),
                }
            })
            .collect()
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
            Command::QueryStatus => Ok(Reply::Status(self.state)),
            Command::Stop => self.stop_command(),
            Command::Cont => self.cont_command(),
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
                None => Err(ControlError("SEV is not enabled for this VM".into())),
            },
            Command::Migrate { uri } => self.migrate(uri),
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
                    return Err(ControlError(
                        "There's a migration process in progress".into(),
                    ));
                }
                for (name, on) in &caps {
                    if *on && !CAPABILITIES.contains(&name.as_str()) {
                        return Err(ControlError(format!(
                            "Capability '{name}' is not supported by cgsvmm"
                        )));
                    }
                }
                for (name, on) in caps {
                    if name == "auto-converge" {
                        self.params.auto_converge = on;
                    }
                }
                Ok(Reply::Done)
            }
            // Events are always sent.
            Command::QueryMigrateCapabilities => Ok(Reply::Capabilities(vec![
                ("auto-converge", self.params.auto_converge),
                ("events", true),
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
            return Err(ControlError(
                "A migration is in progress: only downtime-limit and max-bandwidth change \
                 while it runs (cancel it to change the others)"
                    .into(),
            ));
        }
        let helpers = self.mirror.handles().len() as u64;
        let bad = |name: &str, range: String| {
            Err(ControlError(format!("Parameter '{name}' expects {range}")))
        };
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
            if !(1..=helpers).contains(&h) {
                return bad("x-helpers", format!("1 to {helpers} (this VM's helpers)"));
            }
            next.helpers = h as usize;
        }
        if let Some(b) = change.batch {
            let max = cgsvmm_migration::source::PAGES_PER_FRAME as u64;
            if !(1..=max).contains(&b) {
                return bad("x-batch", format!("1 to {max} pages"));
            }
            next.batch = b as usize;
        }
        if let Some(on) = change.auto_converge {
            next.auto_converge = on;
        }
        self.params = next;
        // The migration under way takes the new limits at its next round.
        if let (true, Some(job)) = (running, &self.migration) {
            job.progress.downtime_limit_ms.store(
                next.downtime_limit.as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
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

    /// `stop`: pauses a running guest; a guest still arriving will wait for
    /// `cont` once it is here.
    fn stop_command(&mut self) -> Result<Reply, ControlError> {
        match self.state {
            RunState::InMigrate => self.autostart = false,
            RunState::FinishMigrate => {
                return Err(ControlError("The guest is being migrated".into()))
            }
            _ => self.stop()?,
        }
        Ok(Reply::Done)
    }

    /// `cont`: resumes a paused guest; refused while it is migrated away.
    fn cont_command(&mut self) -> Result<Reply, ControlError> {
        match self.state {
            RunState::InMigrate => self.autostart = true,
            RunState::FinishMigrate => {
                return Err(ControlError(
                    "The guest is being migrated; it resumes here if the migration fails".into(),
                ))
            }
            // A snapshot leaves no other copy running: the guest may go on.
            RunState::PostMigrate if self.snapshotted => {
                self.state = RunState::Paused;
                self.cont()?;
            }
            RunState::PostMigrate => {
                return Err(ControlError(
                    "The guest was migrated and runs on the target; it cannot resume here".into(),
                ))
            }
            _ => self.cont()?,
        }
        Ok(Reply::Done)
    }

    fn link(&self) -> Result<Arc<VmLink>, ControlError> {
        self.link
            .upgrade()
            .ok_or_else(|| ControlError("This VM cannot be migrated".into()))
    }

    fn migration_running(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| m.is_active())
    }

    fn migrate(&mut self, uri: Uri) -> Result<Reply, ControlError> {
        if self.helper.is_none() {
            return Err(ControlError(
                "This VM runs no migration helper, so its private pages cannot leave it: \
                 start it with --transport-key-file (or --confidential sev)"
                    .into(),
            ));
        }
        if self.migration_running() {
            return Err(ControlError(
                "There's a migration process in progress".into(),
            ));
        }
        match self.state {
            RunState::Running | RunState::Paused | RunState::Prelaunch => {}
            RunState::PostMigrate if self.snapshotted => {}
            s => {
                return Err(ControlError(format!(
                    "The VM cannot be migrated while it is {}",
                    s.name()
                )))
            }
        }
        if let Uri::File(path) = &uri {
            if path.exists() {
                return Err(ControlError(format!(
                    "{} exists: cgsvmm never overwrites a snapshot; remove it or choose \
                     another name",
                    path.display()
                )));
            }
        }
        let job = migration_link::start_outgoing(self.link()?, uri, self.params);
        self.migration = Some(job);
        Ok(Reply::Done)
    }

    fn migrate_incoming(&mut self, uri: &Uri) -> Result<Reply, ControlError> {
        match &self.incoming {
            Some(Incoming::Defer) => {}
            Some(Incoming::Uri(u)) => {
                return Err(ControlError(format!(
                    "migrate-incoming is for use with '--incoming defer'; this VM waits on {u}"
                )))
            }
            None => {
                return Err(ControlError(
                    "migrate-incoming is for use with '--incoming defer'; this VM was not \
                     started to receive a migration"
                        .into(),
                ))
            }
        }
        if self.migration.is_some() {
            return Err(ControlError(
                "The incoming migration has already been started".into(),
            ));
        }
        self.start_incoming(uri)
            .map_err(|e| ControlError(e.to_string()))?;
        Ok(Reply::Done)
    }

    /// Starts listening for the migration `--incoming URI` (or
    /// `migrate-incoming`) named.
    pub fn start_incoming(&mut self, uri: &Uri) -> Result<(), migration_link::LinkError> {
        let link = self
            .link
            .upgrade()
            .ok_or(migration_link::LinkError::NoLink)?;
        self.migration = Some(migration_link::start_incoming(
            link,
            uri,
            self.mirror.handles().len(),
        )?);
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
            return Err(ControlError(
                "x-query-ram-digest reads guest memory, which SEV keeps from the host".into(),
            ));
        }
        Ok(Reply::RamDigest(migration_link::ram_digest(&self.memory)))
    }
}
