//! Builds the bare-metal guest images in `firmware/guests` (their own cargo
//! workspace, release profile, the flags below: docs/LAB.md's recipe, with
//! position-independent code and no AVX2) and turns each into a flat image
//! that `vmm/src/boot/images.rs` embeds with `include_bytes!`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const IMAGES: [&str; 4] = ["dirtier", "hello", "mirror", "mh"];
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Code generation flags for bare-metal CPL3 code; they reach only the
/// guests because the build names an explicit --target. Position-independent
/// code linked as a static non-PIE image: the linker resolves everything, and
/// images may sit above 2 GiB (the mirror region), which the static small
/// code model cannot address.
const GUEST_RUSTFLAGS: [&str; 8] = [
    "-Cno-redzone=yes",
    "-Crelocation-model=pic",
    "-Clink-arg=-nostartfiles",
    "-Clink-arg=-nostdlib",
    "-Clink-arg=-static",
    "-Clink-arg=-no-pie",
    "-Clink-arg=-Wl,--build-id=none",
    "-Ctarget-feature=+aes,+pclmulqdq,+sse4.1,+ssse3",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let firmware = manifest_dir.join("../firmware");
    let guests = firmware.join("guests");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("guests-target");

    for dir in [
        "guests/src",
        "guests/Cargo.toml",
        "guests/Cargo.lock",
        "guests/build.rs",
        "guests/image.ld",
        "guests/lab.ld",
        "guests/mirror.ld",
        "guests/mh.ld",
        "abi/src",
        "abi/Cargo.toml",
        "pagegcm/src",
        "pagegcm/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", firmware.join(dir).display());
    }

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--locked")
        .args(["--target", TARGET])
        .arg("--manifest-path")
        .arg(guests.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS.join("\x1f"));
    // Nothing of the outer build (clippy's wrapper, host flags, its target
    // dir) may leak into the guest build.
    for var in [
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build firmware/guests");
    assert!(status.success(), "building firmware/guests failed");

    let bin_dir = target_dir.join(TARGET).join("release");
    for name in IMAGES {
        flatten(&bin_dir.join(name), &out_dir.join(format!("{name}.bin")));
    }
}

/// `objcopy -O binary`: the loadable bytes from the first section on.
fn flatten(elf: &Path, out: &Path) {
    let status = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(elf)
        .arg(out)
        .status()
        .expect("cannot run objcopy (install binutils)");
    assert!(status.success(), "objcopy failed on {}", elf.display());
}
