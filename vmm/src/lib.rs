//! cgsvmm: a minimal KVM VMM that runs confidential guests and live-migrates
//! them between two instances. The library does all the work; `main.rs` only
//! turns the command line into a [`config::VmmConfig`].
pub mod boot;
pub mod memory;
pub mod x86;
