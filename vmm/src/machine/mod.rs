//! The machine: what a KVM VM is made of here, below any policy.
//!
//! - [`memory`]: guest RAM, the mirror region and their KVM slots;
//! - [`vm`]: the KVM VMs (main and mirror), irqchip, PIT, clock;
//! - [`vcpu`]: vCPU threads, their exits, pause/resume and state;
//! - [`exit`]: why the VMM stops, reported once from any thread;
//! - [`devices`]: the port-I/O bus and the legacy devices on it;
//! - [`mirror`], [`lab`]: what the mirror and the lab guests are given;
//! - [`helper_link`]: the migration helper's doorbells and faults.
//!
//! Nothing here knows about the run state, QMP or migration streams:
//! `control` decides when vCPUs run, `migration` moves their state.

pub mod devices;
pub mod exit;
pub mod helper_link;
pub mod lab;
pub mod memory;
pub mod mirror;
pub mod vcpu;
pub mod vm;
