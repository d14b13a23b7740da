//! cgsvmm: a minimal KVM VMM that runs confidential guests and live-migrates
//! them between two instances.
//!
//! The library does the work and every front end (the `cgsvmm` binary, the
//! QMP socket, tests) drives it: a [`config::VmmConfig`] becomes a
//! [`vmm::Vmm`] (`Vmm::try_from`), whose [`control::Controller`] pauses and
//! resumes the guest's vCPUs while the mirror vCPUs keep running.
//!
//! Module map: `config` (what to build) → `memory`, `vm`, `boot`, `x86`
//! (how the VM and its first instructions are set up) → `mirror`, `lab`
//! (what the mirror and lab guests are given) → `vcpu` (threads) →
//! `helper_link` (the helper's doorbells and faults) → `control` + `qmp`
//! (control API) → `vmm` (assembly and event loop).
//! Devices live in the `cgsvmm-devices` crate, migration in
//! `cgsvmm-migration`, the guest ABI in `cgsvmm-fw-abi`.

pub mod boot;
pub mod confidential;
pub mod config;
pub mod control;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod qmp;
pub mod vmm;
pub mod x86;

pub use config::VmmConfig;
pub use vmm::{Vmm, VmmError};
