//! `hello`: prints one line and asks the VMM to power off.
#![no_std]
#![no_main]

use cgsvmm_guests::{abi, guest_image, lab_command, sprint};

guest_image!(abi::IMAGE_KIND_LAB, main);

extern "C" fn main(params: &abi::LabParams) -> ! {
    if params.vcpu_index == 0 {
        sprint!("hello: cgsvmm lab guest on {} vcpu(s)\n", params.vcpu_count);
        lab_command(abi::LAB_CMD_POWER_OFF);
    }
    // Other vCPUs have nothing to do; they spin until the VM powers off.
    loop {
        core::hint::spin_loop();
    }
}
