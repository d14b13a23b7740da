//! [`VmLink`]: what the migration crate sees of this VM. It implements
//! `cgsvmm_migration::MigratableVm` over the controller (pause, resume,
//! the vCPUs' state, the run state's migration steps) and the machine (the
//! main VM's clock and irqchip state, guest RAM and its dirty log, the
//! shared map, the devices, the helpers' mailboxes).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use cgsvmm_fw_abi::helper::{HelperHeader, MH_ABI_VERSION};
use cgsvmm_migration::helper::{HelperClient, HelperLink};
use cgsvmm_migration::ranges::SharedMap;
use cgsvmm_migration::state::{ConfigRecord, CpuidEntry, StreamMode};
use cgsvmm_migration::{dirty, MigratableVm, SavedState, VmError};

use super::devices::MigratableDevices;
use super::throttle::Throttle;
use crate::boot::firmware::Firmware;
use crate::confidential::Backend;
use crate::control::job::MigrationStatus;
use crate::control::{Controller, Event};
use crate::machine::exit::ExitHandle;
use crate::machine::helper_link::HelperLinks;
use crate::machine::vm;
use crate::memory::{slots_of, Memory};
use crate::x86::tsc::ClockMoment;

use cgsvmm_fw_abi::PAGE_SIZE_U64 as PAGE;

/// How long a helper may take to answer one request during a migration.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the migration crate sees of this VM.
pub struct VmLink {
    /// The controller (owned by the `Vmm`).
    pub controller: Weak<Mutex<Controller>>,
    /// The main VM.
    pub main_vm: Arc<VmFd>,
    /// Guest memory and the mirror region (after the VM: fields drop in
    /// order).
    pub memory: Arc<Memory>,
    /// The firmware's mapping, kept as long as the VM above.
    pub firmware: Option<Arc<Firmware>>,
    /// Where the helpers' mailboxes are.
    pub helper: HelperHeader,
    /// Their doorbells.
    pub links: Arc<HelperLinks>,
    /// Helpers running.
    pub helpers: usize,
    /// Main vCPUs.
    pub vcpus: usize,
    /// The confidential backend.
    pub backend: Backend,
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
    /// Auto-converge's throttle.
    pub throttle: Throttle,
    /// The KVM clock as the main vCPUs paused for the migration, and its
    /// moment: what [`MigratableVm::save`] saves.
    pub paused_clock: Mutex<Option<(kvm_clock_data, ClockMoment)>>,
}

impl VmLink {
    pub(super) fn with_controller<T>(
        &self,
        f: impl FnOnce(&mut Controller) -> Result<T, VmError>,
    ) -> Result<T, VmError> {
        let controller = self
            .controller
            .upgrade()
            .ok_or_else(|| VmError::refused("the VM is shutting down"))?;
        let mut c = controller.lock().expect("controller lock poisoned");
        f(&mut c)
    }

    pub(super) fn raise_migration(&self, status: MigrationStatus) {
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
            backend: self.backend.name().to_string(),
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

    fn conversions(&self) -> u64 {
        self.shared
            .lock()
            .expect("shared map lock poisoned")
            .conversions()
    }

    fn keep_shared(&self, gpas: &mut Vec<u64>) {
        let map = self.shared.lock().expect("shared map lock poisoned");
        gpas.retain(|&g| map.is_shared(g));
    }

    fn set_shared_map(&self, map: SharedMap) {
        *self.shared.lock().expect("shared map lock poisoned") = map;
    }

    fn helpers(&self) -> Result<Vec<HelperClient>, VmError> {
        (0..self.helpers)
            .map(|i| {
                let mailbox = self.helper.mailbox_gpa + i as u64 * self.helper.mailbox_stride;
                let link: Arc<dyn HelperLink> = self.links.clone();
                let mut client =
                    HelperClient::new(self.memory.mirror.clone(), mailbox, i, link, HELPER_TIMEOUT);
                client
                    .hello()
                    .map_err(|e| VmError::new(format!("Migration helper {i}"), e))?;
                Ok(client)
            })
            .collect()
    }

    fn pause(&self) -> Result<bool, VmError> {
        let ran = self.with_controller(|c| {
            c.pause_for_migration()
                .map_err(|e| VmError::new("Cannot pause the guest", e))
        })?;
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

    fn resume(&self) -> Result<(), VmError> {
        self.paused_clock
            .lock()
            .expect("clock lock poisoned")
            .take();
        self.with_controller(|c| {
            c.resume_after_migration()
                .map_err(|e| VmError::new("Cannot resume the guest", e))
        })
    }

    fn save(&self) -> Result<SavedState, VmError> {
        // The guest's time as it stopped (or now, for a save without a
        // pause): each vCPU's TSC is saved as of the same moment.
        let paused = self
            .paused_clock
            .lock()
            .expect("clock lock poisoned")
            .take();
        let (clock, moment) = match paused {
            Some(c) => c,
            None => vm::read_clock(&self.main_vm)
                .map_err(|e| VmError::new("Cannot read the KVM clock", e))?,
        };
        let mut vm_state = vm::save_state(&self.main_vm, clock)
            .map_err(|e| VmError::new("Cannot save the VM's state", e))?;
        let (vcpus, running) = self.with_controller(|c| {
            let vcpus = c
                .main_vcpus()
                .save_state(moment)
                .map_err(|e| VmError::new("Cannot save the vCPUs' state", e))?;
            Ok((vcpus, c.ran_before_migration()))
        })?;
        vm_state.running = running;
        Ok(SavedState {
            vm: vm_state,
            vcpus,
            devices: self.devices.save()?,
        })
    }

    fn restore(&self, saved: SavedState) -> Result<(), VmError> {
        self.devices.restore(&saved.devices)?;
        let clock = vm::restore_state(&self.main_vm, &saved.vm)
            .map_err(|e| VmError::new("Cannot restore the VM's state", e))?;
        let running = saved.vm.running;
        self.with_controller(|c| {
            c.restored(running)
                .map_err(|e| VmError::new("Cannot take the guest's state", e))?;
            c.main_vcpus()
                .restore_state(saved.vcpus, clock)
                .map_err(|e| VmError::new("Cannot restore the vCPUs' state", e))
        })
    }

    fn start(&self) -> Result<(), VmError> {
        // As QEMU orders them: the migration completed, then the guest runs.
        self.raise_migration(MigrationStatus::Completed);
        self.with_controller(|c| {
            c.finish_incoming()
                .map_err(|e| VmError::new("Cannot start the guest", e))
        })
    }

    fn start_dirty_log(&self) -> Result<(), VmError> {
        // Conversions and device writes before now are in the first round
        // anyway.
        let _ = self
            .shared
            .lock()
            .expect("shared map lock poisoned")
            .take_converted();
        let _ = self.devices.fw_cfg.take_written();
        for slot in slots_of(&self.memory.ram, 0, false) {
            // SAFETY: the same RAM mapping the VM was created over, which
            // `self.memory` keeps alive as long as the VM.
            unsafe { slot.register(&self.main_vm, true) }
                .map_err(|e| VmError::new("Cannot start dirty logging", e))?;
        }
        Ok(())
    }

    fn dirty_pages(&self) -> Result<Vec<u64>, VmError> {
        let mut pages = Vec::new();
        for slot in slots_of(&self.memory.ram, 0, false) {
            let bitmap = self
                .main_vm
                .get_dirty_log(slot.number(), slot.size() as usize)
                .map_err(|e| {
                    VmError::new(format!("KVM_GET_DIRTY_LOG of slot {}", slot.number()), e)
                })?;
            for run in dirty::ranges(&bitmap, slot.size() / PAGE) {
                pages.extend((run.first..run.first + run.count).map(|p| slot.gpa() + p * PAGE));
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
        self.throttle.set(percent, &self.controller);
    }

    fn stop_dirty_log(&self) {
        for slot in slots_of(&self.memory.ram, 0, false) {
            // SAFETY: as in `start_dirty_log`.
            if let Err(e) = unsafe { slot.register(&self.main_vm, false) } {
                log::warn!("Cannot stop dirty logging: {e}");
            }
        }
    }
}
