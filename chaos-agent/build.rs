//! Embeds the BPF object built by `cargo xtask build-ebpf` (target/bpf/chaos-ebpf.o) into the agent.
//!
//! When the object has not been built, an empty file is embedded instead and the agent reports at start-up:
//! "BPF object not built: run cargo xtask build-ebpf". `CHAOS_EBPF_OBJECT` overrides the path.

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=CHAOS_EBPF_OBJECT");
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { manifest.join("..").join(p) })
        .unwrap_or_else(|| manifest.join("..").join("target"));
    let object = std::env::var_os("CHAOS_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("bpf").join("chaos-ebpf.o"));
    // Watching a path that does not exist yet makes cargo re-run this script on every build, which is what we
    // want until the object appears (it is cheap).
    println!("cargo::rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("chaos-ebpf.o");
    let bytes = std::fs::read(&object).unwrap_or_default();
    if bytes.is_empty() {
        println!(
            "cargo::warning=BPF object not built ({}): run `cargo xtask build-ebpf`; the agent will refuse network faults",
            object.display()
        );
    }
    std::fs::write(&out, bytes).expect("writing OUT_DIR/chaos-ebpf.o");
}
