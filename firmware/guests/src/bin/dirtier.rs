//! `dirtier`: the lab guest every migration test runs.
//!
//! Each main vCPU owns the slice of guest RAM its parameter block names and,
//! in endless passes, writes the pass number into the first word of every
//! 4 KiB page of the slice and fills the rest with a pattern of (gpa, pass).
//! Before each write it checks that the page still holds what the previous
//! pass wrote, so a page that comes back stale after a migration is caught.
//!
//! At start each vCPU declares every fourth whole 2 MiB block of its slice
//! shared, so every migration carries both plaintext shared pages and
//! helper-sealed private ones; the check is the same for both. Entered at
//! CPL0 (`--guest dirtier-ring0`) where KVM advertises
//! KVM_HC_MAP_GPA_RANGE, it declares them with that hypercall, as a real
//! guest does; otherwise through the lab port, which stands in for it on the
//! PVM lab host (where hypercalls cannot exit).
//!
//! With `LAB_FLAG_CONVERT` (`--guest converter`) vCPU 0 also turns the
//! last block it shared private after every odd pass and shared again
//! after every even one, marking its pages with `LAB_SECRET_MARK` while they
//! are private: a migration that ever carries the mark as plaintext sent a
//! private page through the host.
#![no_std]
#![no_main]

use cgsvmm_guests::{
    abi, cpl, guest_image, kvm_feature, kvm_hypercall3, lab_command, rdtsc, sprint,
};

guest_image!(abi::IMAGE_KIND_LAB, main);

use cgsvmm_fw_abi::PAGE_SIZE_U64 as PAGE_SIZE;
/// KVM_HC_MAP_GPA_RANGE's `attrs` for shared ("decrypted") 4 KiB pages.
const MAP_GPA_SHARED_4K: u64 = 0;
const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;

/// Prints a failure and reports it to the VMM; never returns.
fn memory_error(vcpu: u32, gpa: u64, expected: u64, found: u64) -> ! {
    sprint!("dirtier: MEMORY-ERROR vcpu={vcpu} gpa={gpa:#x} expected={expected} found={found}\n");
    lab_command(abi::LAB_CMD_FAIL);
    loop {
        core::hint::spin_loop();
    }
}

/// Checks the page against `pass - 1` (nothing to check on pass 1) and
/// rewrites it for `pass`.
#[inline(always)]
fn visit_page(vcpu: u32, gpa: u64, pass: u64) {
    let page = gpa as *mut u64;
    if pass > 1 {
        let prev = pass - 1;
        // SAFETY: the VMM gave this vCPU exclusive use of the slice, which is
        // identity mapped guest RAM; volatile because the page is shared with
        // the host's migration code.
        let (first, last) = unsafe {
            (
                page.read_volatile(),
                page.add(WORDS_PER_PAGE as usize - 1).read_volatile(),
            )
        };
        if first != prev {
            memory_error(vcpu, gpa, prev, first);
        }
        let want = abi::dirtier_pattern(gpa, prev, WORDS_PER_PAGE - 1);
        if last != want {
            memory_error(vcpu, gpa + PAGE_SIZE - 8, want, last);
        }
    }
    for i in 1..WORDS_PER_PAGE {
        // SAFETY: as above, i < WORDS_PER_PAGE stays inside the page.
        unsafe {
            page.add(i as usize)
                .write_volatile(abi::dirtier_pattern(gpa, pass, i))
        };
    }
    // SAFETY: as above. The pass word goes last: a page whose pass word is
    // current has its whole pattern current too.
    unsafe { page.write_volatile(pass) };
}

/// Declares every fourth 2 MiB block that lies wholly inside this vCPU's
/// slice shared: by hypercall where it may (CPL0, and KVM answers it),
/// else through the lab port. Returns the last of them (the one a sender
/// that goes in address order copies latest).
fn share_some_blocks(params: &abi::LabParams) -> Option<u64> {
    let block = abi::LAB_SHARE_BLOCK;
    let vcpu = params.vcpu_index;
    let hypercall = cpl() == 0 && kvm_feature(abi::KVM_FEATURE_HC_MAP_GPA_RANGE);
    // Only the ring-0 way is announced: the default output stays pass lines.
    if vcpu == 0 && hypercall {
        sprint!("dirtier: shares blocks through KVM_HC_MAP_GPA_RANGE\n");
    }
    let mut last = None;
    for range in &params.ranges[..params.range_count as usize] {
        let mut start = range.start.div_ceil(block) * block;
        let mut n = 0u64;
        while start + block <= range.end {
            if n.is_multiple_of(4) {
                last = Some(start);
                if hypercall {
                    let ret = kvm_hypercall3(
                        abi::KVM_HC_MAP_GPA_RANGE,
                        start,
                        block / PAGE_SIZE,
                        MAP_GPA_SHARED_4K,
                    );
                    if ret != 0 {
                        sprint!("dirtier: vcpu {vcpu} KVM_HC_MAP_GPA_RANGE failed: {ret:#x}\n");
                        lab_command(abi::LAB_CMD_FAIL);
                    }
                } else {
                    lab_command(abi::LAB_CMD_SHARE_2M | ((start / block) as u32) << 16);
                }
            }
            start += block;
            n += 1;
        }
    }
    last
}

/// `LAB_FLAG_CONVERT`: after pass `pass`, the block at `start` turns
/// private (odd passes), and its pages get the secret mark in word 1 (the
/// next pass's writes overwrite it), or shared again (even passes; the
/// pass just rewrote it without the mark). Through the lab port, whatever
/// the ring: the VMM's map changes before the guest writes a private byte.
fn convert(start: u64, pass: u64) {
    let block = abi::LAB_SHARE_BLOCK;
    let index = ((start / block) as u32) << 16;
    if pass % 2 == 1 {
        lab_command(abi::LAB_CMD_PRIVATE_2M | index);
        let mut gpa = start;
        while gpa < start + block {
            // SAFETY: the block lies inside this vCPU's slice (see
            // `visit_page`); word 1 is not one the checks read.
            unsafe {
                (gpa as *mut u64)
                    .add(1)
                    .write_volatile(abi::LAB_SECRET_MARK)
            };
            gpa += PAGE_SIZE;
        }
    } else {
        lab_command(abi::LAB_CMD_SHARE_2M | index);
    }
}

extern "C" fn main(params: &abi::LabParams) -> ! {
    let params = *params;
    let vcpu = params.vcpu_index;
    if params.magic != abi::PARAMS_MAGIC || params.range_count as usize > abi::LAB_MAX_RANGES {
        sprint!("dirtier: vcpu {vcpu} bad parameter block\n");
        lab_command(abi::LAB_CMD_FAIL);
    }
    // Print at least twice a second (the VMM passes the TSC rate).
    let report_every = params.tsc_khz.max(1) * 1000 / 2;
    let mut last_report = rdtsc();
    let shared = share_some_blocks(&params);
    let converting = match shared {
        Some(start) if vcpu == 0 && params.flags & abi::LAB_FLAG_CONVERT != 0 => Some(start),
        _ => None,
    };
    let mut pass: u64 = 1;
    loop {
        for range in &params.ranges[..params.range_count as usize] {
            let mut gpa = range.start;
            while gpa + PAGE_SIZE <= range.end {
                visit_page(vcpu, gpa, pass);
                gpa += PAGE_SIZE;
            }
        }
        let now = rdtsc();
        if pass == 1 || now.wrapping_sub(last_report) >= report_every {
            sprint!("dirtier: vcpu {vcpu} pass {pass} ok\n");
            last_report = now;
        }
        if let Some(start) = converting {
            convert(start, pass);
        }
        pass += 1;
    }
}
