//! The mirror side of a VM: what runs on the mirror vCPUs and what they
//! publish.
//!
//! The mirror payload (and later the migration helper) lives in the mirror
//! region, outside guest RAM, with its own GDT, TSSes, stacks and page
//! tables there. Its tables map all of guest RAM plus the mirror region, so
//! it sees the guest's memory; the guest's own tables never map the region.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress};
use zerocopy::IntoBytes;

use cgsvmm_fw_abi::{self as abi, MirrorParams, MirrorStatus};

use crate::boot::cpl3::{self, MIRROR_LAYOUT};
use crate::boot::images::MIRROR;
use crate::boot::{BootError, VcpuBoot};
use crate::memory::Memory;

/// The guest-RAM word the payload copies into its status: the first word of
/// the lab data area, where the dirtier's vCPU 0 keeps its pass number.
pub const PROBE_GPA: u64 = abi::LAB_DATA_GPA;

/// Where mirror vCPU `i` publishes its status.
pub fn status_gpa(i: usize) -> u64 {
    abi::MIRROR_STATUS_GPA + (i * size_of::<MirrorStatus>()) as u64
}

/// Loads the mirror payload and its boot structures into the mirror region
/// and returns how each of the `vcpus` mirror vCPUs enters it.
pub fn prepare(memory: &Memory, vcpus: usize) -> Result<Vec<VcpuBoot>, BootError> {
    let mem = &memory.mirror;
    let entry = MIRROR.load(mem)?;
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
        let boots = prepare(&memory, 2).unwrap();
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
