//! Picks the linker script of each image: lab guests live in guest RAM, the
//! mirror payload in the mirror region.
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    for (bin, script) in [
        ("dirtier", "lab.ld"),
        ("hello", "lab.ld"),
        ("mirror", "mirror.ld"),
        ("mh", "mh.ld"),
    ] {
        println!(
            "cargo:rustc-link-arg-bin={bin}=-T{}",
            dir.join(script).display()
        );
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rerun-if-changed=lab.ld");
    println!("cargo:rerun-if-changed=mirror.ld");
    println!("cargo:rerun-if-changed=mh.ld");
    println!("cargo:rerun-if-changed=image.ld");
}
