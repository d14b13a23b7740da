//! Migration glue: how the `cgsvmm-migration` crate reaches this VMM's VM,
//! and the threads a migration runs on.
//!
//! - [`link`]: [`VmLink`], the `MigratableVm` adapter (pause, save,
//!   restore, RAM, dirty log, the helpers) over the controller and the
//!   machine;
//! - [`devices`]: the devices whose state migrates, one record;
//! - [`throttle`]: auto-converge's pausing thread;
//! - [`worker`]: the outgoing and incoming workers, which the controller
//!   starts through `control::Migrator` and joins.
//!
//! Dependencies point one way: `migration` → `control` → `machine`; the
//! controller knows this module only as a `Migrator` trait object.

pub mod devices;
pub mod link;
pub mod throttle;
pub mod worker;

pub use devices::{DevicesRecord, MigratableDevices};
pub use link::VmLink;
