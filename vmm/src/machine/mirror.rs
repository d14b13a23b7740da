//! The mirror side of a VM: what runs on the mirror vCPUs and what they
//! publish.
//!
//! Either the migration helper (when the VM has a transport key) or, without
//! one, a small payload that counts and probes guest memory. Both live in the
//! mirror region, outside guest RAM, with their own GDT, TSSes, stacks and
//! page tables there. The tables map all of guest RAM plus the mirror region,
//! so the payload sees the guest's memory; the guest's own tables never map
//! the region. With SEV they map all of it private (C-bit) but the helper's
//! mailboxes. For the helper, the VMM also writes its launch configuration
//! (RAM ranges, helper count, TSC rate, C-bit position) and, without SEV,
//! the secret page (the transport key; with SEV the guest owner's
//! LAUNCH_SECRET fills it), at addresses the helper image itself publishes
//! in its header.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use cgsvmm_fw_abi::{self as abi, MirrorParams, MirrorStatus};

use crate::boot::cpl3::{self, MIRROR_LAYOUT};
use cgsvmm_fw_abi::helper::{self, HelperConfig, HelperHeader, HelperSecret};

use crate::boot::images::{Image, HELPER, MIRROR};
use crate::boot::{BootError, VcpuBoot};
use crate::config::HelperLaunch;
use crate::memory::Memory;
use crate::x86::paging::{Mapping, PTE_USER};

/// Mapping granule of the mirror's page tables.
const HUGE_PAGE: u64 = 2 << 20;

/// The guest-RAM word the payload copies into its status: the first word of
/// the lab data area, where the dirtier's vCPU 0 keeps its pass number.
pub const PROBE_GPA: u64 = abi::LAB_DATA_GPA;

/// Where mirror vCPU `i` publishes its status.
pub fn status_gpa(i: usize) -> u64 {
    abi::MIRROR_STATUS_GPA + (i * size_of::<MirrorStatus>()) as u64
}

/// The image that runs on the mirror vCPUs.
pub fn payload(helper: Option<&HelperLaunch>) -> Image {
    if helper.is_some() {
        HELPER
    } else {
        MIRROR
    }
}

/// What the mirror vCPUs map: all guest RAM and the mirror region, private
/// (`private`: the C-bit with SEV, else 0), except the helper's mailboxes,
/// which it shares with the host. Mappings are 2 MiB pages, so the
/// mailboxes must not share one with private data.
pub fn mappings(memory: &Memory, image: &Image, private: u64) -> Result<Vec<Mapping>, BootError> {
    let leaf = PTE_USER | private;
    let mut mapped = memory.layout.ram_mappings(leaf);
    let (region, region_end) = (
        abi::MIRROR_REGION_GPA,
        abi::MIRROR_REGION_GPA + abi::MIRROR_REGION_SIZE,
    );
    let Ok(header) = image.helper_header() else {
        mapped.push(Mapping::new(region, abi::MIRROR_REGION_SIZE, leaf));
        return Ok(mapped);
    };
    let shared_start = header.mailbox_gpa & !(HUGE_PAGE - 1);
    let shared_end = (header.mailbox_gpa + header.mailbox_stride * u64::from(header.max_helpers))
        .next_multiple_of(HUGE_PAGE);
    let private_items = [
        (header.config_gpa, 4096),
        (header.secret_gpa, 4096),
        (header.gen_table_gpa, header.gen_table_size),
        (abi::MIRROR_IMAGE_GPA, 4096),
    ];
    if private_items
        .iter()
        .any(|&(start, len)| start < shared_end && start + len > shared_start)
    {
        return Err(BootError::DoesNotFit(
            "the helper's mailboxes share a 2 MiB page with its private data".into(),
        ));
    }
    mapped.push(Mapping::new(region, shared_start - region, leaf));
    mapped.push(Mapping::new(
        shared_start,
        shared_end - shared_start,
        PTE_USER,
    ));
    mapped.push(Mapping::new(shared_end, region_end - shared_end, leaf));
    Ok(mapped)
}

/// Loads the mirror payload and its boot structures into the mirror region
/// and returns how each of the `vcpus` mirror vCPUs enters it. With SEV,
/// `c_bit` is the C-bit's position in page-table entries (0: none).
pub fn prepare(
    memory: &Memory,
    vcpus: usize,
    image: Image,
    c_bit: u32,
) -> Result<Vec<VcpuBoot>, BootError> {
    let mem = &memory.mirror;
    let entry = image.load(mem)?;
    let private = c_bit_mask(c_bit);
    let mapped = mappings(memory, &image, private)?;
    let boots = cpl3::prepare(
        mem,
        &MIRROR_LAYOUT,
        &mapped,
        private,
        vcpus,
        entry,
        cpl3::Ring::User,
    )?;
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

/// The page-table bit of C-bit position `c_bit` (0: no memory encryption).
pub fn c_bit_mask(c_bit: u32) -> u64 {
    match c_bit {
        1..=63 => 1 << c_bit,
        _ => 0,
    }
}

/// Writes the helper's launch configuration and secret page; checks that
/// its generation table covers guest RAM.
pub fn write_helper_config(
    memory: &Memory,
    header: &HelperHeader,
    helpers: usize,
    launch: &HelperLaunch,
    tsc_khz: u64,
    c_bit: u32,
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
        c_bit,
        tsc_khz,
        flags: [
            (launch.debug, helper::CONFIG_FLAG_DEBUG),
            (launch.generic_seal, helper::CONFIG_FLAG_GENERIC_SEAL),
            (launch.no_hw_entropy, helper::CONFIG_FLAG_NO_HW_ENTROPY),
            (launch.incoming, helper::CONFIG_FLAG_INCOMING),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |flags, (_, flag)| flags | flag),
        ram_range_count: ranges.len() as u64,
        vm_id: launch.vm_id,
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
            ..Default::default()
        };
        write_helper_config(&memory, &header, 2, &launch, 2_000_000, 0).unwrap();
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
        assert!(write_helper_config(&memory, &header, 99, &launch, 1, 0).is_err());
        let big = HelperHeader {
            gen_table_size: 4096,
            ..header
        };
        assert!(write_helper_config(&memory, &big, 1, &launch, 1, 0).is_err());
    }

    #[test]
    fn with_sev_only_the_mailboxes_are_mapped_shared() {
        let memory = Memory::new(32 * MIB).unwrap();
        let header = HELPER.helper_header().unwrap();
        let c_bit = c_bit_mask(47);
        let map = mappings(&memory, &HELPER, c_bit).unwrap();
        let leaf_at = |gpa: u64| {
            map.iter()
                .find(|m| (m.start..m.start + m.len).contains(&gpa))
                .map(|m| m.leaf)
        };
        for private in [
            0,
            32 * MIB - 1,
            abi::MIRROR_REGION_GPA,
            header.config_gpa,
            header.secret_gpa,
            header.gen_table_gpa,
        ] {
            assert_eq!(leaf_at(private), Some(PTE_USER | c_bit), "{private:#x}");
        }
        let last_mailbox =
            header.mailbox_gpa + header.mailbox_stride * u64::from(header.max_helpers) - 1;
        for shared in [header.mailbox_gpa, last_mailbox] {
            assert_eq!(leaf_at(shared), Some(PTE_USER), "{shared:#x}");
        }
        // The whole region is mapped, once.
        let region: u64 = map
            .iter()
            .filter(|m| m.start >= abi::MIRROR_REGION_GPA)
            .map(|m| m.len)
            .sum();
        assert_eq!(region, abi::MIRROR_REGION_SIZE);
        // Without SEV nothing is marked, and the counting payload maps its
        // region as one.
        assert!(mappings(&memory, &HELPER, 0)
            .unwrap()
            .iter()
            .all(|m| m.leaf == PTE_USER));
        assert_eq!(mappings(&memory, &MIRROR, c_bit).unwrap().len(), 2);
        assert_eq!((c_bit_mask(0), c_bit_mask(51)), (0, 1 << 51));
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
        let boots = prepare(&memory, 2, MIRROR, 0).unwrap();
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
