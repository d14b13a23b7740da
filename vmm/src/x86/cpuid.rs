//! CPUID for a vCPU: KVM's supported list, normalised per vCPU.
//!
//! Note (docs/LAB.md): guest code at CPL3 on the PVM host executes CPUID natively
//! and sees the host's values whatever is set here; the table still matters
//! for CPL0 guests (Linux, OVMF) on other hosts.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// The KVM signature leaf ("KVMKVMKVM\0\0\0").
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// Leaf 1 ECX bit: running under a hypervisor.
const HYPERVISOR_BIT: u32 = 1 << 31;
/// Leaf 1 EBX bits 31:24: initial APIC ID.
const APIC_ID_SHIFT: u32 = 24;
/// Leaf 1 EBX bits 23:16: logical processors per package.
const LOGICAL_COUNT_SHIFT: u32 = 16;
/// Leaf 1 EDX bit: HTT (the logical-processor count is valid).
const HTT_BIT: u32 = 1 << 28;
/// Leaf 1 ECX bit: VMX.
const VMX_BIT: u32 = 1 << 5;
/// Leaf 0x80000001 ECX bit: SVM.
const SVM_BIT: u32 = 1 << 2;

/// Adjusts KVM's supported entries for vCPU `index` of `count`: APIC IDs,
/// topology counts, the hypervisor bit and the KVM signature leaf; VMX and
/// SVM hidden (KVM offers them where nesting is on, as on the real-KVM lab,
/// but cgsvmm saves no nested state, so a guest that ran its own guests
/// could not be migrated whole).
pub fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, index: u32, count: u32) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (index << APIC_ID_SHIFT)
                    | (count.min(255) << LOGICAL_COUNT_SHIFT);
                e.ecx = (e.ecx | HYPERVISOR_BIT) & !VMX_BIT;
                if count > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            0x8000_0001 => e.ecx &= !SVM_BIT,
            // Extended topology: the x2APIC ID of this vCPU.
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    if let Some(sig) = entries
        .iter_mut()
        .find(|e| e.function == KVM_SIGNATURE_LEAF)
    {
        sig.ebx = KVM_SIGNATURE[0];
        sig.ecx = KVM_SIGNATURE[1];
        sig.edx = KVM_SIGNATURE[2];
    } else {
        entries.push(kvm_cpuid_entry2 {
            function: KVM_SIGNATURE_LEAF,
            eax: KVM_SIGNATURE_LEAF + 1,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
}

/// The normalised table as a KVM FAM struct.
pub fn for_vcpu(
    supported: &CpuId,
    index: u32,
    count: u32,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let mut entries = supported.as_slice().to_vec();
    normalize(&mut entries, index, count);
    CpuId::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0001_0800,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn sets_apic_ids_hypervisor_bit_and_signature() {
        let mut ext = leaf(0x8000_0001, 0);
        ext.ecx = 0xffff_ffff;
        let mut basic = leaf(1, 0);
        basic.ecx = 0xffff_ffff;
        let mut entries = vec![leaf(0, 0), basic, leaf(0xb, 0), leaf(0xb, 1), ext];
        normalize(&mut entries, 3, 4);
        let l1 = entries.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ecx & VMX_BIT, 0, "VMX hidden");
        let e1 = entries.iter().find(|e| e.function == 0x8000_0001).unwrap();
        assert_eq!(e1.ecx, !SVM_BIT, "SVM hidden, the rest kept");
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        assert!(entries
            .iter()
            .filter(|e| e.function == 0xb)
            .all(|e| e.edx == 3));
        let sig = entries
            .iter()
            .find(|e| e.function == KVM_SIGNATURE_LEAF)
            .unwrap();
        let mut name = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            name.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&name[..9], b"KVMKVMKVM");
    }

    #[test]
    fn single_vcpu_clears_htt_and_keeps_an_existing_signature_leaf() {
        let mut sig = leaf(KVM_SIGNATURE_LEAF, 0);
        sig.eax = 0x4000_0001;
        let mut entries = vec![leaf(1, 0), sig];
        normalize(&mut entries, 0, 1);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].edx & HTT_BIT, 0);
        assert_eq!(entries[1].eax, 0x4000_0001);
        assert_eq!(entries[1].ebx, KVM_SIGNATURE[0]);
    }
}
