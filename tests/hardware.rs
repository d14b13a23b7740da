//! End-to-end tests that need hardware this lab host lacks: Linux and OVMF
//! guests need native ring 0 (any VMX/SVM host), which the PVM flavour of
//! KVM here does not give; the SEV backend needs an AMD host with SEV.
//! Each test is ignored, with its reason printed, where its hardware or
//! image is missing, so a skip is counted as a skip and never as a pass.
#![allow(clippy::unwrap_used)]

use cgsvmm_test_support::{self as support, named};

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{kvm_missing, VmArgs};

/// Why this host cannot boot Linux or OVMF guests, if it cannot.
fn ring0_unavailable() -> Option<String> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("this host's KVM is the PVM flavour: ring-0 guest code runs under the instruction emulator \
                     (no x87; Linux and OVMF cannot finish booting; see docs/LAB.md)"
            .into());
    }
    None
}

/// The guest images resources/fetch-guest-images.sh puts in place.
fn guest_image(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CGSVMM_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/images"));
    let path = dir.join(name);
    path.exists().then_some(path)
}

/// Why the Linux boot cannot run here, if it cannot.
fn linux_missing() -> Option<String> {
    ring0_unavailable().or_else(|| {
        guest_image("vmlinuz")
            .is_none()
            .then(|| "no kernel image; run resources/fetch-guest-images.sh first".into())
    })
}

fn linux_boots_to_its_banner() {
    let kernel = guest_image("vmlinuz").unwrap();
    let vm = VmArgs::new()
        .kernel(&kernel)
        .cmdline("console=ttyS0 panic=-1")
        .memory("512M")
        .start();
    let banner = vm.wait_for_line(Duration::from_secs(50), |l| l.contains("Linux version"));
    assert!(banner.is_some(), "no kernel banner: {:?}", vm.lines());
}

/// Why the OVMF boot cannot run here, if it cannot.
fn ovmf_missing() -> Option<String> {
    ring0_unavailable().or_else(|| {
        guest_image("OVMF.fd")
            .is_none()
            .then(|| "no OVMF image; run resources/fetch-guest-images.sh first".into())
    })
}

fn ovmf_reaches_its_boot_manager() {
    let firmware = guest_image("OVMF.fd").unwrap();
    let vm = VmArgs::new().firmware(&firmware).memory("512M").start();
    // OVMF's boot manager reports on the serial console once DXE is up.
    let bds = vm.wait_for_line(Duration::from_secs(50), |l| l.contains("BdsDxe"));
    assert!(
        bds.is_some(),
        "OVMF did not reach BDS: {:?} {}",
        vm.lines(),
        vm.stderr.lock().unwrap()
    );
}

/// Why this host cannot launch SEV guests, if it cannot.
fn sev_unavailable() -> Option<String> {
    if !Path::new("/dev/sev").exists() {
        return Some("no /dev/sev: this host has no AMD SEV".into());
    }
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max < 0x8000_001f || std::arch::x86_64::__cpuid(0x8000_001f).eax & 2 == 0 {
        return Some("the CPU does not report SEV (CPUID 0x8000001f)".into());
    }
    None
}

/// An SEV launch: the VM starts, the helper runs on the encrypted mirror
/// (its heartbeat grows) and QMP hands out the launch measurement.
fn sev_launch_runs_the_helper_and_reports_the_measurement() {
    let sock = std::env::temp_dir().join(format!("cgsvmm-sev-{}.sock", std::process::id()));
    let mut vm = VmArgs::new()
        .arg("--confidential")
        .arg("sev")
        .guest("dirtier")
        .qmp(&sock)
        .start();
    let mut qmp = support::Qmp::negotiate(&sock);
    let measure = qmp.cmd("query-sev-launch-measure");
    assert!(
        measure["data"].as_str().is_some_and(|d| d.len() >= 64),
        "{measure}"
    );
    let beats = |q: &mut support::Qmp| q.cmd("x-query-mirror")[0]["counter"].as_u64().unwrap();
    let before = beats(&mut qmp);
    std::thread::sleep(Duration::from_millis(300));
    assert!(beats(&mut qmp) > before, "the helper does not run");
    qmp.cmd("quit");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
}

fn main() {
    let kvm = kvm_missing();
    let or_kvm = |why: Option<String>| kvm.clone().or(why);
    support::run_tests(&[
        (or_kvm(linux_missing()), &named!(linux_boots_to_its_banner)),
        (
            or_kvm(ovmf_missing()),
            &named!(ovmf_reaches_its_boot_manager),
        ),
        (
            or_kvm(sev_unavailable()),
            &named!(sev_launch_runs_the_helper_and_reports_the_measurement),
        ),
    ]);
}
