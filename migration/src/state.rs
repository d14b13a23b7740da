//! Versioned, bounded state records: what of a VM besides its RAM travels
//! in the stream (every main vCPU, the irqchip, PIT and clock, the devices,
//! and the configuration the target checks first).
//!
//! A record is serde data encoded with postcard, behind a 4-byte prefix:
//!
//! ```text
//! +0 u16 version   the record type's VERSION; any other is refused
//! +2 u16 reserved  0
//! +4 postcard      the record, every byte of it (trailing bytes refused)
//! ```
//!
//! Each record type names its bound ([`Record::MAX_LEN`]); a record longer
//! than that is refused before it is decoded. Records carry KVM's structures
//! as KVM defines them (kvm-bindings' serde feature: their bytes), so what
//! the source's KVM reported is what the target's KVM is given.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Bytes before a record's postcard body.
pub const PREFIX: usize = 4;

/// A state record type.
pub trait Record: Serialize + DeserializeOwned {
    /// What it is, for error messages.
    const NAME: &'static str;
    /// The version this build writes and reads.
    const VERSION: u16;
    /// The longest encoding (prefix included) a reader accepts.
    const MAX_LEN: usize;
}

/// Why a record was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Longer than its type allows.
    #[error("{name} record of {len} bytes exceeds its bound of {max}")]
    TooLong {
        /// Record type.
        name: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Written by another version of cgsvmm.
    #[error("{name} record has version {found}; this cgsvmm reads version {supported}")]
    Version {
        /// Record type.
        name: &'static str,
        /// The record's version.
        found: u16,
        /// Ours.
        supported: u16,
    },
    /// Not a well-formed record.
    #[error("{name} record is malformed: {why}")]
    Malformed {
        /// Record type.
        name: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Encodes `record` with its version prefix.
pub fn encode<R: Record>(record: &R) -> Result<Vec<u8>, StateError> {
    let mut out = R::VERSION.to_le_bytes().to_vec();
    out.extend_from_slice(&[0, 0]);
    let out = postcard::to_extend(record, out).map_err(|e| StateError::Malformed {
        name: R::NAME,
        why: e.to_string(),
    })?;
    if out.len() > R::MAX_LEN {
        return Err(StateError::TooLong {
            name: R::NAME,
            len: out.len(),
            max: R::MAX_LEN,
        });
    }
    Ok(out)
}

/// Decodes a record, checking its length, version and that nothing
/// trails it.
pub fn decode<R: Record>(bytes: &[u8]) -> Result<R, StateError> {
    let malformed = |why: String| StateError::Malformed { name: R::NAME, why };
    if bytes.len() > R::MAX_LEN {
        return Err(StateError::TooLong {
            name: R::NAME,
            len: bytes.len(),
            max: R::MAX_LEN,
        });
    }
    if bytes.len() < PREFIX {
        return Err(malformed(format!("{} bytes", bytes.len())));
    }
    let found = u16::from_le_bytes([bytes[0], bytes[1]]);
    if found != R::VERSION {
        return Err(StateError::Version {
            name: R::NAME,
            found,
            supported: R::VERSION,
        });
    }
    if bytes[2..PREFIX] != [0, 0] {
        return Err(malformed("reserved bytes set".into()));
    }
    let (record, rest) =
        postcard::take_from_bytes::<R>(&bytes[PREFIX..]).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} bytes after the record", rest.len())));
    }
    Ok(record)
}

/// x87/SSE state as KVM_GET_FPU reports it (kvm-bindings gives `kvm_fpu`
/// no serde form; the fields are copied one for one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fpu {
    /// x87 registers.
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// One main vCPU, as KVM reports it while the vCPU is paused.
#[derive(Serialize, Deserialize)]
pub struct VcpuRecord {
    /// vCPU index.
    pub index: u32,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state (restored before `xsave`, which supersedes it).
    pub fpu: Fpu,
    /// Extended state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Run state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The vCPU's TSC rate in kHz.
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRecord")
            .field("index", &self.index)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

impl Record for VcpuRecord {
    const NAME: &'static str = "vCPU";
    const VERSION: u16 = 1;
    // regs, sregs, fpu ~1 KiB, xsave 4 KiB, lapic 1 KiB, MSRs: room for
    // 1024 of them.
    const MAX_LEN: usize = 32 << 10;
}

/// VM-wide KVM state: the in-kernel irqchip (both PICs and the IOAPIC),
/// the PIT and the KVM clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// i8254 PIT.
    pub pit: kvm_pit_state2,
    /// KVM clock.
    pub clock: kvm_clock_data,
    /// Whether the guest ran when the migration paused it (the target runs
    /// it on only then, as QEMU does).
    pub running: bool,
}

impl std::fmt::Debug for VmRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmRecord")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

impl Record for VmRecord {
    const NAME: &'static str = "VM";
    const VERSION: u16 = 1;
    const MAX_LEN: usize = 8 << 10;
}

/// How the pages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamMode {
    /// To a running target, whose helpers answer the session.
    Live,
    /// To a file: the source helpers' nonce only, restorable more than once.
    Snapshot,
}

/// What the source is; the target checks it against itself before it
/// writes anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRecord {
    /// Guest RAM ranges (start, length).
    pub ram: Vec<(u64, u64)>,
    /// Main vCPUs.
    pub vcpus: u32,
    /// Migration helpers.
    pub helpers: u32,
    /// Confidential backend ("none", "sev").
    pub backend: String,
    /// Helper ABI version.
    pub helper_abi: u32,
    /// The CPUID the main vCPUs were given.
    pub cpuid: Vec<CpuidEntry>,
    /// The MSRs each vCPU record carries.
    pub msrs: Vec<u32>,
    /// Live or snapshot.
    pub mode: StreamMode,
}

impl Record for ConfigRecord {
    const NAME: &'static str = "configuration";
    const VERSION: u16 = 1;
    const MAX_LEN: usize = 64 << 10;
}

/// One CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf.
    pub function: u32,
    /// Subleaf.
    pub index: u32,
    /// KVM_CPUID_FLAG_*.
    pub flags: u32,
    /// Registers.
    pub regs: [u32; 4],
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            regs: [e.eax, e.ebx, e.ecx, e.edx],
        }
    }
}

impl CpuidEntry {
    /// The registers with the fields that name the host CPU the VMM
    /// happened to run on (initial APIC ID, x2APIC ID, AMD's extended APIC
    /// and core IDs) cleared: KVM_GET_SUPPORTED_CPUID reports those from
    /// whichever CPU answered, so they differ between two processes on one
    /// host. The VMM sets them per vCPU anyway.
    pub fn comparable(&self) -> [u32; 4] {
        let mut r = self.regs;
        match self.function {
            0x1 => r[1] &= 0x00ff_ffff,
            0xb | 0x1f => r[3] = 0,
            0x8000_001e => {
                r[0] = 0;
                r[1] &= !0xff;
            }
            _ => {}
        }
        r
    }
}

/// Why a target cannot take a source's stream: the first difference.
pub fn config_mismatch(source: &ConfigRecord, target: &ConfigRecord) -> Option<String> {
    let show = |ram: &[(u64, u64)]| {
        let ranges: Vec<String> = ram
            .iter()
            .map(|&(s, l)| format!("{s:#x}..{:#x}", s + l))
            .collect();
        format!(
            "{} MiB of RAM at {}",
            ram.iter().map(|r| r.1).sum::<u64>() >> 20,
            ranges.join(", ")
        )
    };
    if source.ram != target.ram {
        return Some(format!(
            "the source has {}, the target {}",
            show(&source.ram),
            show(&target.ram)
        ));
    }
    if source.vcpus != target.vcpus {
        return Some(format!(
            "the source has {} vCPUs, the target {}",
            source.vcpus, target.vcpus
        ));
    }
    if source.helpers != target.helpers {
        return Some(format!(
            "the source runs {} migration helpers, the target {}",
            source.helpers, target.helpers
        ));
    }
    if source.backend != target.backend {
        return Some(format!(
            "the source's confidential backend is {}, the target's {}",
            source.backend, target.backend
        ));
    }
    if source.helper_abi != target.helper_abi {
        return Some(format!(
            "the source's migration helper speaks ABI {}, the target's {}",
            source.helper_abi, target.helper_abi
        ));
    }
    if source.mode != target.mode {
        return Some(format!(
            "a {:?} stream where a {:?} one was expected",
            source.mode, target.mode
        ));
    }
    for leaf in &source.cpuid {
        let theirs = target
            .cpuid
            .iter()
            .find(|t| t.function == leaf.function && t.index == leaf.index);
        if theirs.map(CpuidEntry::comparable) != Some(leaf.comparable()) {
            return Some(format!(
                "CPUID leaf {:#x}.{} differs: source {:x?}, target {:x?}",
                leaf.function,
                leaf.index,
                leaf.regs,
                theirs.map(|t| t.regs)
            ));
        }
    }
    if let Some(msr) = source.msrs.iter().find(|m| !target.msrs.contains(m)) {
        return Some(format!("the target's KVM cannot restore MSR {msr:#x}"));
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vcpu() -> VcpuRecord {
        let mut r = VcpuRecord {
            index: 1,
            regs: kvm_regs {
                rip: 0x10_0040,
                rsp: 0x7000,
                rflags: 0x202,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr0: 0x8005_0033,
                efer: 0x500,
                ..Default::default()
            },
            fpu: Fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                xmm: [[7; 16]; 16],
                ..Default::default()
            },
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            msrs: vec![(0x10, 123_456_789), (0xc000_0080, 0x500)],
            lapic: kvm_lapic_state::default(),
            mp_state: kvm_mp_state { mp_state: 0 },
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
            tsc_khz: 2_400_000,
        };
        r.xsave.region[5] = 0xdead_beef;
        r.lapic.regs[0x20] = 3;
        r.xcrs.nr_xcrs = 1;
        r.xcrs.xcrs[0].value = 7;
        r
    }

    fn vm() -> VmRecord {
        let mut r = VmRecord {
            pic_master: kvm_irqchip::default(),
            pic_slave: kvm_irqchip {
                chip_id: 1,
                ..Default::default()
            },
            ioapic: kvm_irqchip {
                chip_id: 2,
                ..Default::default()
            },
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data {
                clock: 987_654_321,
                ..Default::default()
            },
            running: true,
        };
        r.pit.channels[0].count = 0x1234;
        r
    }

    fn config() -> ConfigRecord {
        ConfigRecord {
            ram: vec![(0, 256 << 20)],
            vcpus: 2,
            helpers: 2,
            backend: "none".into(),
            helper_abi: 4,
            cpuid: vec![CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                regs: [1, 2, 3, 4],
            }],
            msrs: vec![0x10, 0xc000_0080],
            mode: StreamMode::Live,
        }
    }

    #[test]
    fn every_record_round_trips() {
        let v = vcpu();
        let back: VcpuRecord = decode(&encode(&v).unwrap()).unwrap();
        assert_eq!(back.regs, v.regs);
        assert_eq!(back.sregs, v.sregs);
        assert_eq!(back.fpu, v.fpu);
        assert_eq!(back.xsave.region, v.xsave.region);
        assert_eq!(back.xcrs.xcrs[0].value, 7);
        assert_eq!(back.msrs, v.msrs);
        assert_eq!(back.lapic.regs, v.lapic.regs);
        assert_eq!(back.tsc_khz, v.tsc_khz);
        let kvm: kvm_fpu = (&v.fpu).into();
        assert_eq!(Fpu::from(&kvm), v.fpu);

        let m = vm();
        let back: VmRecord = decode(&encode(&m).unwrap()).unwrap();
        assert_eq!(back.pic_slave.chip_id, 1);
        assert_eq!(back.ioapic.chip_id, 2);
        assert_eq!(back.pit.channels[0].count, 0x1234);
        assert_eq!(back.clock.clock, 987_654_321);
        assert!(back.running);

        let c = config();
        assert_eq!(decode::<ConfigRecord>(&encode(&c).unwrap()).unwrap(), c);
    }

    #[test]
    fn newer_versions_long_records_and_trailing_bytes_are_refused() {
        let mut bytes = encode(&config()).unwrap();
        bytes[0] = 2;
        assert!(matches!(
            decode::<ConfigRecord>(&bytes),
            Err(StateError::Version {
                found: 2,
                supported: 1,
                ..
            })
        ));
        let mut bytes = encode(&vcpu()).unwrap();
        bytes.resize(VcpuRecord::MAX_LEN + 1, 0);
        assert!(matches!(
            decode::<VcpuRecord>(&bytes),
            Err(StateError::TooLong { .. })
        ));
        let mut bytes = encode(&vm()).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<VmRecord>(&bytes),
            Err(StateError::Malformed { .. })
        ));
        let bytes = encode(&vm()).unwrap();
        assert!(decode::<VmRecord>(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode::<VmRecord>(&[1]).is_err());
        let mut bytes = encode(&vm()).unwrap();
        bytes[3] = 1;
        assert!(decode::<VmRecord>(&bytes).is_err());
        // A record that cannot fit its bound is not written either.
        let mut big = vcpu();
        big.msrs = vec![(0xc000_0080, u64::MAX); 4096];
        assert!(matches!(encode(&big), Err(StateError::TooLong { .. })));
    }

    #[test]
    fn the_first_configuration_difference_is_named() {
        let c = config();
        assert_eq!(config_mismatch(&c, &c), None);
        let mut t = c.clone();
        t.ram = vec![(0, 128 << 20)];
        assert!(config_mismatch(&c, &t).unwrap().contains("256 MiB"));
        let mut t = c.clone();
        t.vcpus = 1;
        assert!(config_mismatch(&c, &t).unwrap().contains("2 vCPUs"));
        let mut t = c.clone();
        t.cpuid[0].regs[2] = 0;
        assert!(config_mismatch(&c, &t).unwrap().contains("CPUID leaf 0x1"));
        // The initial APIC ID of whichever CPU answered is not a difference.
        let mut t = c.clone();
        t.cpuid[0].regs[1] ^= 0x0100_0000;
        assert_eq!(config_mismatch(&c, &t), None);
        let mut t = c.clone();
        t.msrs.pop();
        assert!(config_mismatch(&c, &t).unwrap().contains("0xc0000080"));
        let mut t = c.clone();
        t.mode = StreamMode::Snapshot;
        assert!(config_mismatch(&c, &t).is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Whatever bytes arrive, decoding answers (Ok or Err) and never
        /// panics.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..12000)) {
            let _ = decode::<VcpuRecord>(&bytes);
            let _ = decode::<VmRecord>(&bytes);
            let _ = decode::<ConfigRecord>(&bytes);
        }

        /// A record with any byte changed decodes to something or fails
        /// cleanly.
        #[test]
        fn damaged_records_fail_cleanly(at in 0usize..4000, bit in 0u8..8) {
            let mut bytes = encode(&vcpu()).unwrap();
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            let _ = decode::<VcpuRecord>(&bytes);
        }
    }
}
