//! `mirror`: the payload that runs on mirror vCPUs until the migration helper
//! takes its place. It counts in its shared status word and copies the
//! probe word from guest RAM, which proves that the mirror runs and that it
//! sees the main VM's memory.
#![no_std]
#![no_main]

use cgsvmm_guests::{abi, guest_image, lab_command};

guest_image!(abi::IMAGE_KIND_MIRROR, main);

extern "C" fn main(params: &abi::MirrorParams) -> ! {
    let status = params.status_gpa as *mut abi::MirrorStatus;
    let probe = params.probe_gpa as *const u64;
    let mut counter: u64 = 0;
    loop {
        counter = counter.wrapping_add(1);
        // SAFETY: the VMM points status_gpa at this vCPU's entry of the
        // status page and probe_gpa at a mapped word of guest RAM (or 0);
        // volatile because the VMM and the main vCPUs access them too.
        unsafe {
            if !probe.is_null() {
                core::ptr::addr_of_mut!((*status).probe_value)
                    .write_volatile(probe.read_volatile());
            }
            core::ptr::addr_of_mut!((*status).counter).write_volatile(counter);
        }
        // Leave the CPU: the VMM sleeps briefly and re-enters us, so an
        // idle mirror costs the host almost nothing.
        lab_command(abi::LAB_CMD_YIELD);
    }
}
