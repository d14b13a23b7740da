//! Building a VM, in named steps shared by the two ways to build one.
//!
//! ```text
//! Machine::new        backend, guest memory, main and mirror VMs over the
//!                     same memslots, devices                       (both)
//! load_boot_payload   lab guest / Linux / firmware in RAM,        (boot)
//!                     each main vCPU's first state
//! incoming_vcpus      nothing in RAM: vCPUs at reset, their    (incoming)
//!                     state arrives with the migration
//! finish              mirror payload, vCPUs, helper config, SEV launch,
//!                     threads (paused), controller, migration link (both)
//! ```

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};

use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use cgsvmm_devices::Bus;
use cgsvmm_fw_abi as abi;
use cgsvmm_fw_abi::helper::HelperHeader;
use cgsvmm_migration::ranges::SharedMap;
use cgsvmm_migration::state::CpuidEntry;

use super::{Vmm, VmmError};
use crate::boot::cpl3::{self, LAB_LAYOUT};
use crate::boot::firmware::{self, Firmware};
use crate::boot::{images, linux, BootError, VcpuBoot};
use crate::confidential::sev::{self, GuestRange, SevConfig, SevLaunch};
use crate::confidential::Confidential;
use crate::config::{BootConfig, VmmConfig};
use crate::control::{Controller, Migrator};
use crate::machine::devices::{self, MainDevices};
use crate::machine::exit::ExitHandle;
use crate::machine::helper_link::HelperLinks;
use crate::machine::vcpu::{
    msr_index_list, FaultSink, MapGpa, Mappings, Vcpu, VcpuGroup, VcpuRole,
};
use crate::machine::vm::{self, VcpuSetup};
use crate::machine::{lab, mirror};
use crate::memory::{slots_of, MemSlot, Memory};
use crate::migration::throttle::Throttle;
use crate::migration::{MigratableDevices, VmLink};
use crate::x86::paging::PTE_USER;

/// TSC rate the lab guests assume when KVM cannot tell (only their print
/// cadence depends on it).
const FALLBACK_TSC_KHZ: u64 = 2_000_000;

/// The parts every VM has, before its vCPUs exist.
pub(crate) struct Machine {
    // Fields drop in this order: a Machine dropped on a failed build drops
    // its VMs before the memory they map (memory and firmware come last).
    main_vm: Arc<VmFd>,
    mirror_vm: VmFd,
    pub(crate) config: VmmConfig,
    sev: Option<SevLaunch>,
    c_bit: u32,
    kvm: Kvm,
    /// Every memslot either VM maps (the SEV launch's ranges).
    slots: Vec<MemSlot>,
    exit: ExitHandle,
    shared: Arc<Mutex<SharedMap>>,
    devices: MainDevices,
    links: Arc<HelperLinks>,
    mirror_bus: Arc<Bus>,
    memory: Arc<Memory>,
    firmware: Option<Arc<Firmware>>,
}

impl Machine {
    /// The backend (a backend the host lacks fails before anything is
    /// allocated), guest memory, the main VM (irqchip, PIT, devices) and the
    /// mirror VM over the same memslots.
    pub(crate) fn new(config: VmmConfig) -> Result<Self, VmmError> {
        let (sev, c_bit) = match &config.confidential {
            Confidential::Sev(_) => (Some(SevLaunch::open()?), sev::c_bit_position()?),
            Confidential::None => (None, 0),
        };
        let kvm = vm::open_kvm()?;
        let memory = Arc::new(Memory::new(config.memory)?);
        let firmware = match &config.boot {
            // An incoming VM maps the same firmware: the guest may call it.
            BootConfig::Firmware { path, .. } => Some(Arc::new(firmware::load(path)?)),
            _ => None,
        };
        // The main VM: RAM and the firmware; the mirror VM: RAM and the
        // mirror region, which the guest never sees (its key lives there).
        let mirror_slots = memory.slots();
        let mut slots = memory.main_slots();
        let ram_slots = slots.len();
        if let Some(fw) = &firmware {
            let next = mirror_slots.len() as u32;
            slots.extend(slots_of(&fw.memory, next, true));
        }
        let exit = ExitHandle::new().map_err(|e| VmmError::Setup("exit eventfd", e))?;
        // SAFETY: the slots are over `memory` and the firmware's mapping,
        // which the Machine and then the `Vmm` drop after both VMs (their
        // field order), the migration link keeps beside its VM handle, and
        // every vCPU thread keeps while it lives (`with_mappings`).
        let main_vm = Arc::new(unsafe { vm::create_main_vm(&kvm, &slots) }?);
        // What the SEV launch covers: the main VM's slots and the mirror
        // region, where the helper runs in the guest's encryption context
        // (registration and launch updates go by host address).
        slots.extend_from_slice(&mirror_slots[ram_slots..]);
        if let Some(launch) = &sev {
            launch.init(&main_vm)?;
            for slot in &slots {
                // SAFETY: as for the VM: the slot's mapping outlives it.
                unsafe { launch.register(&main_vm, slot)? };
            }
        }
        // SAFETY: as for the main VM.
        let mirror_vm = unsafe { vm::create_mirror_vm(&kvm, &mirror_slots) }?;
        if sev.is_some() {
            SevLaunch::share_with_mirror(&mirror_vm, &main_vm)?;
        }
        log::debug!(
            "VM: {} MiB of RAM at {}; {} vCPUs, {} mirror vCPUs; mirror region {:#x}..{:#x}; confidential backend: {}{}",
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
            abi::MIRROR_REGION_GPA,
            abi::MIRROR_REGION_GPA + abi::MIRROR_REGION_SIZE,
            config.confidential.name(),
            if config.incoming.is_some() { "; built for an incoming migration" } else { "" }
        );
        let shared = Arc::new(Mutex::new(SharedMap::default()));
        let devices = devices::main_devices(&main_vm, &config, &memory, &exit, &shared)?;
        log::debug!(
            "Devices: COM1 ({:?}), i8042, CMOS/RTC, debug port, fw_cfg, lab port",
            config.serial
        );
        let links = Arc::new(HelperLinks::new(config.mirror_cpus));
        let mirror_bus = devices::mirror_devices(&links)?;
        Ok(Self {
            config,
            sev,
            c_bit,
            kvm,
            memory,
            firmware,
            slots,
            exit,
            main_vm,
            mirror_vm,
            shared,
            devices,
            links,
            mirror_bus,
        })
    }

    /// Boot: the payload in guest RAM, and each main vCPU's first state.
    pub(crate) fn load_boot_payload(&self) -> Result<Vec<VcpuBoot>, VmmError> {
        let (memory, cpus) = (&self.memory, self.config.cpus);
        Ok(match &self.config.boot {
            BootConfig::Lab(guest) => {
                let image = images::lab_guest(guest.image()).expect("every LabGuest is embedded");
                let entry = image.load(&memory.ram)?;
                let ram = memory.layout.ram_mappings(PTE_USER);
                let ring = if guest.ring0() {
                    cpl3::Ring::Kernel
                } else {
                    cpl3::Ring::User
                };
                cpl3::prepare(&memory.ram, &LAB_LAYOUT, &ram, 0, cpus, entry, ring)?
            }
            BootConfig::Linux(l) => linux::load(&memory.ram, &memory.layout, l, cpus)?,
            BootConfig::Firmware { .. } => vec![VcpuBoot::Reset; cpus],
        })
    }

    /// Incoming: nothing to load, since RAM, registers and devices arrive
    /// with the migration; the vCPUs wait at reset and never run before.
    pub(crate) fn incoming_vcpus(&self) -> Vec<VcpuBoot> {
        vec![VcpuBoot::Reset; self.config.cpus]
    }

    /// The mirror payload, every vCPU (threads started, paused), the
    /// helper's launch configuration, the SEV launch, the controller and
    /// what migration reaches the VM through. `lab_params`: write the lab
    /// guests' parameter blocks (a booting lab guest reads them).
    pub(crate) fn finish(
        self,
        main_boots: Vec<VcpuBoot>,
        lab_params: bool,
    ) -> Result<Vmm, VmmError> {
        let Machine {
            config,
            sev,
            c_bit,
            kvm,
            memory,
            firmware,
            slots,
            exit,
            main_vm,
            mirror_vm,
            shared,
            devices,
            links,
            mirror_bus,
        } = self;
        let mirror_image = mirror::payload(config.helper.as_ref());
        let mirror_boots = mirror::prepare(&memory, config.mirror_cpus, mirror_image, c_bit)?;

        let mut cpuid = vm::supported_cpuid(&kvm)?;
        let map_gpa: Option<MapGpa> = vm::enable_map_gpa_exits(&main_vm, &mut cpuid).then(|| {
            let (shared, ram) = (shared.clone(), memory.layout.ram_ranges());
            Arc::new(move |gpa, pages, to_shared| {
                devices::map_gpa_range(&shared, &ram, gpa, pages, to_shared)
            }) as MapGpa
        });
        let msrs = Arc::new(msr_index_list(&kvm));
        let mappings: Mappings = Arc::new((memory.clone(), firmware.clone()));
        let create = |vm_fd: &VmFd, boots: &[VcpuBoot], role, bus: &Arc<Bus>| {
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
                    Ok(
                        Vcpu::new(fd, i, role, bus.clone(), exit.clone(), msrs.clone())
                            .with_mappings(mappings.clone()),
                    )
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
        if let (true, BootConfig::Lab(guest)) = (lab_params, &config.boot) {
            lab::write_params(
                &memory.ram,
                &memory.layout,
                config.cpus,
                tsc_khz,
                guest.flags(),
            )?;
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

        let sev_measurement = match (&sev, &config.confidential) {
            (Some(launch), Confidential::Sev(sev_config)) => {
                let m = sev_launch(launch, &main_vm, sev_config, &slots, helper_header.as_ref())?;
                let hex: String = m.iter().map(|b| format!("{b:02x}")).collect();
                log::info!("SEV launch measurement: {hex}");
                Some(m)
            }
            _ => None,
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
                firmware: firmware.clone(),
                helper,
                links: links.clone(),
                helpers: config.mirror_cpus,
                vcpus: config.cpus,
                backend: config.confidential.backend(),
                cpuid: cpuid.as_slice().iter().map(CpuidEntry::from).collect(),
                msrs: msrs.to_vec(),
                devices: MigratableDevices {
                    serial: devices.serial.clone(),
                    cmos: devices.cmos.clone(),
                    fw_cfg: devices.fw_cfg.clone(),
                },
                shared: shared.clone(),
                exit: exit.clone(),
                throttle: Throttle::default(),
                paused_clock: Mutex::new(None),
            })
        });
        let mut prefault = None;
        if config.incoming.is_some() {
            let memory = memory.clone();
            let stop = Arc::new(AtomicBool::new(false));
            let stop_here = stop.clone();
            let spawned = std::thread::Builder::new()
                .name("prefault".into())
                .spawn(move || {
                    let took = memory.prefault(&stop_here);
                    log::debug!("Guest RAM backed in {took:?}, ready for the incoming pages");
                });
            match spawned {
                Ok(t) => prefault = Some((t, stop)),
                Err(e) => log::debug!("Not prefaulting guest RAM: {e}"),
            }
        }
        let event_wake =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Setup("event eventfd", e))?;
        let wake = event_wake
            .try_clone()
            .map_err(|e| VmmError::Setup("event eventfd", e))?;
        controller
            .lock()
            .expect("controller lock poisoned")
            .configure(
                link.as_ref()
                    .map(|l| Arc::downgrade(l) as Weak<dyn Migrator>),
                config.incoming.clone(),
                !config.paused,
                Some(wake),
            );
        Ok(Vmm {
            config,
            prefault: Mutex::new(prefault),
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
        .find(|s| s.gpa() == region)
        .ok_or_else(|| BootError::DoesNotFit("no mirror region memslot".into()))?;
    let private_end = helper.map_or(region + abi::MIRROR_REGION_SIZE, |h| h.mailbox_gpa);
    let private_len = private_end
        .checked_sub(region)
        .ok_or_else(|| BootError::DoesNotFit("the helper's mailboxes below its region".into()))?;
    let mut measured: Vec<GuestRange<'_>> = slots
        .iter()
        .filter(|s| s.read_only())
        .map(|slot| GuestRange {
            slot,
            gpa: slot.gpa(),
            len: slot.size(),
        })
        .collect();
    measured.push(GuestRange {
        slot: mirror,
        gpa: region,
        len: private_len,
    });
    let secret_page = helper.map(|h| GuestRange {
        slot: mirror,
        gpa: h.secret_gpa,
        len: abi::helper::PAGE_SIZE as u64,
    });
    // SAFETY: the slots are the VM's, whose mappings (guest memory, the
    // firmware) the caller holds for the VM's life.
    Ok(unsafe { sev::launch(launch, vm, config, &measured, secret_page)? })
}
