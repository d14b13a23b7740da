//! Firmware boot (`--firmware FILE`): the image (OVMF, SeaBIOS) is mapped
//! read-only so that it ends at 4 GiB, and every vCPU keeps KVM's reset
//! state, so the BSP starts at the reset vector 0xffff_fff0 inside it.
//! The firmware learns the rest (E820, CPUs, kernel) through fw_cfg.

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::memory::map_ranges;

/// The image ends here.
pub const FIRMWARE_END: u64 = 1 << 32;
/// Largest image: it must stay above the IOAPIC/LAPIC window and the mirror
/// region (0xff00_0000 and up is free).
pub const FIRMWARE_MAX: u64 = 16 << 20;
use cgsvmm_fw_abi::PAGE_SIZE_U64 as PAGE_SIZE;

/// A firmware image mapped for the guest.
pub struct Firmware {
    /// The mapping (one region ending at 4 GiB).
    pub memory: GuestMemoryMmap,
    /// Where it starts.
    pub base: u64,
}

/// Where an image of `size` bytes starts, or why it cannot be used.
fn placement(size: u64) -> Result<u64, String> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
        return Err(format!("size {size} is not a non-zero multiple of 4 KiB"));
    }
    if size > FIRMWARE_MAX {
        return Err(format!("size {size} exceeds {FIRMWARE_MAX} bytes"));
    }
    Ok(FIRMWARE_END - size)
}

/// Reads and maps the image at `path`.
pub fn load(path: &Path) -> Result<Firmware, BootError> {
    let fail = |why: String| BootError::Firmware {
        path: PathBuf::from(path),
        why,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let base = placement(bytes.len() as u64).map_err(fail)?;
    let memory = map_ranges(&[(base, bytes.len() as u64)]).map_err(|e| fail(e.to_string()))?;
    memory
        .write_slice(&bytes, GuestAddress(base))
        .map_err(|_| BootError::GuestWrite {
            what: "firmware",
            gpa: base,
        })?;
    Ok(Firmware { memory, base })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_ends_at_4g() {
        assert_eq!(placement(2 << 20), Ok(0xffe0_0000));
        assert_eq!(placement(4 << 20), Ok(0xffc0_0000));
        assert!(placement(0).is_err());
        assert!(placement(4095).is_err());
        assert!(placement(32 << 20).is_err());
        // Never overlaps the LAPIC page or the mirror region.
        let lowest = placement(FIRMWARE_MAX).unwrap();
        assert!(lowest >= 0xfee0_1000);
        assert!(lowest >= cgsvmm_fw_abi::MIRROR_REGION_GPA + cgsvmm_fw_abi::MIRROR_REGION_SIZE);
    }

    #[test]
    fn load_maps_the_image_with_the_reset_vector_at_the_top() {
        let path = std::env::temp_dir().join(format!("cgsvmm-fw-test-{}", std::process::id()));
        let mut image = vec![0u8; 2 << 20];
        let len = image.len();
        image[len - 16] = 0xea; // a far jump at the reset vector
        std::fs::write(&path, &image).unwrap();
        let fw = load(&path).unwrap();
        assert_eq!(fw.base, 0xffe0_0000);
        assert_eq!(
            fw.memory.read_obj::<u8>(GuestAddress(0xffff_fff0)).unwrap(),
            0xea
        );
        std::fs::write(&path, [0u8; 100]).unwrap();
        assert!(matches!(load(&path), Err(BootError::Firmware { .. })));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(load(&path), Err(BootError::Firmware { .. })));
    }
}
