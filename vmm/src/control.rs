//! What the control API can do to a running VM: the run state (running or
//! paused), pausing and resuming the main vCPUs while the mirror vCPUs keep
//! running, quitting, and the queries. QMP (`qmp.rs`) and tests drive it.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use cgsvmm_fw_abi::helper::HelperHeader;
use cgsvmm_migration::helper::HelperLink;

use crate::exit::{ExitHandle, ExitReason};
use crate::helper_link::HelperLinks;
use crate::memory::Memory;
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
}

impl RunState {
    /// QEMU's RunState name.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
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
}

/// The commands the backend knows (for `query-commands`).
const COMMANDS: [&str; 11] = [
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
];

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

    /// Starts both groups for the first time.
    pub fn start(&mut self) -> Result<(), VcpuError> {
        let began = std::time::Instant::now();
        self.start_mirror()?;
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
            self.events
                .push(crate::qmp::event_message("STOP", json!({})));
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
            self.events
                .push(crate::qmp::event_message("RESUME", json!({})));
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

impl QmpBackend for Controller {
    fn execute(&mut self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let known = COMMANDS.contains(&command);
        if known {
            no_args(args)?;
        }
        match command {
            "query-status" => Ok(
                json!({"status": self.state.name(), "running": self.state == RunState::Running, "singlestep": false}),
            ),
            "stop" => self.stop().map(|_| json!({})).map_err(vcpu_error),
            "cont" => self.cont().map(|_| json!({})).map_err(vcpu_error),
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
