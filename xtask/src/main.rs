//! bevy_npc_llm's build tasks, run from the repository root:
//!
//! - `cargo xtask cuda-module DEST [CUDA_ARCH]`: ggml's CUDA backend as a
//!   loadable module (`DEST/libggml-cuda.so`) for games built with the
//!   `dynamic-backends` feature, from the very llama.cpp sources the crate
//!   builds (llama-cpp-sys-2's, version from Cargo.lock), with the engine's
//!   graph patch applied (`scripts/gpu/patch-cuda-graphs.py`: recorded CUDA
//!   graphs survive prompt steps, rounded prompt steps keep theirs per KV
//!   stream; `scripts/gpu/patch-share-q8.py`). Needs the CUDA toolkit,
//!   cmake, ninja and python3. CUDA_ARCH defaults to 90 (H100); the engine
//!   detects the patch at start and rounds prompt steps only with it.
//! - `cargo xtask llama-src OUT.tar.gz`: those llama.cpp sources as a
//!   tarball (what `cuda-module` builds from; `scripts/gpu/pack-for-device.sh`
//!   ships it to a machine without Rust).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str =
    "usage: cargo xtask cuda-module DEST [CUDA_ARCH] | cargo xtask llama-src OUT.tar.gz";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["cuda-module", dest] => cuda_module(Path::new(dest), "90"),
        ["cuda-module", dest, arch] => cuda_module(Path::new(dest), arch),
        ["llama-src", out] => llama_src(Path::new(out)),
        [] | ["help"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The llama-cpp-sys-2 version in Cargo.lock.
fn sys_version() -> Result<String, String> {
    let lock = std::fs::read_to_string("Cargo.lock")
        .map_err(|e| format!("Cargo.lock (run from the repository root): {e}"))?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"llama-cpp-sys-2\"" {
            let v = lines.next().unwrap_or_default();
            if let Some(v) = v.trim().strip_prefix("version = \"") {
                return Ok(v.trim_end_matches('"').to_string());
            }
        }
    }
    Err("llama-cpp-sys-2 is not in Cargo.lock".into())
}

/// llama-cpp-sys-2's sources in cargo's registry (fetched by any build).
fn sys_sources(version: &str) -> Result<PathBuf, String> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let registry = home.join("registry/src");
    let dirs = std::fs::read_dir(&registry).map_err(|e| format!("{}: {e}", registry.display()))?;
    for d in dirs.flatten() {
        let src = d.path().join(format!("llama-cpp-sys-2-{version}"));
        if src.join("llama.cpp").is_dir() {
            return Ok(src);
        }
    }
    Err(format!(
        "llama-cpp-sys-2 {version} is not in {} (run `cargo fetch` first)",
        registry.display()
    ))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

fn llama_src(out: &Path) -> Result<(), String> {
    let src = sys_sources(&sys_version()?)?;
    let parts = [
        "CMakeLists.txt",
        "cmake",
        "ggml",
        "src",
        "include",
        "vendor",
        "common",
    ];
    run(Command::new("tar")
        .arg("czf")
        .arg(out)
        .arg("-C")
        .arg(&src)
        .args(parts.iter().map(|p| format!("llama.cpp/{p}"))))
}

fn cuda_module(dest: &Path, arch: &str) -> Result<(), String> {
    let tarball = std::env::temp_dir().join("bevy-npc-llm-llama-src.tar.gz");
    llama_src(&tarball)?;
    run(Command::new("bash")
        .arg("scripts/gpu/build-cuda-backend.sh")
        .arg(&tarball)
        .arg(dest)
        .arg(arch)
        .env("CUDA_GRAPH_PATCH", "on"))
}
