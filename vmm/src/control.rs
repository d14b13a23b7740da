//! What the control API can do to a running VM: the run state (QEMU's
//! names: running, paused, inmigrate, finish-migrate, postmigrate), pausing
//! and resuming the main vCPUs while the mirror vCPUs keep running,
//! quitting, migrating (the work runs in a worker, `migration_link.rs`; the
//! controller only starts, cancels and reports it), and the queries. QMP
//! (`qmp.rs`) and tests drive it.

use std::sync::{Arc, Weak};

use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::EventFd;

use cgsvmm_fw_abi::helper::HelperHeader;
use cgsvmm_migration::helper::HelperLink;

use crate::config::Incoming;
use crate::exit::{ExitHandle, ExitReason};
use crate::helper_link::HelperLinks;
use crate::memory::Memory;
use crate::migration_link::{self, MigrationJob, VmLink};
use crate::mirror;
use crate::qmp::{no_args, QmpBackend, QmpError};
use crate::vcpu::{VcpuError, VcpuGroup};

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
    /// Events raised, timestamped as they were (QMP event messages).
    events: Vec<Value>,
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
}

/// The commands the backend knows (for `query-commands`).
const COMMANDS: [&str; 16] = [
    "qmp_capabilities",
    "query-status",
    "stop",
    "cont",
    "quit",
    "query-cpus-fast",
    "query-version",
    "query-commands",
    "x-query-mirror",
    "system_powerdown",
    "query-sev-launch-measure",
    "migrate",
    "migrate_cancel",
    "query-migrate",
    "migrate-incoming",
    "x-query-ram-digest",
];

/// Commands that take arguments (checked by each).
const WITH_ARGS: [&str; 3] = ["migrate", "migrate-incoming", "migrate_cancel"];

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
    pub fn raise(&mut self, name: &str, data: Value) {
        self.events.push(crate::qmp::event_message(name, data));
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
            self.raise("STOP", json!({}));
        }
        self.before_migration = was;
        self.state = RunState::FinishMigrate;
        Ok(was == RunState::Running)
    }

    /// Undoes [`Controller::pause_for_migration`] after a failure.
    pub fn resume_after_migration(&mut self) -> Result<(), VcpuError> {
        if self.before_migration == RunState::Running {
            self.main.resume()?;
            self.raise("RESUME", json!({}));
        }
        self.state = self.before_migration;
        Ok(())
    }

    /// An incoming migration arrived and verified: the guest runs, or
    /// stays paused if it was told to.
    pub fn finish_incoming(&mut self) -> Result<(), VcpuError> {
        if self.autostart {
            self.main.resume()?;
            self.state = RunState::Running;
            self.raise("RESUME", json!({}));
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
            self.state = RunState::Paused;
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
            self.raise("STOP", json!({}));
        }
        Ok(())
    }

    /// Resumes the main vCPUs.
    pub fn cont(&mut self) -> Result<(), VcpuError> {
        if self.state == RunState::Paused {
            let began = std::time::Instant::now();
            self.main.resume()?;
            log::debug!("Resumed the main vCPUs in {:?}", began.elapsed());
            self.state = RunState::Running;
            self.raise("RESUME", json!({}));
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

    fn cpus_fast(&self) -> Value {
        let cpus: Vec<Value> = self
            .main
            .handles()
            .iter()
            .map(|h| {
                json!({
                    "cpu-index": h.index(),
                    "qom-path": format!("/machine/unattached/device[{}]", h.index()),
                    "thread-id": h.thread_id(),
                    "target": "x86_64",
                    "props": {"socket-id": h.index(), "core-id": 0, "thread-id": 0},
                })
            })
            .collect();
        Value::Array(cpus)
    }
}

fn vcpu_error(e: VcpuError) -> QmpError {
    QmpError::generic(e.to_string())
}

impl Controller {
    /// `stop`: pauses a running guest; a guest still arriving will wait for
    /// `cont` once it is here.
    fn qmp_stop(&mut self) -> Result<Value, QmpError> {
        match self.state {
            RunState::InMigrate => self.autostart = false,
            RunState::FinishMigrate => {
                return Err(QmpError::generic("The guest is being migrated"))
            }
            _ => self.stop().map_err(vcpu_error)?,
        }
        Ok(json!({}))
    }

    /// `cont`: resumes a paused guest; refused while it is migrated away.
    fn qmp_cont(&mut self) -> Result<Value, QmpError> {
        match self.state {
            RunState::InMigrate => {
                self.autostart = true;
                Ok(json!({}))
            }
            RunState::FinishMigrate => Err(QmpError::generic(
                "The guest is being migrated; it resumes here if the migration fails",
            )),
            RunState::PostMigrate => Err(QmpError::generic(
                "The guest was migrated and runs on the target; it cannot resume here",
            )),
            _ => self.cont().map(|_| json!({})).map_err(vcpu_error),
        }
    }

    fn link(&self) -> Result<Arc<VmLink>, QmpError> {
        self.link
            .upgrade()
            .ok_or_else(|| QmpError::generic("This VM cannot be migrated"))
    }

    fn migration_running(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| m.is_active())
    }

    fn qmp_migrate(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let uri = uri_arg(args, &["uri", "detach", "resume", "blk", "inc"])?;
        if self.helper.is_none() {
            return Err(QmpError::generic(
                "This VM runs no migration helper, so its private pages cannot leave it: \
                 start it with --transport-key-file (or --confidential sev)",
            ));
        }
        if self.migration_running() {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        match self.state {
            RunState::Running | RunState::Paused => {}
            s => {
                return Err(QmpError::generic(format!(
                    "The VM cannot be migrated while it is {}",
                    s.name()
                )))
            }
        }
        let job = migration_link::start_outgoing(self.link()?, uri, self.mirror.handles().len());
        self.migration = Some(job);
        Ok(json!({}))
    }

    fn qmp_migrate_incoming(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let uri = uri_arg(args, &["uri", "exit-on-error"])?;
        if self.incoming != Some(Incoming::Defer) {
            return Err(QmpError::generic(
                "'-incoming' was not specified on the command line",
            ));
        }
        if self.migration.is_some() {
            return Err(QmpError::generic(
                "The incoming migration has already been started",
            ));
        }
        let link = self.link()?;
        let job = migration_link::start_incoming(link, &uri, self.mirror.handles().len())
            .map_err(|e| QmpError::generic(e.to_string()))?;
        self.migration = Some(job);
        Ok(json!({}))
    }

    /// Starts listening for the migration `--incoming URI` named.
    pub fn start_incoming(
        &mut self,
        uri: &cgsvmm_migration::transport::Uri,
    ) -> Result<(), migration_link::LinkError> {
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

    /// Cancels an outgoing migration in progress (a no-op otherwise).
    pub fn cancel_migration(&self) {
        if let Some(job) = &self.migration {
            if job.is_active() {
                job.cancel();
            }
        }
    }

    /// The current or last migration.
    pub fn migration(&self) -> Option<&Arc<MigrationJob>> {
        self.migration.as_ref()
    }

    fn ram_digest(&self) -> Result<Value, QmpError> {
        if self.sev_measurement.is_some() {
            return Err(QmpError::generic(
                "x-query-ram-digest reads guest memory, which SEV keeps from the host",
            ));
        }
        Ok(json!({"digest": migration_link::ram_digest(&self.memory)}))
    }
}

/// The `uri` argument (every other argument must be one of `allowed`).
fn uri_arg(
    args: &Map<String, Value>,
    allowed: &[&str],
) -> Result<cgsvmm_migration::transport::Uri, QmpError> {
    if let Some(k) = args.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
    }
    match args.get("uri") {
        Some(Value::String(u)) => {
            u.parse()
                .map_err(|e: cgsvmm_migration::transport::TransportError| {
                    QmpError::generic(e.to_string())
                })
        }
        Some(_) => Err(QmpError::generic(
            "Invalid parameter type for 'uri', expected: string",
        )),
        None => Err(QmpError::generic("Parameter 'uri' is missing")),
    }
}

impl QmpBackend for Controller {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let known = COMMANDS.contains(&command);
        if known && !WITH_ARGS.contains(&command) {
            no_args(args)?;
        }
        match command {
            "query-status" => Ok(
                json!({"status": self.state.name(), "running": self.state == RunState::Running, "singlestep": false}),
            ),
            "stop" => self.qmp_stop(),
            "cont" => self.qmp_cont(),
            "migrate" => self.qmp_migrate(args),
            "migrate-incoming" => self.qmp_migrate_incoming(args),
            "migrate_cancel" => {
                no_args(args)?;
                self.cancel_migration();
                Ok(json!({}))
            }
            "query-migrate" => Ok(self
                .migration
                .as_ref()
                .map_or_else(|| json!({}), |m| m.to_qmp())),
            "x-query-ram-digest" => self.ram_digest(),
            "quit" => {
                self.exit.request(ExitReason::Quit);
                Ok(json!({}))
            }
            // No ACPI here: powering down is powering off.
            "system_powerdown" => {
                self.exit.request(ExitReason::HostPowerdown);
                Ok(json!({}))
            }
            "query-cpus-fast" => Ok(self.cpus_fast()),
            "query-version" => Ok(crate::qmp::greeting()["QMP"]["version"].clone()),
            "query-commands" => Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({"name": c})).collect(),
            )),
            "x-query-mirror" => Ok(Value::Array(
                self.mirror_info()
                    .iter()
                    .map(|m| {
                        json!({"cpu-index": m.index, "payload": m.payload, "counter": m.counter,
                               "probe": m.probe, "thread-id": m.thread_id, "fault": m.fault})
                    })
                    .collect(),
            )),
            "query-sev-launch-measure" => match &self.sev_measurement {
                Some(m) => Ok(json!({"data": crate::confidential::sev::encode_base64(m)})),
                None => Err(QmpError::generic("SEV is not enabled for this VM")),
            },
            _ => Err(QmpError::not_found(format!(
                "The command {command} has not been found"
            ))),
        }
    }

    fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }
}
