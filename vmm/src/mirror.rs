//! The mirror side of a VM: what runs on the mirror vCPUs and what they
//! publish.
//!
//! Either the migration helper (when the VM has a transport key) or, without
//! one, a small payload that counts and probes guest memory. Both live in the
//! mirror region, outside guest RAM, with their own GDT, TSSes, stacks and
//! page tables there. The tables map all of guest RAM plus the mirror region,
//! so the payload sees the guest's memory; the guest's own tables never map
//! the region. For the helper, the VMM also writes its launch configuration
//! (RAM ranges, helper count, TSC rate) and the secret page (the transport
//! key; with SEV this would be LAUNCH_SECRET), at addresses the helper image
//! itself publishes in its header.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use cgsvmm_fw_abi::{self as abi, MirrorParams, MirrorStatus};

use crate::boot::cpl3::{self, MIRROR_LAYOUT};
use cgsvmm_fw_abi::helper::{self, HelperConfig, HelperHeader, HelperSecret};

use crate::boot::images::{Image, HELPER, MIRROR};
use crate::boot::{BootError, VcpuBoot};
use crate::memory::Memory;

/// The guest-RAM word the payload copies into its status: the first word of
/// the lab data area, where the dirtier's vCPU 0 keeps its pass number.
pub const PROBE_GPA: u64 = abi::LAB_DATA_GPA;

/// Where mirror vCPU `i` publishes its status.
pub fn status_gpa(i: usize) -> u64 {
    abi::MIRROR_STATUS_GPA + (i * size_of::<MirrorStatus>()) as u64
}

/// How the migration helper is launched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HelperLaunch {
    /// The transport key (none: the helper refuses sessions).
    pub key: Option<[u8; 32]>,
    /// Allow the debug commands (hang, fault): tests only.
    pub debug: bool,
}

/// The image that runs on the mirror vCPUs.
pub fn payload(helper: Option<&HelperLaunch>) -> Image {
    if helper.is_some() {
        HELPER
    } else {
        MIRROR
    }
}

/// Loads the mirror payload and its boot structures into the mirror region
/// and returns how each of the `vcpus` mirror vCPUs enters it.
pub fn prepare(memory: &Memory, vcpus: usize, image: Image) -> Result<Vec<VcpuBoot>, BootError> {
    let mem = &memory.mirror;
    let entry = image.load(mem)?;
    let mut mapped = memory.layout.ram_ranges();
    mapped.push((abi::MIRROR_REGION_GPA, abi::MIRROR_REGION_SIZE));
    let boots = cpl3::prepare(mem, &MIRROR_LAYOUT, &mapped, vcpus, entry)?;
    for i in 0..vcpus {
        let params = MirrorParams {
            magic: abi::PARAMS_MAGIC,
            vcpu_index: i as u64,
            status_gpa: status_gpa(i),
            probe_gpa: PROBE_GPA,
        };
        let gpa = MIRROR_LAYOUT.params_gpa(i);
        mem.write_slice(params.as_bytes(), GuestAddress(gpa))
            .map_err(|_| BootError::GuestWrite {
                what: "mirror parameters",
                gpa,
            })?;
        mem.write_slice(
            MirrorStatus::default().as_bytes(),
            GuestAddress(status_gpa(i)),
        )
        .map_err(|_| BootError::GuestWrite {
            what: "mirror status",
            gpa: status_gpa(i),
        })?;
    }
    Ok(boots)
}

/// Writes the helper's launch configuration and secret page; checks that
/// its generation table covers guest RAM.
pub fn write_helper_config(
    memory: &Memory,
    header: &HelperHeader,
    helpers: usize,
    launch: &HelperLaunch,
    tsc_khz: u64,
) -> Result<(), BootError> {
    let pages = memory.layout.size / helper::PAGE_SIZE as u64;
    if pages * 4 > header.gen_table_size {
        return Err(BootError::DoesNotFit(format!(
            "the migration helper tracks at most {} MiB of guest RAM",
            (header.gen_table_size / 4 * helper::PAGE_SIZE as u64) >> 20
        )));
    }
    if helpers > header.max_helpers as usize {
        return Err(BootError::TooManyVcpus(
            helpers,
            header.max_helpers as usize,
        ));
    }
    let ranges = memory.layout.ram_ranges();
    let mut config = HelperConfig {
        magic: helper::CONFIG_MAGIC,
        helper_count: helpers as u32,
        c_bit: 0,
        tsc_khz,
        flags: if launch.debug {
            helper::CONFIG_FLAG_DEBUG
        } else {
            0
        },
        ram_range_count: ranges.len() as u64,
        ..Default::default()
    };
    for (slot, (start, len)) in config.ram.iter_mut().zip(ranges) {
        *slot = abi::GpaRange {
            start,
            end: start + len,
        };
    }
    let write = |what, gpa: u64, bytes: &[u8]| {
        memory
            .mirror
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|_| BootError::GuestWrite { what, gpa })
    };
    write("helper config", header.config_gpa, config.as_bytes())?;
    let secret = match launch.key {
        Some(key) => HelperSecret {
            magic: helper::CONFIG_MAGIC,
            reserved: 0,
            key,
        },
        None => HelperSecret::default(),
    };
    write("helper secret", header.secret_gpa, secret.as_bytes())
}

/// Helper `i`'s heartbeat: how often it woke up idle.
pub fn helper_heartbeat(memory: &Memory, header: &HelperHeader, i: usize) -> u64 {
    cgsvmm_migration::helper::heartbeat(
        &memory.mirror,
        header.mailbox_gpa + i as u64 * header.mailbox_stride,
    )
}

/// What mirror vCPU `i` last published.
pub fn read_status(memory: &Memory, i: usize) -> MirrorStatus {
    let load = |offset: u64| {
        memory
            .mirror
            .load::<u64>(GuestAddress(status_gpa(i) + offset), Ordering::Acquire)
            .unwrap_or(0)
    };
    MirrorStatus {
        counter: load(0),
        probe_value: load(std::mem::offset_of!(MirrorStatus, probe_value) as u64),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MIB;

    #[test]
    fn helper_config_names_ram_and_the_key() {
        let memory = Memory::new(32 * MIB).unwrap();
        let header = HELPER.helper_header().unwrap();
        let launch = HelperLaunch {
            key: Some([7; 32]),
            debug: true,
        };
        write_helper_config(&memory, &header, 2, &launch, 2_000_000).unwrap();
        let mut bytes = [0u8; size_of::<HelperConfig>()];
        memory
            .mirror
            .read_slice(&mut bytes, GuestAddress(header.config_gpa))
            .unwrap();
        let c = <HelperConfig as zerocopy::FromBytes>::read_from_bytes(&bytes).unwrap();
        assert_eq!(
            (c.magic, c.helper_count, c.flags, c.ram_range_count),
            (helper::CONFIG_MAGIC, 2, 1, 1)
        );
        assert_eq!((c.ram[0].start, c.ram[0].end), (0, 32 * MIB));
        let key: [u8; 32] = memory
            .mirror
            .read_obj(GuestAddress(header.secret_gpa + 16))
            .unwrap();
        assert_eq!(key, [7; 32]);
        // More helpers than mailboxes, or more RAM than the table covers, fail.
        assert!(write_helper_config(&memory, &header, 99, &launch, 1).is_err());
        let big = HelperHeader {
            gen_table_size: 4096,
            ..header
        };
        assert!(write_helper_config(&memory, &big, 1, &launch, 1).is_err());
    }

    #[test]
    fn status_entries_fill_the_status_page() {
        assert_eq!(status_gpa(0), abi::MIRROR_REGION_GPA);
        assert_eq!(status_gpa(1) - status_gpa(0), 64);
        assert!(status_gpa(abi::MAX_MIRROR_VCPUS) <= abi::MIRROR_REGION_GPA + 0x1000);
    }

    #[test]
    fn prepare_writes_params_and_clears_status() {
        let memory = Memory::new(32 * MIB).unwrap();
        memory
            .mirror
            .write_obj(77u64, GuestAddress(status_gpa(1)))
            .unwrap();
        let boots = prepare(&memory, 2, MIRROR).unwrap();
        assert_eq!(boots.len(), 2);
        assert_eq!(read_status(&memory, 1).counter, 0);
        let mut bytes = [0u8; size_of::<MirrorParams>()];
        memory
            .mirror
            .read_slice(&mut bytes, GuestAddress(MIRROR_LAYOUT.params_gpa(1)))
            .unwrap();
        let p = <MirrorParams as zerocopy::FromBytes>::read_from_bytes(&bytes).unwrap();
        assert_eq!(
            (p.magic, p.vcpu_index, p.status_gpa, p.probe_gpa),
            (abi::PARAMS_MAGIC, 1, status_gpa(1), PROBE_GPA)
        );
    }
}
