//! The bare-metal images built from `firmware/guests` and embedded in the
//! binary, and the checks on their [`ImageHeader`] before one is loaded.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::FromBytes;

use cgsvmm_fw_abi::helper::{self, HelperHeader};
use cgsvmm_fw_abi::{self as abi, ImageHeader};

use super::BootError;

/// An embedded image.
#[derive(Debug, Clone, Copy)]
pub struct Image {
    /// Name (also the guest name on the command line).
    pub name: &'static str,
    /// Flat image bytes, header first.
    pub bytes: &'static [u8],
    /// Expected `ImageHeader::kind`.
    pub kind: u32,
    /// Where it must be linked.
    pub load_addr: u64,
    /// Most bytes (image plus bss) it may occupy.
    pub max_size: u64,
}

/// The default lab guest.
pub const DIRTIER: Image = Image {
    name: "dirtier",
    bytes: include_bytes!(concat!(env!("OUT_DIR"), "/dirtier.bin")),
    kind: abi::IMAGE_KIND_LAB,
    load_addr: abi::LAB_IMAGE_GPA,
    max_size: super::cpl3::LAB_IMAGE_MAX,
};

/// Prints one line and powers off.
pub const HELLO: Image = Image {
    name: "hello",
    bytes: include_bytes!(concat!(env!("OUT_DIR"), "/hello.bin")),
    kind: abi::IMAGE_KIND_LAB,
    load_addr: abi::LAB_IMAGE_GPA,
    max_size: super::cpl3::LAB_IMAGE_MAX,
};

/// The migration helper (mirror vCPUs, when a transport key is given).
pub const HELPER: Image = Image {
    name: "mh",
    bytes: include_bytes!(concat!(env!("OUT_DIR"), "/mh.bin")),
    kind: abi::IMAGE_KIND_HELPER,
    load_addr: abi::MIRROR_IMAGE_GPA,
    max_size: super::cpl3::MIRROR_IMAGE_MAX,
};

/// The mirror payload when no helper runs: counts and probes guest memory.
pub const MIRROR: Image = Image {
    name: "mirror",
    bytes: include_bytes!(concat!(env!("OUT_DIR"), "/mirror.bin")),
    kind: abi::IMAGE_KIND_MIRROR,
    load_addr: abi::MIRROR_IMAGE_GPA,
    max_size: super::cpl3::MIRROR_IMAGE_MAX,
};

impl Image {
    /// The validated header.
    pub fn header(&self) -> Result<ImageHeader, BootError> {
        let bad = |why: String| BootError::BadImage {
            name: self.name,
            why,
        };
        let (header, _) = ImageHeader::read_from_prefix(self.bytes).map_err(|_| {
            bad(format!(
                "{} bytes is too short for a header",
                self.bytes.len()
            ))
        })?;
        if header.magic != abi::IMAGE_MAGIC || header.version != abi::IMAGE_HEADER_VERSION {
            return Err(bad("bad magic or header version".into()));
        }
        if header.kind != self.kind {
            return Err(bad(format!(
                "kind {} where {} was expected",
                header.kind, self.kind
            )));
        }
        if header.load_addr != self.load_addr {
            return Err(bad(format!(
                "linked at {:#x}, expected {:#x}",
                header.load_addr, self.load_addr
            )));
        }
        let end = self.load_addr + self.bytes.len() as u64;
        if header.image_end < end || header.image_end - self.load_addr > self.max_size {
            return Err(bad(format!(
                "image end {:#x} out of bounds",
                header.image_end
            )));
        }
        if header.entry < self.load_addr || header.entry >= end {
            return Err(bad(format!("entry {:#x} outside the image", header.entry)));
        }
        Ok(header)
    }

    /// Copies the image into `mem`, zeroes its bss, and returns the entry.
    pub fn load(&self, mem: &GuestMemoryMmap) -> Result<u64, BootError> {
        let header = self.header()?;
        let fail = |gpa| BootError::GuestWrite { what: "image", gpa };
        mem.write_slice(self.bytes, GuestAddress(self.load_addr))
            .map_err(|_| fail(self.load_addr))?;
        let bss_start = self.load_addr + self.bytes.len() as u64;
        let zeros = vec![0u8; (header.image_end - bss_start) as usize];
        mem.write_slice(&zeros, GuestAddress(bss_start))
            .map_err(|_| fail(bss_start))?;
        Ok(header.entry)
    }
}

impl Image {
    /// The helper header that follows the image header of an MH image,
    /// checked against the mirror region: the VMM learns every helper page
    /// from it and trusts none of it blindly.
    pub fn helper_header(&self) -> Result<HelperHeader, BootError> {
        let image = self.header()?;
        let bad = |why: String| BootError::BadImage {
            name: self.name,
            why,
        };
        let offset = size_of::<ImageHeader>();
        let (h, _) = HelperHeader::read_from_prefix(self.bytes.get(offset..).unwrap_or_default())
            .map_err(|_| bad("too short for a helper header".into()))?;
        if h.magic != helper::HELPER_MAGIC || h.abi_version != helper::MH_ABI_VERSION {
            return Err(bad("bad helper magic or ABI version".into()));
        }
        let region = abi::MIRROR_REGION_GPA..abi::MIRROR_REGION_GPA + abi::MIRROR_REGION_SIZE;
        let inside = |start: u64, len: u64| {
            start
                .checked_add(len)
                .is_some_and(|end| region.contains(&start) && end <= region.end)
        };
        let mailboxes = h.mailbox_stride.saturating_mul(u64::from(h.max_helpers));
        let checks = [
            (
                h.config_gpa >= image.image_end && inside(h.config_gpa, 4096),
                "config page",
            ),
            (
                h.secret_gpa >= h.config_gpa + 4096 && inside(h.secret_gpa, 4096),
                "secret page",
            ),
            (
                h.mailbox_gpa >= h.secret_gpa + 4096 && inside(h.mailbox_gpa, mailboxes),
                "mailboxes",
            ),
            (
                h.mailbox_stride >= helper::MAILBOX_SIZE as u64 && h.mailbox_gpa % 4096 == 0,
                "mailbox stride",
            ),
            (
                h.gen_table_gpa >= h.mailbox_gpa + mailboxes
                    && inside(h.gen_table_gpa, h.gen_table_size),
                "generation table",
            ),
            (
                h.max_helpers >= 1 && h.max_helpers <= helper::MAX_HELPERS,
                "helper count",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, what)) => Err(bad(format!("{what} out of place"))),
            None => Ok(h),
        }
    }
}

/// The lab guest called `name`.
pub fn lab_guest(name: &str) -> Option<Image> {
    [DIRTIER, HELLO].into_iter().find(|i| i.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_images_have_valid_headers() {
        for image in [DIRTIER, HELLO, MIRROR, HELPER] {
            let h = image
                .header()
                .unwrap_or_else(|e| panic!("{}: {e}", image.name));
            assert_eq!(h.load_addr, image.load_addr);
            assert!(h.entry > h.load_addr);
        }
        assert!(lab_guest("dirtier").is_some());
        assert!(lab_guest("mirror").is_none());
        let h = HELPER.helper_header().unwrap();
        assert!(h.max_helpers >= 2);
        assert!(MIRROR.helper_header().is_err());
    }

    #[test]
    fn rejects_mismatched_images() {
        let wrong_kind = Image {
            kind: abi::IMAGE_KIND_MIRROR,
            ..HELLO
        };
        assert!(matches!(
            wrong_kind.header(),
            Err(BootError::BadImage { .. })
        ));
        let wrong_addr = Image {
            load_addr: 0x20_0000,
            ..HELLO
        };
        assert!(wrong_addr.header().is_err());
        let truncated = Image {
            bytes: &HELLO.bytes[..16],
            ..HELLO
        };
        assert!(truncated.header().is_err());
        let mut corrupt = HELLO.bytes.to_vec();
        corrupt[0] ^= 1;
        let corrupt = Image {
            bytes: Box::leak(corrupt.into_boxed_slice()),
            ..HELLO
        };
        assert!(corrupt.header().is_err());
    }

    #[test]
    fn load_writes_image_and_zeroes_bss() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let header = DIRTIER.header().unwrap();
        let bss = DIRTIER.load_addr + DIRTIER.bytes.len() as u64;
        if header.image_end > bss {
            mem.write_obj(0xffu8, GuestAddress(bss)).unwrap();
        }
        assert_eq!(DIRTIER.load(&mem).unwrap(), header.entry);
        let mut head = [0u8; 8];
        mem.read_slice(&mut head, GuestAddress(DIRTIER.load_addr))
            .unwrap();
        assert_eq!(head, abi::IMAGE_MAGIC);
        if header.image_end > bss {
            assert_eq!(mem.read_obj::<u8>(GuestAddress(bss)).unwrap(), 0);
        }
    }
}
