//! How the migration crate reaches this VMM's VM: [`VmLink`] implements
//! `cgsvmm_migration::MigratableVm` (pause and resume the main vCPUs, save
//! and restore vCPU, VM and device state, guest RAM, the shared map, the
//! helpers), and the workers that run a migration beside the event loop.
//!
//! QMP `migrate` and `migrate-incoming` (or `--incoming URI`) start a
//! worker thread that owns the migration while it runs; the controller
//! keeps a [`MigrationJob`] whose counters `query-migrate` reads without
//! waiting for the worker. The worker takes the controller's lock only for
//! the moments it changes the VM (pause, save, restore, resume).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use cgsvmm_devices::cmos::{Cmos, CmosState};
use cgsvmm_devices::fw_cfg::{FwCfg, FwCfgState};
use cgsvmm_devices::serial::{SerialDevice, SerialState};
use cgsvmm_fw_abi::helper::{HelperHeader, MH_ABI_VERSION};
use cgsvmm_migration::helper::{HelperClient, HelperLink};
use cgsvmm_migration::ranges::SharedMap;
use cgsvmm_migration::source::{self, Cancel, Params};
use cgsvmm_migration::state::{self, ConfigRecord, CpuidEntry, Record, StreamMode};
use cgsvmm_migration::transport::{Listener, TransportError, Uri};
use cgsvmm_migration::{dirty, target, MigratableVm, MigrationError, Progress, SavedState};

use crate::control::{Controller, Event, RunState};
use crate::exit::{ExitHandle, ExitReason};
use crate::helper_link::HelperLinks;
use crate::memory::{slots_of, Memory};
use crate::vm;
use crate::x86::tsc::ClockMoment;

/// Bytes of a page.
const PAGE: u64 = 4096;

/// How long a helper may take to answer one request during a migration.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of starting a migration worker.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The VM is gone.
    #[error("The VM is shutting down")]
    NoLink,
    /// Listening failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The worker thread could not start.
    #[error("Cannot start the migration thread: {0}")]
    Spawn(std::io::Error),
}

/// The devices' state, one record.
#[derive(Serialize, Deserialize)]
pub struct DevicesRecord {
    /// COM1.
    pub serial: SerialState,
    /// CMOS/RTC.
    pub cmos: CmosState,
    /// fw_cfg.
    pub fw_cfg: FwCfgState,
}

impl Record for DevicesRecord {
    const NAME: &'static str = "devices";
    const VERSION: u16 = 1;
    const MAX_LEN: usize = 16 << 10;
}

/// The devices whose state migrates (i8042, the debug and lab ports keep
/// none).
#[derive(Clone)]
pub struct MigratableDevices {
    /// COM1.
    pub serial: Arc<SerialDevice>,
    /// CMOS/RTC.
    pub cmos: Arc<Cmos>,
    /// fw_cfg.
    pub fw_cfg: Arc<FwCfg>,
}

/// What the migration crate sees of this VM.
pub struct VmLink {
    /// The controller (owned by the `Vmm`).
    pub controller: Weak<Mutex<Controller>>,
    /// The main VM.
    pub main_vm: Arc<VmFd>,
    /// Guest memory and the mirror region.
    pub memory: Arc<Memory>,
    /// Where the helpers' mailboxes are.
    pub helper: HelperHeader,
    /// Their doorbells.
    pub links: Arc<HelperLinks>,
    /// Helpers running.
    pub helpers: usize,
    /// Main vCPUs.
    pub vcpus: usize,
    /// "none" or "sev".
    pub backend: &'static str,
    /// The CPUID the vCPUs were given.
    pub cpuid: Vec<CpuidEntry>,
    /// The MSRs each vCPU saves.
    pub msrs: Vec<u32>,
    /// The devices.
    pub devices: MigratableDevices,
    /// The shared/private map.
    pub shared: Arc<Mutex<SharedMap>>,
    /// Where a failed incoming migration ends the process.
    pub exit: ExitHandle,
    /// The throttle thread, while there is one.
    pub throttle: Mutex<Option<Throttle>>,
    /// The KVM clock as the main vCPUs paused for the migration, and its
    /// moment: what [`MigratableVm::save`] saves.
    pub paused_clock: Mutex<Option<(kvm_clock_data, ClockMoment)>>,
}

/// A thread that pauses the main vCPUs part of every period.
pub struct Throttle {
    percent: Arc<AtomicU8>,
    thread: std::thread::JoinHandle<()>,
}

/// The throttle's period: the guest runs (100 - percent)% of it.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);

impl VmLink {
    fn with_controller<T>(
        &self,
        f: impl FnOnce(&mut Controller) -> Result<T, String>,
    ) -> Result<T, String> {
        let controller = self
            .controller
            .upgrade()
            .ok_or_else(|| "the VM is shutting down".to_string())?;
        let mut c = controller.lock().expect("controller lock poisoned");
        f(&mut c)
    }

    fn raise_migration(&self, status: MigrationStatus) {
        let _ = self.with_controller(|c| {
            c.raise(Event::Migration(status));
            Ok(())
        });
    }
}

impl MigratableVm for VmLink {
    fn config(&self, mode: StreamMode) -> ConfigRecord {
        ConfigRecord {
            ram: self.memory.layout.ram_ranges(),
            vcpus: self.vcpus as u32,
            helpers: self.helpers as u32,
            backend: self.backend.to_string(),
            helper_abi: MH_ABI_VERSION,
            cpuid: self.cpuid.clone(),
            msrs: self.msrs.clone(),
            mode,
        }
    }

    fn ram(&self) -> &GuestMemoryMmap {
        &self.memory.ram
    }

    fn ram_ranges(&self) -> Vec<(u64, u64)> {
        self.memory.layout.ram_ranges()
    }

    fn shared_map(&self) -> SharedMap {
        self.shared
            .lock()
            .expect("shared map lock poisoned")
            .clone()
    }

    fn set_shared_map(&self, map: SharedMap) {
        *self.shared.lock().expect("shared map lock poisoned") = map;
    }

    fn helpers(&self) -> Result<Vec<HelperClient>, String> {
        (0..self.helpers)
            .map(|i| {
                let mailbox = self.helper.mailbox_gpa + i as u64 * self.helper.mailbox_stride;
                let link: Arc<dyn HelperLink> = self.links.clone();
                let mut client =
                    HelperClient::new(self.memory.mirror.clone(), mailbox, i, link, HELPER_TIMEOUT);
                client.hello().map_err(|e| e.to_string())?;
                Ok(client)
            })
            .collect()
    }

    fn pause(&self) -> Result<bool, String> {
        let ran = self.with_controller(|c| c.pause_for_migration().map_err(|e| e.to_string()))?;
        // The guest's time stops here, as QEMU's does: the target's clock
        // goes on from this value, so the guest sees no jump over the rest
        // of the downtime.
        // If the clock cannot be read now, `save` reads it then (and fails
        // the migration, which resumes the guest, if it still cannot).
        let clock = vm::read_clock(&self.main_vm)
            .inspect_err(|e| log::warn!("The KVM clock at the pause: {e}"))
            .ok();
        *self.paused_clock.lock().expect("clock lock poisoned") = clock;
        Ok(ran)
    }

    fn resume(&self) -> Result<(), String> {
        self.paused_clock
            .lock()
            .expect("clock lock poisoned")
            .take();
        self.with_controller(|c| c.resume_after_migration().map_err(|e| e.to_string()))
    }

    fn save(&self) -> Result<SavedState, String> {
        let devices = DevicesRecord {
            serial: self.devices.serial.state(),
            cmos: self.devices.cmos.state(),
            fw_cfg: self.devices.fw_cfg.state(),
        };
        // The guest's time as it stopped (or now, for a save without a
        // pause): each vCPU's TSC is saved as of the same moment.
        let paused = self
            .paused_clock
            .lock()
            .expect("clock lock poisoned")
            .take();
        let (clock, moment) = match paused {
            Some(c) => c,
            None => vm::read_clock(&self.main_vm).map_err(|e| e.to_string())?,
        };
        let mut vm_state = vm::save_state(&self.main_vm, clock).map_err(|e| e.to_string())?;
        let (vcpus, running) = self.with_controller(|c| {
            let vcpus = c
                .main_vcpus()
                .save_state(moment)
                .map_err(|e| format!("Cannot save the vCPUs' state: {e}"))?;
            Ok((vcpus, c.ran_before_migration()))
        })?;
        vm_state.running = running;
        Ok(SavedState {
            vm: vm_state,
            vcpus,
            devices: state::encode(&devices).map_err(|e| e.to_string())?,
        })
    }

    fn restore(&self, saved: SavedState) -> Result<(), String> {
        let devices: DevicesRecord = state::decode(&saved.devices).map_err(|e| e.to_string())?;
        let d = &self.devices;
        d.serial
            .restore(&devices.serial)
            .map_err(|e| e.to_string())?;
        d.cmos.restore(&devices.cmos).map_err(|e| e.to_string())?;
        d.fw_cfg
            .restore(&devices.fw_cfg)
            .map_err(|e| e.to_string())?;
        let clock = vm::restore_state(&self.main_vm, &saved.vm).map_err(|e| e.to_string())?;
        let running = saved.vm.running;
        self.with_controller(|c| {
            c.set_source_running(running);
            c.main_vcpus()
                .restore_state(saved.vcpus, clock)
                .map_err(|e| format!("Cannot restore the vCPUs' state: {e}"))
        })
    }

    fn start(&self) -> Result<(), String> {
        // As QEMU orders them: the migration completed, then the guest runs.
        self.raise_migration(MigrationStatus::Completed);
        self.with_controller(|c| c.finish_incoming().map_err(|e| e.to_string()))
    }

    fn start_dirty_log(&self) -> Result<(), String> {
        // Conversions and device writes before now are in the first round
        // anyway.
        let _ = self
            .shared
            .lock()
            .expect("shared map lock poisoned")
            .take_converted();
        let _ = self.devices.fw_cfg.take_written();
        for slot in slots_of(&self.memory.ram, 0, false) {
            slot.register(&self.main_vm, true)
                .map_err(|e| format!("Cannot start dirty logging: {e}"))?;
        }
        Ok(())
    }

    fn dirty_pages(&self) -> Result<Vec<u64>, String> {
        let mut pages = Vec::new();
        for slot in slots_of(&self.memory.ram, 0, false) {
            let bitmap = self
                .main_vm
                .get_dirty_log(slot.slot, slot.size as usize)
                .map_err(|e| format!("KVM_GET_DIRTY_LOG of slot {}: {e}", slot.slot))?;
            for run in dirty::ranges(&bitmap, slot.size / PAGE) {
                pages.extend((run.first..run.first + run.count).map(|p| slot.gpa + p * PAGE));
            }
        }
        // KVM logs the guest's writes; a conversion between shared and
        // private is the VMM's to add: such a page goes again, the other way.
        let converted = self
            .shared
            .lock()
            .expect("shared map lock poisoned")
            .take_converted();
        match converted {
            Some(ranges) => {
                for r in ranges {
                    pages.extend((r.start..r.end).step_by(PAGE as usize));
                }
            }
            None => {
                for (start, len) in self.memory.layout.ram_ranges() {
                    pages.extend((start..start + len).step_by(PAGE as usize));
                }
            }
        }
        // Nor does KVM see what the VMM's devices write (fw_cfg DMA).
        for (gpa, len) in self.devices.fw_cfg.take_written() {
            let first = gpa & !(PAGE - 1);
            pages.extend((first..gpa.saturating_add(len)).step_by(PAGE as usize));
        }
        pages.sort_unstable();
        pages.dedup();
        // Only RAM pages (a DMA range past RAM was refused anyway).
        let ram = self.memory.layout.ram_ranges();
        pages.retain(|&p| ram.iter().any(|&(s, l)| p >= s && p < s + l));
        Ok(pages)
    }

    fn throttle(&self, percent: u8) {
        let percent = percent.min(99);
        let mut slot = self.throttle.lock().expect("throttle lock poisoned");
        if let Some(t) = slot.as_ref() {
            t.percent.store(percent, Ordering::SeqCst);
            if percent == 0 {
                if let Some(t) = slot.take() {
                    let _ = t.thread.join();
                }
            }
            return;
        }
        if percent == 0 {
            return;
        }
        let shared = Arc::new(AtomicU8::new(percent));
        let (level, controller) = (shared.clone(), self.controller.clone());
        let spawned = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || throttle_loop(&level, &controller));
        match spawned {
            Ok(thread) => {
                log::debug!("Throttling the guest to {}%", 100 - percent);
                *slot = Some(Throttle {
                    percent: shared,
                    thread,
                });
            }
            Err(e) => log::warn!("Cannot throttle the guest: {e}"),
        }
    }

    fn stop_dirty_log(&self) {
        for slot in slots_of(&self.memory.ram, 0, false) {
            if let Err(e) = slot.register(&self.main_vm, false) {
                log::warn!("Cannot stop dirty logging: {e}");
            }
        }
    }
}

/// Pauses the main vCPUs `level`% of every period until `level` is 0;
/// resumes them only while the VM is meant to run (a `stop` meanwhile
/// wins), and always leaves them as the run state says.
fn throttle_loop(level: &AtomicU8, controller: &Weak<Mutex<Controller>>) {
    let with = |f: &dyn Fn(&mut Controller)| {
        if let Some(c) = controller.upgrade() {
            f(&mut c.lock().expect("controller lock poisoned"));
        }
    };
    loop {
        let p = u32::from(level.load(Ordering::SeqCst));
        if p == 0 {
            return;
        }
        with(&|c| {
            if c.state() == RunState::Running {
                let _ = c.main_vcpus().pause();
            }
        });
        std::thread::sleep(THROTTLE_PERIOD * p / 100);
        with(&|c| {
            if c.state() == RunState::Running {
                let _ = c.main_vcpus().resume();
            }
        });
        std::thread::sleep(THROTTLE_PERIOD * (100 - p) / 100);
    }
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
    fn new(helpers: usize, outgoing: bool) -> Self {
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
    fn restart_clock(&self) {
        *self.started.lock().expect("clock lock poisoned") = Instant::now();
    }

    fn elapsed(&self) -> Duration {
        self.started.lock().expect("clock lock poisoned").elapsed()
    }

    /// Where it stands.
    pub fn status(&self) -> MigrationStatus {
        MigrationStatus::from_u8(self.status.load(Ordering::SeqCst))
    }

    fn set_status(&self, s: MigrationStatus) {
        self.status.store(s as u8, Ordering::SeqCst);
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
            self.set_status(MigrationStatus::Cancelling);
            self.cancel.cancel();
        }
    }

    fn finish(&self, result: &Result<(), MigrationError>) -> MigrationStatus {
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

/// Starts sending the VM to `uri` in a worker; the caller holds the
/// controller (the worker waits for it before it pauses the guest).
pub fn start_outgoing(link: Arc<VmLink>, uri: Uri, params: Params) -> Arc<MigrationJob> {
    let helpers = params.helpers.clamp(1, link.helpers);
    let job = Arc::new(MigrationJob::new(helpers, true));
    let worker_job = job.clone();
    let spawned = std::thread::Builder::new()
        .name("migrate-out".into())
        .spawn(move || {
            let job = worker_job;
            link.raise_migration(MigrationStatus::Setup);
            job.set_status(MigrationStatus::Active);
            link.raise_migration(MigrationStatus::Active);
            log::info!("Migrating to {uri}");
            let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                source::send(&*link, &uri, &params, &job.progress, &job.cancel)
            }));
            let result = sent.unwrap_or_else(|_| {
                // Whatever the worker left half done: the guest at full
                // speed, no dirty log, running again if it was paused here.
                link.throttle(0);
                link.stop_dirty_log();
                let _ = link.with_controller(|c| {
                    if c.state() == RunState::FinishMigrate {
                        c.resume_after_migration().map_err(|e| e.to_string())?;
                    }
                    Ok(())
                });
                Err(MigrationError::Vm(
                    "the migration thread failed unexpectedly".into(),
                ))
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
                        c.set_state(RunState::Paused);
                        Ok(())
                    });
                    log::error!("Migration to {uri}: {e}");
                }
                Err(e) => log::error!("Migration to {uri} failed: {e}"),
            }
            link.raise_migration(status);
        });
    if let Err(e) = spawned {
        let result = Err(MigrationError::Vm(format!(
            "Cannot start the migration thread: {e}"
        )));
        job.finish(&result);
    }
    job
}

/// Listens at `uri` now (so a source can connect as soon as this returns)
/// and receives the VM in a worker. A failed incoming migration ends the
/// process with the reason; the guest never ran.
pub fn start_incoming(
    link: Arc<VmLink>,
    uri: &Uri,
    helpers: usize,
) -> Result<Arc<MigrationJob>, LinkError> {
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
    std::thread::Builder::new()
        .name("migrate-in".into())
        .spawn(move || {
            let job = worker_job;
            let result = loop {
                let channel = match listener.accept() {
                    Ok(c) => c,
                    Err(e) => break Err(MigrationError::from(e)),
                };
                job.restart_clock();
                job.set_status(MigrationStatus::Active);
                match target::receive(&*link, channel, &job.progress) {
                    // On a socket, someone who does not speak the protocol
                    // (a port scanner, a squatter that says nothing): wait
                    // for the real source.
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
        })
        .map_err(LinkError::Spawn)?;
    Ok(job)
}

/// SHA-256 over guest RAM, region after region, as hex (tests compare a
/// source's and a target's).
pub fn ram_digest(memory: &Memory) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    for region in memory.ram.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            if memory
                .ram
                .read_slice(&mut buf[..n], GuestAddress(start + at))
                .is_err()
            {
                break;
            }
            ctx.update(&buf[..n]);
            at += n as u64;
        }
    }
    hex::encode(ctx.finish().as_ref())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cgsvmm_devices::{BusDevice, EventFdTrigger};
    use vmm_sys_util::eventfd::EventFd;

    fn devices() -> MigratableDevices {
        let irq = EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        MigratableDevices {
            serial: Arc::new(SerialDevice::new(irq, Box::new(std::io::sink()))),
            cmos: Arc::new(Cmos::new(256 << 20, 0)),
            fw_cfg: Arc::new(FwCfg::new(None)),
        }
    }

    #[test]
    fn the_devices_record_round_trips_and_refuses_what_it_must() {
        let a = devices();
        // A guest that set the serial port up and typed into its scratch
        // register, picked a CMOS register and an fw_cfg item.
        a.serial.write(3, &[0x83]);
        a.serial.write(0, &[0x0c]);
        a.serial.write(3, &[0x03]);
        a.serial.write(7, &[0x5a]);
        a.cmos.write(0, &[0x34]);
        a.fw_cfg.write(0, &1u16.to_le_bytes());
        let record = DevicesRecord {
            serial: a.serial.state(),
            cmos: a.cmos.state(),
            fw_cfg: a.fw_cfg.state(),
        };
        let bytes = state::encode(&record).unwrap();
        let back: DevicesRecord = state::decode(&bytes).unwrap();
        let b = devices();
        b.serial.restore(&back.serial).unwrap();
        b.cmos.restore(&back.cmos).unwrap();
        b.fw_cfg.restore(&back.fw_cfg).unwrap();
        assert_eq!(b.serial.state(), a.serial.state());
        assert_eq!(b.cmos.state(), a.cmos.state());
        assert_eq!(b.fw_cfg.state(), a.fw_cfg.state());
        let mut scratch = [0u8];
        b.serial.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        // Another version, or past its bound: refused.
        let mut newer = bytes.clone();
        newer[0] = 2;
        assert!(state::decode::<DevicesRecord>(&newer).is_err());
        let mut long = bytes;
        long.resize(DevicesRecord::MAX_LEN + 1, 0);
        assert!(state::decode::<DevicesRecord>(&long).is_err());
    }
}
