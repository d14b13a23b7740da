//! The machine: what a KVM VM is made of here, below any policy.
//!
//! - [`vm`]: the KVM VMs (main and mirror), irqchip, PIT, clock;
//! - [`vcpu`]: vCPU threads, their exits, pause/resume and state;
//! - [`exit`]: why the VMM stops, reported once from any thread;
//! - [`devices`]: the port-I/O bus and the legacy devices on it;
//! - [`mirror`], [`lab`]: what the mirror and the lab guests are given;
//! - [`helper_link`]: the migration helper's doorbells and faults.
//!
//! Guest RAM and its layout are `crate::memory`'s (below this, as `boot`
//! is); nothing here knows about the run state, QMP or migration streams:
//! `control` decides when vCPUs run, `migration` moves their state.

pub mod devices;
pub mod exit;
pub mod helper_link;
pub mod lab;
pub mod mirror;
pub mod vcpu;
pub mod vm;
