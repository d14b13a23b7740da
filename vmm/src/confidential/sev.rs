//! The AMD SEV backend: launching a VM whose memory the host cannot read.
//!
//! Sequence (AMD SEV API and the kernel's `amd-memory-encryption.rst`):
//!
//! ```text
//! VMM                                   KVM / SEV firmware (PSP)
//!  | open /dev/sev                       |
//!  | KVM_SEV_INIT (main VM) ------------>|  the VM gets an ASID
//!  | KVM_MEMORY_ENCRYPT_REG_REGION x n ->|  guest RAM and mirror region pinned
//!  | mirror VM: KVM_CAP_VM_COPY_ENC_CONTEXT_FROM(main VM)
//!  | LAUNCH_START {policy, owner's DH cert, session} -> launch context
//!  | LAUNCH_UPDATE_DATA over firmware and the helper's private pages
//!  |   (code, data, stacks, page tables, config): encrypted in place, measured
//!  | LAUNCH_MEASURE -------------------->|  measurement (to the guest owner)
//!  | LAUNCH_SECRET {header, secret} ---->|  the transport key, decrypted by the
//!  |                                     |  PSP into the helper's secret page
//!  | LAUNCH_FINISH --------------------->|  vCPUs may run
//! ```
//!
//! The guest owner checks the measurement before releasing the secret; a
//! host that changed the helper gets no transport key. The secret packet is
//! passed as a file holding QEMU's `sev-inject-launch-secret` arguments:
//! `{"packet-header": "<base64>", "secret": "<base64>"}`.
//!
//! Nothing here runs on the lab hosts (no SEV hardware): the code follows
//! the specifications, its pure parts are unit-tested, and a VM asked to
//! use SEV on a host without it fails with the reason.

use base64::Engine as _;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use kvm_bindings::{
    kvm_enable_cap, kvm_enc_region, kvm_sev_cmd, kvm_sev_launch_measure, kvm_sev_launch_secret,
    kvm_sev_launch_start, kvm_sev_launch_update_data, sev_cmd_id_KVM_SEV_INIT,
    sev_cmd_id_KVM_SEV_LAUNCH_FINISH, sev_cmd_id_KVM_SEV_LAUNCH_MEASURE,
    sev_cmd_id_KVM_SEV_LAUNCH_SECRET, sev_cmd_id_KVM_SEV_LAUNCH_START,
    sev_cmd_id_KVM_SEV_LAUNCH_UPDATE_DATA, KVM_CAP_VM_COPY_ENC_CONTEXT_FROM,
};
use kvm_ioctls::VmFd;

use crate::memory::MemSlot;

/// The SEV device.
const SEV_DEVICE: &str = "/dev/sev";
/// Bytes of a LAUNCH_SECRET packet header (flags, IV, MAC).
pub const PACKET_HEADER_LEN: usize = 52;
/// Default guest policy: no debugging, no key sharing (SEV API, 3).
pub const DEFAULT_POLICY: u32 = 0x1 | 0x2;

/// Errors of the SEV backend.
#[derive(Debug, thiserror::Error)]
pub enum SevError {
    /// The host has no SEV.
    #[error("SEV is not available on this host: {0}")]
    Unavailable(String),
    /// A launch command failed.
    #[error("SEV {command} failed: {errno} (SEV firmware error {fw_error:#x})")]
    Command {
        /// Which command.
        command: &'static str,
        /// The ioctl's error.
        errno: kvm_ioctls::Error,
        /// The firmware's status code.
        fw_error: u32,
    },
    /// Registering memory or sharing the context failed.
    #[error("SEV {what} failed: {errno}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The ioctl's error.
        errno: kvm_ioctls::Error,
    },
    /// A malformed launch secret file.
    #[error("SEV launch secret {path}: {why}")]
    Secret {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A launch command over guest memory outside its memslot.
    #[error("SEV {command}: {len:#x} bytes at {gpa:#x} are not in one memslot")]
    Range {
        /// Which command.
        command: &'static str,
        /// Where.
        gpa: u64,
        /// How many bytes.
        len: u64,
    },
    /// A file that could not be read.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        why: std::io::Error,
    },
}

/// What the guest owner supplies for an SEV launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SevConfig {
    /// Guest policy (SEV API, 3).
    pub policy: u32,
    /// The guest owner's Diffie-Hellman certificate (LAUNCH_START).
    pub dh_cert: Option<Vec<u8>>,
    /// The launch session blob (LAUNCH_START).
    pub session: Option<Vec<u8>>,
    /// The transport key, wrapped for this launch (LAUNCH_SECRET). Without
    /// it the helper has no key and refuses sessions.
    pub secret: Option<LaunchSecret>,
}

impl Default for SevConfig {
    fn default() -> Self {
        Self {
            policy: DEFAULT_POLICY,
            dh_cert: None,
            session: None,
            secret: None,
        }
    }
}

/// A LAUNCH_SECRET packet: its header and the encrypted secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSecret {
    /// Flags, IV and MAC.
    pub header: [u8; PACKET_HEADER_LEN],
    /// The encrypted secret (the helper's secret page contents).
    pub secret: Vec<u8>,
}

impl LaunchSecret {
    /// Parses `{"packet-header": "<base64>", "secret": "<base64>"}` read
    /// from `path`.
    pub fn parse(path: &std::path::Path, text: &str) -> Result<Self, SevError> {
        let bad = |why: String| SevError::Secret {
            path: path.to_owned(),
            why,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let field = |name: &str| -> Result<Vec<u8>, SevError> {
            let text = value
                .get(name)
                .and_then(|v| v.as_str())
                .ok_or_else(|| bad(format!("no \"{name}\" string")))?;
            decode_base64(text).ok_or_else(|| bad(format!("\"{name}\" is not base64")))
        };
        let header: [u8; PACKET_HEADER_LEN] =
            field("packet-header")?.try_into().map_err(|h: Vec<u8>| {
                bad(format!(
                    "packet header is {} bytes, not {PACKET_HEADER_LEN}",
                    h.len()
                ))
            })?;
        let secret = field("secret")?;
        if secret.is_empty() || secret.len() > 4096 || secret.len() % 16 != 0 {
            return Err(bad(format!(
                "secret is {} bytes: it must be a multiple of 16, at most one page",
                secret.len()
            )));
        }
        Ok(Self { header, secret })
    }

    /// Reads and parses `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, SevError> {
        let text = std::fs::read_to_string(path).map_err(|why| SevError::File {
            path: path.to_owned(),
            why,
        })?;
        Self::parse(path, &text)
    }
}

/// Standard base64 (RFC 4648, with padding), as QMP carries binary data.
pub fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Standard base64 (RFC 4648, with padding; whitespace ignored, as in
/// JSON files wrapped by hand).
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()
}

/// The C-bit's position in page-table entries (CPUID 0x8000001f, EBX bits 5..0),
/// if this CPU has SEV.
pub fn c_bit_position() -> Result<u32, SevError> {
    // Leaf 0x80000000 reports the highest extended leaf.
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max < 0x8000_001f {
        return Err(SevError::Unavailable(
            "the CPU has no memory-encryption leaf (CPUID 0x8000001f)".into(),
        ));
    }
    let leaf = std::arch::x86_64::__cpuid(0x8000_001f);
    if leaf.eax & (1 << 1) == 0 {
        return Err(SevError::Unavailable("the CPU does not report SEV".into()));
    }
    Ok(leaf.ebx & 0x3f)
}

/// An SEV launch in progress: the SEV device and the main VM's commands.
pub struct SevLaunch {
    sev: File,
}

impl SevLaunch {
    /// Opens the SEV device; fails with the reason on hosts without SEV.
    pub fn open() -> Result<Self, SevError> {
        let sev = File::options()
            .read(true)
            .write(true)
            .open(SEV_DEVICE)
            .map_err(|e| SevError::Unavailable(format!("{SEV_DEVICE}: {e}")))?;
        Ok(Self { sev })
    }

    fn command(
        &self,
        vm: &VmFd,
        command: &'static str,
        id: u32,
        data: u64,
    ) -> Result<(), SevError> {
        let mut cmd = kvm_sev_cmd {
            id,
            data,
            sev_fd: self.sev.as_raw_fd() as u32,
            ..Default::default()
        };
        vm.encrypt_op_sev(&mut cmd)
            .map_err(|errno| SevError::Command {
                command,
                errno,
                fw_error: cmd.error,
            })
    }

    /// KVM_SEV_INIT on the main VM (before any vCPU or memory is used).
    pub fn init(&self, vm: &VmFd) -> Result<(), SevError> {
        self.command(vm, "INIT", sev_cmd_id_KVM_SEV_INIT, 0)
    }

    /// Pins the memory of `slot` as encrypted memory of the VM.
    ///
    /// # Safety
    ///
    /// The mapping `slot` was made from must stay mapped for as long as
    /// `vm` exists: KVM pins and encrypts those pages for it.
    pub unsafe fn register(&self, vm: &VmFd, slot: &MemSlot) -> Result<(), SevError> {
        let addr = host_range("memory region registration", slot, slot.gpa(), slot.size())?;
        vm.register_enc_memory_region(&kvm_enc_region {
            addr,
            size: slot.size(),
        })
        .map_err(|errno| SevError::Setup {
            what: "memory region registration",
            errno,
        })
    }

    /// Lets `mirror` run in `main`'s encryption context.
    pub fn share_with_mirror(mirror: &VmFd, main: &VmFd) -> Result<(), SevError> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_VM_COPY_ENC_CONTEXT_FROM,
            ..Default::default()
        };
        cap.args[0] = main.as_raw_fd() as u64;
        mirror.enable_cap(&cap).map_err(|errno| SevError::Setup {
            what: "mirror VM encryption context",
            errno,
        })
    }

    /// LAUNCH_START with the owner's policy, certificate and session.
    pub fn start(&self, vm: &VmFd, config: &SevConfig) -> Result<(), SevError> {
        let (dh_uaddr, dh_len) = blob(config.dh_cert.as_deref());
        let (session_uaddr, session_len) = blob(config.session.as_deref());
        let mut start = kvm_sev_launch_start {
            policy: config.policy,
            dh_uaddr,
            dh_len,
            session_uaddr,
            session_len,
            ..Default::default()
        };
        self.command(
            vm,
            "LAUNCH_START",
            sev_cmd_id_KVM_SEV_LAUNCH_START,
            &mut start as *mut _ as u64,
        )
    }

    /// LAUNCH_UPDATE_DATA: encrypts `len` bytes of guest memory at `gpa`
    /// (in `slot`) in place and adds them to the measurement.
    ///
    /// # Safety
    ///
    /// The mapping `slot` was made from must be mapped for the call: the
    /// firmware encrypts those host pages in place.
    pub unsafe fn update(
        &self,
        vm: &VmFd,
        slot: &MemSlot,
        gpa: u64,
        len: u32,
    ) -> Result<(), SevError> {
        let uaddr = host_range("LAUNCH_UPDATE_DATA", slot, gpa, u64::from(len))?;
        let mut update = kvm_sev_launch_update_data {
            uaddr,
            len,
            ..Default::default()
        };
        self.command(
            vm,
            "LAUNCH_UPDATE_DATA",
            sev_cmd_id_KVM_SEV_LAUNCH_UPDATE_DATA,
            &mut update as *mut _ as u64,
        )
    }

    /// LAUNCH_MEASURE: the launch measurement for the guest owner.
    pub fn measure(&self, vm: &VmFd) -> Result<Vec<u8>, SevError> {
        // The first call, with no buffer, reports the length.
        let mut query = kvm_sev_launch_measure::default();
        let _ = self.command(
            vm,
            "LAUNCH_MEASURE",
            sev_cmd_id_KVM_SEV_LAUNCH_MEASURE,
            &mut query as *mut _ as u64,
        );
        let mut out = vec![0u8; query.len.max(48) as usize];
        let mut measure = kvm_sev_launch_measure {
            uaddr: out.as_mut_ptr() as u64,
            len: out.len() as u32,
            ..Default::default()
        };
        self.command(
            vm,
            "LAUNCH_MEASURE",
            sev_cmd_id_KVM_SEV_LAUNCH_MEASURE,
            &mut measure as *mut _ as u64,
        )?;
        out.truncate(measure.len as usize);
        Ok(out)
    }

    /// LAUNCH_SECRET: the PSP decrypts `secret` into the guest memory at
    /// `gpa` in `slot` (the helper's secret page).
    ///
    /// # Safety
    ///
    /// The mapping `slot` was made from must be mapped for the call: the
    /// firmware writes the secret into those host pages.
    pub unsafe fn inject(
        &self,
        vm: &VmFd,
        secret: &LaunchSecret,
        slot: &MemSlot,
        gpa: u64,
    ) -> Result<(), SevError> {
        let len = secret.secret.len() as u64;
        let host_addr = host_range("LAUNCH_SECRET", slot, gpa, len)?;
        let mut launch = secret_command(secret, host_addr);
        self.command(
            vm,
            "LAUNCH_SECRET",
            sev_cmd_id_KVM_SEV_LAUNCH_SECRET,
            &mut launch as *mut _ as u64,
        )
    }

    /// LAUNCH_FINISH: the VM may run.
    pub fn finish(&self, vm: &VmFd) -> Result<(), SevError> {
        self.command(vm, "LAUNCH_FINISH", sev_cmd_id_KVM_SEV_LAUNCH_FINISH, 0)
    }
}

/// Guest memory an SEV launch command works on: `len` bytes at `gpa`, in
/// `slot`.
#[derive(Debug, Clone, Copy)]
pub struct GuestRange<'a> {
    /// The memslot that holds them.
    pub slot: &'a MemSlot,
    /// Where they start.
    pub gpa: u64,
    /// How many bytes.
    pub len: u64,
}

/// The host address of `len` bytes at `gpa`, which must lie in `slot`.
fn host_range(command: &'static str, slot: &MemSlot, gpa: u64, len: u64) -> Result<u64, SevError> {
    slot.host_range(gpa, len)
        .ok_or(SevError::Range { command, gpa, len })
}

/// Runs an SEV launch from LAUNCH_START to LAUNCH_FINISH: `measured` are
/// the guest memory ranges to encrypt and measure, `secret_page` the
/// helper's secret page. Returns the measurement.
///
/// # Safety
///
/// The mappings the ranges' memslots were made from must be mapped for the
/// call (see [`SevLaunch::update`]).
pub unsafe fn launch(
    sev: &SevLaunch,
    vm: &VmFd,
    config: &SevConfig,
    measured: &[GuestRange<'_>],
    secret_page: Option<GuestRange<'_>>,
) -> Result<Vec<u8>, SevError> {
    sev.start(vm, config)?;
    for r in measured {
        // LAUNCH_UPDATE_DATA takes a 32-bit length.
        let mut done = 0;
        while done < r.len {
            let n = (r.len - done).min(1 << 30);
            // SAFETY: the caller keeps the slot's mapping mapped.
            unsafe { sev.update(vm, r.slot, r.gpa + done, n as u32)? };
            done += n;
        }
    }
    let measurement = sev.measure(vm)?;
    if let (Some(secret), Some(page)) = (&config.secret, secret_page) {
        if secret.secret.len() as u64 > page.len {
            return Err(SevError::Range {
                command: "LAUNCH_SECRET",
                gpa: page.gpa,
                len: secret.secret.len() as u64,
            });
        }
        // SAFETY: the caller keeps the slot's mapping mapped.
        unsafe { sev.inject(vm, secret, page.slot, page.gpa)? };
    }
    sev.finish(vm)?;
    Ok(measurement)
}

/// (address, length) of an optional blob for a command structure.
fn blob(data: Option<&[u8]>) -> (u64, u32) {
    data.map_or((0, 0), |d| (d.as_ptr() as u64, d.len() as u32))
}

/// The LAUNCH_SECRET arguments for `secret` going to `host_addr`.
fn secret_command(secret: &LaunchSecret, host_addr: u64) -> kvm_sev_launch_secret {
    kvm_sev_launch_secret {
        hdr_uaddr: secret.header.as_ptr() as u64,
        hdr_len: PACKET_HEADER_LEN as u32,
        guest_uaddr: host_addr,
        guest_len: secret.secret.len() as u32,
        trans_uaddr: secret.secret.as_ptr() as u64,
        trans_len: secret.secret.len() as u32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn base64_decodes_as_rfc_4648_says() {
        for (text, want) in [
            ("", &b""[..]),
            ("Zg==", b"f"),
            ("Zm8=", b"fo"),
            ("Zm9v", b"foo"),
            ("Zm9vYg==", b"foob"),
            ("Zm9vYmE=", b"fooba"),
            ("Zm9v\nYmFy", b"foobar"),
        ] {
            assert_eq!(decode_base64(text).as_deref(), Some(want), "{text}");
        }
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9v!A==", "=Zm9"] {
            assert_eq!(decode_base64(bad), None, "{bad}");
        }
    }

    fn b64(bytes: &[u8]) -> String {
        encode_base64(bytes)
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(decode_base64(&encode_base64(&data)), Some(data));
        }
        assert_eq!(encode_base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(encode_base64(b"fo"), "Zm8=");
    }

    #[test]
    fn a_launch_secret_file_parses_into_header_and_secret() {
        let header: Vec<u8> = (0..52).collect();
        let secret: Vec<u8> = (0..48).map(|i| i as u8 ^ 0x5a).collect();
        let text = format!(
            r#"{{"packet-header": "{}", "secret": "{}"}}"#,
            b64(&header),
            b64(&secret)
        );
        let s = LaunchSecret::parse(Path::new("s.json"), &text).unwrap();
        assert_eq!(&s.header[..], &header[..]);
        assert_eq!(s.secret, secret);

        // The command points at exactly these bytes and the target page.
        let cmd = secret_command(&s, 0x7000_0000);
        assert_eq!(cmd.hdr_uaddr, s.header.as_ptr() as u64);
        assert_eq!(cmd.hdr_len, 52);
        assert_eq!((cmd.guest_uaddr, cmd.guest_len), (0x7000_0000, 48));
        assert_eq!(
            (cmd.trans_uaddr, cmd.trans_len),
            (s.secret.as_ptr() as u64, 48)
        );
    }

    #[test]
    fn malformed_launch_secrets_are_refused_with_the_reason() {
        let header = b64(&[0u8; 52]);
        for (text, why) in [
            ("nope", "not JSON"),
            (r#"{"secret": "AAAA"}"#, "packet-header"),
            (&format!(r#"{{"packet-header": "{header}"}}"#), "\"secret\""),
            (
                &format!(
                    r#"{{"packet-header": "{}", "secret": "{}"}}"#,
                    b64(&[0; 51]),
                    b64(&[0; 16])
                ),
                "51 bytes",
            ),
            (
                &format!(
                    r#"{{"packet-header": "{header}", "secret": "{}"}}"#,
                    b64(&[0; 15])
                ),
                "multiple of 16",
            ),
            (
                &format!(
                    r#"{{"packet-header": "{header}", "secret": "{}"}}"#,
                    b64(&[0; 4112])
                ),
                "at most one page",
            ),
            (
                &format!(r#"{{"packet-header": "{header}", "secret": "not base64!"}}"#),
                "not base64",
            ),
        ] {
            let e = LaunchSecret::parse(Path::new("s.json"), text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn command_structures_have_the_kernel_layout() {
        assert_eq!(size_of::<kvm_sev_cmd>(), 24);
        assert_eq!(size_of::<kvm_sev_launch_start>(), 40);
        assert_eq!(size_of::<kvm_sev_launch_update_data>(), 16);
        assert_eq!(size_of::<kvm_sev_launch_measure>(), 16);
        assert_eq!(size_of::<kvm_sev_launch_secret>(), 48);
        assert_eq!(blob(None), (0, 0));
        let data = [1u8, 2, 3];
        assert_eq!(blob(Some(&data)), (data.as_ptr() as u64, 3));
    }

    #[test]
    fn without_sev_hardware_the_backend_says_why() {
        match (SevLaunch::open(), c_bit_position()) {
            (Ok(_), Ok(bit)) => {
                println!("this host has SEV: C-bit at {bit}");
                assert!(
                    (32..=51).contains(&bit),
                    "C-bit {bit} is outside the physical address bits"
                );
            }
            (open, bit) => {
                let why = open
                    .err()
                    .map(|e| e.to_string())
                    .or(bit.err().map(|e| e.to_string()));
                let why = why.unwrap_or_default();
                println!("no SEV here: {why}");
                assert!(why.contains("SEV is not available"), "{why}");
            }
        }
    }
}
