//! cgsvmm: a minimal KVM VMM that runs confidential guests and live-migrates
//! them between two instances.
//!
//! The library does the work and every front end (the `cgsvmm` binary, the
//! QMP socket, tests) drives it: a [`config::VmmConfig`] becomes a
//! [`vmm::Vmm`] (`Vmm::try_from`), whose [`control::Controller`] pauses and
//! resumes the guest's vCPUs while the mirror vCPUs keep running.
//!
//! Module map, each room importing only rooms before it in this order (a
//! test below checks it; docs/ARCHITECTURE.md walks a run and a migration
//! through them): `x86` (CPU state) → `memory` (guest RAM, layout,
//! memslots) → `confidential` (SEV over memslots) → `boot` (first
//! instructions) → `config` (what to build) → `machine` (VMs, vCPU
//! threads, devices, mirror and lab payloads) → `control` (the run state
//! and the control API) → `qmp` → `migration` (the glue to
//! `cgsvmm-migration`) → `vmm` (assembly and event loop).
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// Every `crate::ROOM` a room's code (not its comments) names.
    fn imports(rooms: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph = BTreeMap::new();
        for &room in rooms {
            let mut files = Vec::new();
            let dir = src.join(room);
            if dir.is_dir() {
                let mut stack = vec![dir];
                while let Some(d) = stack.pop() {
                    for e in std::fs::read_dir(d).unwrap() {
                        let p = e.unwrap().path();
                        if p.is_dir() {
                            stack.push(p);
                        } else if p.extension().is_some_and(|x| x == "rs") {
                            files.push(p);
                        }
                    }
                }
            } else {
                files.push(src.join(format!("{room}.rs")));
            }
            let mut uses = BTreeSet::new();
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap();
                for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                    for other in rooms.iter().filter(|&&o| o != room) {
                        let name = format!("crate::{other}");
                        let at = line.match_indices(&name).any(|(i, _)| {
                            let next = line[i + name.len()..].chars().next();
                            !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
                        });
                        if at {
                            uses.insert(other.to_string());
                        }
                    }
                }
            }
            graph.insert(room.to_string(), uses);
        }
        graph
    }

    /// A cycle in `graph` through `at`, if there is one.
    fn cycle(
        graph: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == at) {
            let mut c = path[i..].to_vec();
            c.push(at.to_string());
            return Some(c);
        }
        path.push(at.to_string());
        for next in &graph[at] {
            if let Some(c) = cycle(graph, next, path) {
                return Some(c);
            }
        }
        path.pop();
        None
    }

    #[test]
    fn the_rooms_import_each_other_one_way_only() {
        // The order the module map gives: each room imports only rooms
        // before it.
        let rooms = [
            "x86",
            "memory",
            "confidential",
            "boot",
            "config",
            "machine",
            "control",
            "qmp",
            "migration",
            "vmm",
        ];
        let graph = imports(&rooms);
        for (i, room) in rooms.iter().enumerate() {
            for import in &graph[*room] {
                let at = rooms.iter().position(|r| r == import);
                assert!(
                    at.is_some_and(|at| at < i),
                    "{room} imports {import}, which the module map puts after it"
                );
            }
            if let Some(c) = cycle(&graph, room, &mut Vec::new()) {
                panic!("import cycle: {}", c.join(" -> "));
            }
        }
        // What the layering is for, seen in the code.
        assert!(graph["migration"].contains("control"));
        assert!(graph["machine"].contains("memory"));
    }
}
