//! Puts the legacy devices on the main VM's bus and the lab port on the
//! mirror's, and wires their interrupts and requests into KVM and the VMM.
//! One `add_*` function per device.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use cgsvmm_devices::cmos::{Cmos, CMOS_PORT_BASE, CMOS_PORT_LEN};
use cgsvmm_devices::debug_port::{DebugPort, DEBUG_PORT};
use cgsvmm_devices::fw_cfg::{self, keys, FwCfg, FW_CFG_PORT_BASE, FW_CFG_PORT_LEN};
use cgsvmm_devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use cgsvmm_devices::lab::{LabPort, LabRequest, LAB_PORT_LEN};
use cgsvmm_devices::serial::{SerialDevice, SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use cgsvmm_devices::{Bus, BusError, CallbackTrigger, EventFdTrigger};
use cgsvmm_fw_abi as abi;
use cgsvmm_migration::ranges::SharedMap;

use crate::boot::linux::{split_bzimage, LinuxConfig};
use crate::config::{BootConfig, SerialConfig, VmmConfig};
use crate::machine::exit::{ExitHandle, ExitReason};
use crate::machine::helper_link::{HelperLinks, WAIT_TIMEOUT};
use crate::memory::Memory;

/// How long an idle vCPU (lab `YIELD`) stays out of KVM_RUN. Short enough
/// that pausing it stays quick, long enough that an idle mirror costs
/// almost no CPU.
pub const YIELD_SLEEP: Duration = Duration::from_millis(1);
/// How long a helper that serves nothing stays out of KVM_RUN each time it
/// says so (short enough not to hold up a pause or shutdown of its vCPU).
pub const REFUSED_SLEEP: Duration = Duration::from_millis(20);

/// Errors of adding devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Two devices claim the same ports.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An eventfd could not be made.
    #[error("Cannot create eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM refused the irqfd.
    #[error("Cannot register irqfd for IRQ {0}: {1}")]
    Irqfd(u32, kvm_ioctls::Error),
    /// The serial output file cannot be opened.
    #[error("Cannot open serial output {0}: {1}")]
    SerialFile(std::path::PathBuf, std::io::Error),
    /// A fw_cfg item could not be added.
    #[error(transparent)]
    FwCfg(#[from] fw_cfg::FwCfgError),
    /// The kernel for the firmware could not be read.
    #[error("Cannot read {0}: {1}")]
    Read(std::path::PathBuf, std::io::Error),
}

/// The main VM's bus and the devices the VMM talks to later.
pub struct MainDevices {
    /// The port I/O bus.
    pub bus: Arc<Bus>,
    /// COM1 (input from stdin; migration).
    pub serial: Arc<SerialDevice>,
    /// CMOS/RTC (migration).
    pub cmos: Arc<Cmos>,
    /// fw_cfg (migration).
    pub fw_cfg: Arc<FwCfg>,
}

/// Builds the main VM's devices.
pub fn main_devices(
    vm: &VmFd,
    config: &VmmConfig,
    memory: &Memory,
    exit: &ExitHandle,
    shared: &Arc<Mutex<SharedMap>>,
) -> Result<MainDevices, DeviceError> {
    let mut bus = Bus::new();
    let serial = add_serial(&mut bus, vm, &config.serial)?;
    add_i8042(&mut bus, exit)?;
    let cmos = add_cmos(&mut bus, memory)?;
    bus.insert(Arc::new(DebugPort::default()), DEBUG_PORT, 1)?;
    let fw_cfg = add_fw_cfg(&mut bus, config, memory)?;
    add_lab_port(&mut bus, exit, memory.layout.ram_ranges(), shared.clone())?;
    Ok(MainDevices {
        bus: Arc::new(bus),
        serial,
        cmos,
        fw_cfg,
    })
}

/// The mirror VM's bus: only the lab port (yield, wait for work) and the
/// debug port, since the mirror payload talks to nothing else. Nothing a
/// mirror vCPU does here stops the VM.
pub fn mirror_devices(links: &Arc<HelperLinks>) -> Result<Arc<Bus>, DeviceError> {
    let mut bus = Bus::new();
    bus.insert(Arc::new(DebugPort::default()), DEBUG_PORT, 1)?;
    let links = links.clone();
    let refusal_reported = AtomicBool::new(false);
    let port = LabPort::new(move |request| match request {
        LabRequest::Wait(index) => links.wait(usize::from(index), WAIT_TIMEOUT),
        LabRequest::Yield => std::thread::sleep(YIELD_SLEEP),
        LabRequest::HelperRefused => {
            if !refusal_reported.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "A migration helper serves nothing: its launch configuration is unusable \
                     or its index is out of range or another helper's"
                );
            }
            std::thread::sleep(REFUSED_SLEEP);
        }
        other => log::warn!("mirror: ignored lab request {other:?}"),
    });
    bus.insert(Arc::new(port), u64::from(abi::LAB_PORT), LAB_PORT_LEN)?;
    Ok(Arc::new(bus))
}

fn serial_output(config: &SerialConfig) -> Result<Box<dyn Write + Send>, DeviceError> {
    Ok(match config {
        SerialConfig::Stdio => Box::new(std::io::stdout()),
        SerialConfig::Null => Box::new(std::io::sink()),
        SerialConfig::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| DeviceError::SerialFile(path.clone(), e))?;
            Box::new(LineWriter::new(file))
        }
    })
}

fn add_serial(
    bus: &mut Bus,
    vm: &VmFd,
    config: &SerialConfig,
) -> Result<Arc<SerialDevice>, DeviceError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.register_irqfd(&irq, SERIAL_IRQ)
        .map_err(|e| DeviceError::Irqfd(SERIAL_IRQ, e))?;
    let serial = Arc::new(SerialDevice::new(
        EventFdTrigger(irq),
        serial_output(config)?,
    ));
    bus.insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
    Ok(serial)
}

fn add_i8042(bus: &mut Bus, exit: &ExitHandle) -> Result<(), DeviceError> {
    let exit = exit.clone();
    let reset = CallbackTrigger(Box::new(move || exit.request(ExitReason::Reset)));
    bus.insert(Arc::new(I8042::new(reset)), I8042_PORT_BASE, I8042_PORT_LEN)?;
    Ok(())
}

fn add_cmos(bus: &mut Bus, memory: &Memory) -> Result<Arc<Cmos>, DeviceError> {
    let cmos = Arc::new(Cmos::new(
        memory.layout.below_4g(),
        memory.layout.above_4g(),
    ));
    bus.insert(cmos.clone(), CMOS_PORT_BASE, CMOS_PORT_LEN)?;
    Ok(cmos)
}

fn add_fw_cfg(
    bus: &mut Bus,
    config: &VmmConfig,
    memory: &Memory,
) -> Result<Arc<FwCfg>, DeviceError> {
    let mut dev = FwCfg::new(Some(memory.ram.clone()));
    let cpus = (config.cpus as u16).to_le_bytes().to_vec();
    dev.set_item(keys::NB_CPUS, cpus.clone());
    dev.set_item(keys::MAX_CPUS, cpus);
    dev.set_item(keys::RAM_SIZE, memory.layout.size.to_le_bytes().to_vec());
    dev.add_file("etc/e820", fw_cfg::e820_file(&memory.layout.e820()))?;
    if let BootConfig::Firmware {
        kernel: Some(linux),
        ..
    } = &config.boot
    {
        add_fw_cfg_kernel(&mut dev, linux)?;
    }
    let dev = Arc::new(dev);
    bus.insert(dev.clone(), FW_CFG_PORT_BASE, FW_CFG_PORT_LEN)?;
    Ok(dev)
}

/// The kernel, initrd and command line for firmware to boot, in QEMU's
/// items: a bzImage goes as setup sectors plus the rest.
fn add_fw_cfg_kernel(dev: &mut FwCfg, linux: &LinuxConfig) -> Result<(), DeviceError> {
    let read =
        |p: &std::path::PathBuf| std::fs::read(p).map_err(|e| DeviceError::Read(p.clone(), e));
    let image = read(&linux.kernel)?;
    let (setup, kernel) = split_bzimage(&image).unwrap_or((&[], &image));
    let size = |b: &[u8]| (b.len() as u32).to_le_bytes().to_vec();
    dev.set_item(keys::SETUP_SIZE, size(setup));
    dev.set_item(keys::SETUP_DATA, setup.to_vec());
    dev.set_item(keys::KERNEL_SIZE, size(kernel));
    dev.set_item(keys::KERNEL_DATA, kernel.to_vec());
    if let Some(p) = &linux.initrd {
        let initrd = read(p)?;
        dev.set_item(keys::INITRD_SIZE, size(&initrd));
        dev.set_item(keys::INITRD_DATA, initrd);
    }
    let mut cmdline = linux.cmdline.clone().into_bytes();
    cmdline.push(0);
    dev.set_item(keys::CMDLINE_SIZE, size(&cmdline));
    dev.set_item(keys::CMDLINE_DATA, cmdline);
    Ok(())
}

/// The lab port; its shared/private requests feed `shared`.
fn add_lab_port(
    bus: &mut Bus,
    exit: &ExitHandle,
    ram: Vec<(u64, u64)>,
    shared: Arc<Mutex<SharedMap>>,
) -> Result<(), DeviceError> {
    let exit = exit.clone();
    let port = LabPort::new(move |request| match request {
        LabRequest::PowerOff => exit.request(ExitReason::PowerOff),
        LabRequest::Fail => exit.request(ExitReason::GuestFailure),
        LabRequest::Yield => std::thread::sleep(YIELD_SLEEP),
        LabRequest::MapBlock {
            block,
            shared: to_shared,
        } => {
            let start = u64::from(block) * abi::LAB_SHARE_BLOCK;
            map_gpa_range(&shared, &ram, start, abi::LAB_SHARE_BLOCK / 4096, to_shared);
        }
        other => log::warn!("guest: ignored lab request {other:?}"),
    });
    bus.insert(Arc::new(port), u64::from(abi::LAB_PORT), LAB_PORT_LEN)?;
    Ok(())
}

/// A guest's request to make `pages` pages from `gpa` shared or private
/// (KVM_HC_MAP_GPA_RANGE, or the lab port standing in for it); whether it
/// was taken. A bad range is logged and refused, never fatal.
pub fn map_gpa_range(
    shared: &Mutex<SharedMap>,
    ram: &[(u64, u64)],
    gpa: u64,
    pages: u64,
    to_shared: bool,
) -> bool {
    let end = pages
        .checked_mul(4096)
        .and_then(|len| gpa.checked_add(len))
        .unwrap_or(u64::MAX);
    let mut map = shared.lock().expect("shared map lock poisoned");
    match map.set(ram, gpa, end, to_shared) {
        Ok(()) => {
            log::debug!(
                "Guest made {gpa:#x}..{end:#x} {}",
                if to_shared { "shared" } else { "private" }
            );
            true
        }
        Err(e) => {
            log::warn!("Guest's memory conversion refused: {e}");
            false
        }
    }
}
