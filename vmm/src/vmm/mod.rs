//! The VMM: builds a VM from a [`VmmConfig`] and runs its event loop.
//!
//! `Vmm::try_from(config)` validates the config and builds the VM in the
//! named steps of `builder`: for boot (the payload is loaded) or for an
//! incoming migration (nothing loaded; the vCPUs wait for their state);
//! every vCPU thread starts paused. [`Vmm::run`] starts the vCPUs and
//! serves the event loop (QMP, serial input, signals) until something asks
//! the VM to stop, then tears the vCPUs down and returns why it stopped.

mod builder;

use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VmFd};
use serde_json::json;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use cgsvmm_devices::serial::SerialDevice;
use cgsvmm_fw_abi::helper::HelperHeader;
use cgsvmm_migration::helper::{HelperClient, HelperLink};

use crate::boot::firmware::Firmware;
use crate::boot::BootError;
use crate::confidential::sev::SevError;
use crate::config::{ConfigError, Incoming, SerialConfig, VmmConfig};
use crate::control::Controller;
use crate::machine::devices::DeviceError;
use crate::machine::exit::{ExitHandle, ExitReason};
use crate::machine::helper_link::HelperLinks;
use crate::memory::{Memory, MemoryError};
use crate::migration::VmLink;
use crate::qmp::{QmpServer, QmpServerError};
use builder::Machine;

/// How long queued QMP output (the SHUTDOWN event) may take to leave at
/// exit.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_millis(200);
use crate::machine::vcpu::VcpuError;
use crate::machine::vm::VmError;

/// How often the event loop wakes up without events (to notice a stop).
const LOOP_TIMEOUT_MS: i32 = 100;

/// Errors of building or running a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is impossible.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A KVM VM could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Devices could not be set up.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The boot payload could not be put in place.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU threads failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The QMP socket could not be opened.
    #[error(transparent)]
    Qmp(#[from] QmpServerError),
    /// The event loop failed.
    #[error("Event loop: {0:?}")]
    EventLoop(event_manager::Error),
    /// An eventfd or signal handler could not be set up.
    #[error("Cannot set up {0}: {1}")]
    Setup(&'static str, std::io::Error),
    /// The SEV backend failed.
    #[error(transparent)]
    Sev(#[from] SevError),
    /// The control API refused or failed.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The incoming migration could not start.
    #[error(transparent)]
    Incoming(#[from] crate::control::job::StartError),
}

/// A built VM, vCPUs created and paused.
pub struct Vmm {
    // Fields drop in this order, after `Drop` joined every thread: the
    // VMs (and what holds them) before the memory they were created over.
    pub(crate) controller: Arc<Mutex<Controller>>,
    /// What migration reaches this VM through (with a helper only).
    pub(crate) link: Option<Arc<VmLink>>,
    pub(crate) _main_vm: Arc<VmFd>,
    pub(crate) _mirror_vm: VmFd,
    pub(crate) config: VmmConfig,
    pub(crate) memory: Arc<Memory>,
    pub(crate) exit: ExitHandle,
    pub(crate) serial: Arc<SerialDevice>,
    pub(crate) links: Arc<HelperLinks>,
    pub(crate) helper_header: Option<HelperHeader>,
    pub(crate) tsc_khz: u64,
    /// Written when the controller raises an event (QMP sends it then).
    pub(crate) event_wake: EventFd,
    /// The thread backing an incoming guest's RAM, until joined, and what
    /// tells it to stop.
    pub(crate) prefault: Mutex<Option<(std::thread::JoinHandle<()>, Arc<AtomicBool>)>>,
    pub(crate) _firmware: Option<Arc<Firmware>>,
    pub(crate) _kvm: Kvm,
}

impl TryFrom<VmmConfig> for Vmm {
    type Error = VmmError;

    /// Builds the VM the configuration asks for: to boot (the payload is
    /// loaded and the vCPUs get their first state) or to receive a
    /// migration (nothing loaded; the vCPUs wait for their state). Both
    /// share every other step (`builder`).
    fn try_from(config: VmmConfig) -> Result<Self, VmmError> {
        config.validate()?;
        let machine = Machine::new(config)?;
        if machine.config.incoming.is_some() {
            let boots = machine.incoming_vcpus();
            machine.finish(boots, false)
        } else {
            let boots = machine.load_boot_payload()?;
            machine.finish(boots, true)
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The eventfd SIGINT/SIGTERM write to, and the last signal seen.
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn handle_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Turns the exit request and stop signals into loop wake-ups.
struct StopWatcher {
    exit: ExitHandle,
    exit_evt: EventFd,
    signal_evt: EventFd,
}

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in [&self.exit_evt, &self.signal_evt] {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("Cannot watch stop events: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.signal_evt.as_raw_fd() {
            let _ = self.signal_evt.read();
            self.exit
                .request(ExitReason::Signal(LAST_SIGNAL.load(Ordering::SeqCst)));
        } else {
            let _ = self.exit_evt.read();
        }
    }
}

/// Forwards stdin to the guest's serial port.
struct SerialInput {
    serial: Arc<SerialDevice>,
    stdin: std::io::Stdin,
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.stdin, EventSet::IN)) {
            log::debug!("Not reading stdin: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match self.stdin.lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = ops.remove(Events::new(&self.stdin, EventSet::IN));
            }
            Ok(n) => {
                let taken = self.serial.enqueue_input(&buf[..n]);
                if taken < n {
                    log::warn!("Serial input FIFO full: dropped {} bytes", n - taken);
                }
            }
        }
    }
}

impl Vmm {
    /// The control API.
    pub fn controller(&self) -> Arc<Mutex<Controller>> {
        self.controller.clone()
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    /// What migration reaches this VM through (None without a helper).
    pub fn migration_link(&self) -> Option<&Arc<VmLink>> {
        self.link.as_ref()
    }

    /// Where stop requests go.
    pub fn exit_handle(&self) -> &ExitHandle {
        &self.exit
    }

    /// A client for migration helper `index` (None without a helper or past
    /// the helper count), failing any request after `timeout`.
    pub fn helper_client(&self, index: usize, timeout: Duration) -> Option<HelperClient> {
        let header = self.helper_header.as_ref()?;
        if index >= self.config.mirror_cpus {
            return None;
        }
        let mailbox = header.mailbox_gpa + index as u64 * header.mailbox_stride;
        let link: Arc<dyn HelperLink> = self.links.clone();
        Some(HelperClient::new(
            self.memory.mirror.clone(),
            mailbox,
            index,
            link,
            timeout,
        ))
    }

    /// The guest's TSC rate in kHz (the helpers count cycles in it).
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    /// Starts only the mirror vCPUs: an incoming VM's helper runs while its
    /// guest has not started.
    pub fn start_mirror(&self) -> Result<(), VmmError> {
        Ok(self
            .controller
            .lock()
            .expect("controller lock poisoned")
            .start_mirror()?)
    }

    /// Runs mirror vCPU `index` on host CPU `cpu` only.
    pub fn pin_mirror(&self, index: usize, cpu: usize) -> Result<(), VmmError> {
        Ok(self
            .controller
            .lock()
            .expect("controller lock poisoned")
            .pin_mirror(index, cpu)?)
    }

    /// Starts the mirror and the main vCPUs.
    pub fn start(&self) -> Result<(), VmmError> {
        Ok(self
            .controller
            .lock()
            .expect("controller lock poisoned")
            .start()?)
    }

    /// Stops and joins every thread the VM runs: the migration workers
    /// (asked to stop, and joined without the controller's lock, which
    /// they take to finish), the vCPUs, the prefault. Idempotent; dropping
    /// the `Vmm` does it too, so it goes on past a poisoned lock (a panic
    /// elsewhere) rather than panic again while unwinding.
    pub fn shutdown(&self) {
        // The prefault stops first: it would only delay the joins below.
        let prefault = self
            .prefault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((_, stop)) = &prefault {
            stop.store(true, Ordering::Relaxed);
        }
        let workers = self
            .controller
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take_workers();
        for worker in workers {
            if worker.join().is_err() {
                log::error!("A migration worker panicked");
            }
        }
        self.controller
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shutdown();
        if let Some((t, _)) = prefault {
            let _ = t.join();
        }
    }

    /// Starts the VM and serves the event loop until it stops; returns why.
    pub fn run(self) -> Result<ExitReason, VmmError> {
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(VmmError::EventLoop)?;
        let signal_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Setup("signal eventfd", e))?;
        SIGNAL_FD.store(signal_evt.as_raw_fd(), Ordering::SeqCst);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            register_signal_handler(sig, handle_stop_signal)
                .map_err(|e| VmmError::Setup("signal handler", e.into()))?;
        }
        let exit_evt = self
            .exit
            .event()
            .try_clone()
            .map_err(|e| VmmError::Setup("exit eventfd", e))?;
        manager.add_subscriber(Arc::new(Mutex::new(StopWatcher {
            exit: self.exit.clone(),
            exit_evt,
            signal_evt,
        })));
        if self.config.serial == SerialConfig::Stdio {
            manager.add_subscriber(Arc::new(Mutex::new(SerialInput {
                serial: self.serial.clone(),
                stdin: std::io::stdin(),
            })));
        }
        if let Some(Incoming::Uri(uri)) = &self.config.incoming {
            self.controller
                .lock()
                .expect("controller lock poisoned")
                .start_incoming(uri)?;
        }
        let qmp = match &self.config.qmp {
            Some(path) => {
                let wake = self
                    .event_wake
                    .try_clone()
                    .map_err(|e| VmmError::Setup("event eventfd", e))?;
                let server = QmpServer::bind(path, self.controller.clone())?.with_event_wake(wake);
                let server = Arc::new(Mutex::new(server));
                manager.add_subscriber(server.clone());
                Some(server)
            }
            None => None,
        };

        self.start()?;
        let reason = loop {
            manager
                .run_with_timeout(LOOP_TIMEOUT_MS)
                .map_err(VmmError::EventLoop)?;
            if let Some(reason) = self.exit.reason() {
                break reason;
            }
        };
        if let Some(server) = &qmp {
            let data =
                json!({"guest": reason.guest_initiated(), "reason": reason.shutdown_cause()});
            let mut server = server.lock().expect("qmp lock poisoned");
            server.broadcast("SHUTDOWN", data);
            // The loop is over: send what is queued now, briefly.
            server.drain(SHUTDOWN_DRAIN);
        }
        self.shutdown();
        SIGNAL_FD.store(-1, Ordering::SeqCst);
        Ok(reason)
    }
}
