//! The VMM: builds a VM from a [`VmmConfig`] and runs its event loop.
//!
//! `Vmm::try_from(config)` does, in order: validate the config; map guest
//! memory and the mirror region; create the main VM (irqchip, PIT, devices)
//! and the mirror VM over the same memslots; put the boot payload in place
//! (lab guest, Linux or firmware) and the mirror payload in the mirror
//! region; create every vCPU with its boot state and start its thread
//! paused. [`Vmm::run`] starts the vCPUs and serves the event loop (QMP,
//! serial input, signals) until something asks the VM to stop, then tears
//! the vCPUs down and returns why it stopped.

use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VmFd};
use serde_json::json;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use cgsvmm_devices::serial::SerialDevice;
use cgsvmm_fw_abi as abi;
use cgsvmm_fw_abi::helper::HelperHeader;
use cgsvmm_migration::helper::{HelperClient, HelperLink};

use crate::boot::cpl3::{self, LAB_LAYOUT};
use crate::boot::firmware::{self, Firmware};
use crate::boot::{images, linux, BootError, VcpuBoot};
use crate::confidential::sev::{self, SevConfig, SevError, SevLaunch};
use crate::confidential::Confidential;
use crate::config::{BootConfig, ConfigError, Incoming, SerialConfig, VmmConfig};
use crate::control::Controller;
use crate::device_manager::{self, DeviceError};
use crate::exit::{ExitHandle, ExitReason};
use crate::helper_link::HelperLinks;
use crate::memory::{slots_of, MemSlot, Memory, MemoryError};
use crate::migration_link::{MigratableDevices, VmLink};
use crate::qmp::{QmpServer, QmpServerError};
use cgsvmm_migration::ranges::SharedMap;
use cgsvmm_migration::state::CpuidEntry;

/// How long queued QMP output (the SHUTDOWN event) may take to leave at
/// exit.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_millis(200);
use crate::vcpu::{msr_index_list, FaultSink, Vcpu, VcpuError, VcpuGroup, VcpuRole};
use crate::vm::{self, VcpuSetup, VmError};
use crate::x86::paging::PTE_USER;
use crate::{lab, mirror};

/// How often the event loop wakes up without events (to notice a stop).
const LOOP_TIMEOUT_MS: i32 = 100;
/// TSC rate the lab guests assume when KVM cannot tell (only their print
/// cadence depends on it).
const FALLBACK_TSC_KHZ: u64 = 2_000_000;

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
    /// The incoming migration could not start.
    #[error(transparent)]
    Incoming(#[from] crate::migration_link::LinkError),
}

/// A built VM, vCPUs created and paused.
pub struct Vmm {
    config: VmmConfig,
    controller: Arc<Mutex<Controller>>,
    memory: Arc<Memory>,
    exit: ExitHandle,
    serial: Arc<SerialDevice>,
    links: Arc<HelperLinks>,
    helper_header: Option<HelperHeader>,
    tsc_khz: u64,
    /// What migration reaches this VM through (with a helper only).
    link: Option<Arc<VmLink>>,
    /// Written when the controller raises an event (QMP sends it then).
    event_wake: EventFd,
    // Kept alive for as long as the vCPUs run.
    _main_vm: Arc<VmFd>,
    _mirror_vm: VmFd,
    _firmware: Option<Firmware>,
    _kvm: Kvm,
}

impl TryFrom<VmmConfig> for Vmm {
    type Error = VmmError;

    fn try_from(config: VmmConfig) -> Result<Self, VmmError> {
        config.validate()?;
        // A confidential backend the host lacks fails before anything is
        // allocated.
        let sev = match &config.confidential {
            Confidential::Sev(sev_config) => {
                Some((SevLaunch::open()?, sev::c_bit_position()?, sev_config))
            }
            Confidential::None => None,
        };
        let c_bit = sev.as_ref().map_or(0, |(_, bit, _)| *bit);
        let kvm = vm::open_kvm()?;
        let memory = Arc::new(Memory::new(config.memory)?);
        let firmware = match &config.boot {
            BootConfig::Firmware { path, .. } => Some(firmware::load(path)?),
            _ => None,
        };
        let mut slots = memory.slots();
        if let Some(fw) = &firmware {
            let next = slots.len() as u32;
            slots.extend(slots_of(&fw.memory, next, true));
        }
        let exit = ExitHandle::new().map_err(|e| VmmError::Setup("exit eventfd", e))?;
        let main_vm = Arc::new(vm::create_main_vm(&kvm, &slots)?);
        if let Some((launch, ..)) = &sev {
            launch.init(&main_vm)?;
            for slot in &slots {
                launch.register(&main_vm, slot.host_addr, slot.size)?;
            }
        }
        let mirror_vm = vm::create_mirror_vm(&kvm, &slots)?;
        if sev.is_some() {
            SevLaunch::share_with_mirror(&mirror_vm, &main_vm)?;
        }
        log::debug!(
            "VM: {} MiB of RAM at {}; {} vCPUs, {} mirror vCPUs; mirror region {:#x}..{:#x}; confidential backend: {}",
            config.memory >> 20,
            memory
                .layout
                .ram_ranges()
                .iter()
                .map(|(start, len)| format!("{start:#x}..{:#x}", start + len))
                .collect::<Vec<_>>()
                .join(", "),
            config.cpus,
            config.mirror_cpus,
            cgsvmm_fw_abi::MIRROR_REGION_GPA,
            cgsvmm_fw_abi::MIRROR_REGION_GPA + cgsvmm_fw_abi::MIRROR_REGION_SIZE,
            match config.confidential {
                Confidential::None => "none",
                Confidential::Sev(_) => "sev",
            }
        );
        let shared = Arc::new(Mutex::new(SharedMap::default()));
        let devices = device_manager::main_devices(&main_vm, &config, &memory, &exit, &shared)?;
        log::debug!(
            "Devices: COM1 ({:?}), i8042, CMOS/RTC, debug port, fw_cfg, lab port",
            config.serial
        );
        let links = Arc::new(HelperLinks::new(config.mirror_cpus));
        let mirror_bus = device_manager::mirror_devices(&links)?;

        let incoming = config.incoming.is_some();
        let main_boots = match &config.boot {
            // An incoming VM's guest arrives with its state: nothing to load.
            _ if incoming => vec![VcpuBoot::Reset; config.cpus],
            BootConfig::Lab(guest) => {
                let image = images::lab_guest(guest.name()).expect("every LabGuest is embedded");
                let entry = image.load(&memory.ram)?;
                let ram = memory.layout.ram_mappings(PTE_USER);
                cpl3::prepare(&memory.ram, &LAB_LAYOUT, &ram, 0, config.cpus, entry)?
            }
            BootConfig::Linux(l) => linux::load(&memory.ram, &memory.layout, l, config.cpus)?,
            BootConfig::Firmware { .. } => vec![VcpuBoot::Reset; config.cpus],
        };
        let mirror_image = mirror::payload(config.helper.as_ref());
        let mirror_boots = mirror::prepare(&memory, config.mirror_cpus, mirror_image, c_bit)?;

        let mut cpuid = vm::supported_cpuid(&kvm)?;
        let map_gpa: Option<crate::vcpu::MapGpa> = vm::enable_map_gpa_exits(&main_vm, &mut cpuid)
            .then(|| {
                let (shared, ram) = (shared.clone(), memory.layout.ram_ranges());
                Arc::new(move |gpa, pages, to_shared| {
                    device_manager::map_gpa_range(&shared, &ram, gpa, pages, to_shared)
                }) as crate::vcpu::MapGpa
            });
        let msrs = Arc::new(msr_index_list(&kvm));
        let create = |vm_fd: &VmFd, boots: &[VcpuBoot], role, bus: &Arc<cgsvmm_devices::Bus>| {
            let setup = VcpuSetup {
                cpuid: &cpuid,
                count: boots.len(),
                irqchip: role == VcpuRole::Main,
            };
            boots
                .iter()
                .enumerate()
                .map(|(i, boot)| {
                    let fd = vm::create_vcpu(vm_fd, i, &setup, boot)?;
                    Ok(Vcpu::new(
                        fd,
                        i,
                        role,
                        bus.clone(),
                        exit.clone(),
                        msrs.clone(),
                    ))
                })
                .collect::<Result<Vec<_>, VmmError>>()
        };
        let main_vcpus = create(&main_vm, &main_boots, VcpuRole::Main, &devices.bus)?
            .into_iter()
            .map(|v| match &map_gpa {
                Some(map) => v.with_map_gpa(map.clone()),
                None => v,
            })
            .collect::<Vec<_>>();
        let sink: FaultSink = {
            let links = links.clone();
            Arc::new(move |index, why| {
                log::error!("mirror {index} stopped: {why}");
                links.record_fault(index, why);
            })
        };
        let mirror_vcpus = create(&mirror_vm, &mirror_boots, VcpuRole::Mirror, &mirror_bus)?
            .into_iter()
            .map(|v| v.with_fault_sink(sink.clone()))
            .collect::<Vec<_>>();

        let tsc_khz = main_vcpus[0]
            .fd()
            .get_tsc_khz()
            .map(u64::from)
            .unwrap_or(FALLBACK_TSC_KHZ);
        if matches!(config.boot, BootConfig::Lab(_)) && !incoming {
            lab::write_params(&memory.ram, &memory.layout, config.cpus, tsc_khz)?;
        }
        let helper_header = match &config.helper {
            Some(launch) => {
                let header = mirror_image.helper_header()?;
                mirror::write_helper_config(
                    &memory,
                    &header,
                    config.mirror_cpus,
                    launch,
                    tsc_khz,
                    c_bit,
                )?;
                Some(header)
            }
            None => None,
        };

        let sev_measurement = match &sev {
            Some((launch, _, sev_config)) => {
                let m = sev_launch(launch, &main_vm, sev_config, &slots, helper_header.as_ref())?;
                let hex: String = m.iter().map(|b| format!("{b:02x}")).collect();
                log::info!("SEV launch measurement: {hex}");
                Some(m)
            }
            None => None,
        };

        let start = |vcpus: Vec<Vcpu>| {
            vcpus
                .into_iter()
                .map(Vcpu::start)
                .collect::<Result<Vec<_>, _>>()
        };
        let main = VcpuGroup::new(start(main_vcpus)?);
        let mirror = VcpuGroup::new(start(mirror_vcpus)?);
        let mut controller = Controller::new(
            main,
            mirror,
            memory.clone(),
            exit.clone(),
            helper_header,
            links.clone(),
        );
        if let Some(m) = sev_measurement {
            controller.set_sev_measurement(m);
        }
        let controller = Arc::new(Mutex::new(controller));
        let link = helper_header.map(|helper| {
            Arc::new(VmLink {
                controller: Arc::downgrade(&controller),
                main_vm: main_vm.clone(),
                memory: memory.clone(),
                helper,
                links: links.clone(),
                helpers: config.mirror_cpus,
                vcpus: config.cpus,
                backend: match config.confidential {
                    Confidential::None => "none",
                    Confidential::Sev(_) => "sev",
                },
                cpuid: cpuid.as_slice().iter().map(CpuidEntry::from).collect(),
                msrs: msrs.to_vec(),
                devices: MigratableDevices {
                    serial: devices.serial.clone(),
                    cmos: devices.cmos.clone(),
                    fw_cfg: devices.fw_cfg.clone(),
                },
                shared: shared.clone(),
                exit: exit.clone(),
            })
        });
        let event_wake =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Setup("event eventfd", e))?;
        let wake = event_wake
            .try_clone()
            .map_err(|e| VmmError::Setup("event eventfd", e))?;
        controller
            .lock()
            .expect("controller lock poisoned")
            .configure(
                link.as_ref(),
                config.incoming.clone(),
                !config.paused,
                Some(wake),
            );
        Ok(Self {
            config,
            controller,
            link,
            event_wake,
            memory,
            exit,
            serial: devices.serial,
            links,
            helper_header,
            tsc_khz,
            _main_vm: main_vm,
            _mirror_vm: mirror_vm,
            _firmware: firmware,
            _kvm: kvm,
        })
    }
}

/// The SEV launch of a built VM: firmware and the mirror region's private
/// part (everything below the helper's mailboxes) are encrypted and
/// measured; the owner's secret goes to the helper's secret page.
fn sev_launch(
    launch: &SevLaunch,
    vm: &VmFd,
    config: &SevConfig,
    slots: &[MemSlot],
    helper: Option<&HelperHeader>,
) -> Result<Vec<u8>, VmmError> {
    let region = abi::MIRROR_REGION_GPA;
    let mirror = slots
        .iter()
        .find(|s| s.gpa == region)
        .ok_or_else(|| BootError::DoesNotFit("no mirror region memslot".into()))?;
    let private_end = helper.map_or(region + abi::MIRROR_REGION_SIZE, |h| h.mailbox_gpa);
    let mut measured: Vec<(u64, u64)> = slots
        .iter()
        .filter(|s| s.read_only)
        .map(|s| (s.host_addr, s.size))
        .collect();
    measured.push((mirror.host_addr, private_end - region));
    let secret_page = helper.map(|h| mirror.host_addr + (h.secret_gpa - region));
    Ok(sev::launch(launch, vm, config, &measured, secret_page)?)
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

    /// Stops and joins every vCPU thread.
    pub fn shutdown(&self) {
        self.controller
            .lock()
            .expect("controller lock poisoned")
            .shutdown();
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
