//! Builds the CUDA kernels in `cuda/` two ways:
//!
//! 1. PTX, with nvcc when one is found (`NVCC`, then `CUDA_HOME`/`CUDA_PATH`, `/usr/local/cuda`,
//!    `PATH`), for the virtual architecture `compute_<CUDA_COMPUTE_CAP>` (default 80: the driver
//!    JIT-compiles it on Ampere and Hopper). `$OUT_DIR/ptx.rs` embeds each `<family>.ptx`; without
//!    nvcc it embeds nothing and the GPU backend reports "built without PTX".
//! 2. The CPU harness: the same `.cu` sources compiled as C++17 by the system compiler (through
//!    `cuda/harness/<family>_host.cpp` wrappers) into a static library linked into the crate.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_COMPUTE_CAP: &str = "80";

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let families = kernel_families(Path::new("cuda"));
    build_cpu_harness(&families);
    let compute_cap = compute_cap();
    let ptx_files = match find_nvcc() {
        Some(nvcc) => families
            .iter()
            .map(|family| compile_ptx(&nvcc, family, &compute_cap, &out_dir))
            .collect(),
        None => {
            println!(
                "cargo:warning=nvcc not found (NVCC, CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH): \
                 building without PTX; the GPU backend will report it, the CPU harness still runs"
            );
            Vec::new()
        }
    };
    write_ptx_module(&out_dir, &ptx_files, &compute_cap);
}

/// Kernel families: `cuda/<family>.cu`, sorted so the generated code is stable.
fn kernel_families(cuda_dir: &Path) -> Vec<String> {
    let mut families: Vec<String> = std::fs::read_dir(cuda_dir)
        .expect("cuda/ exists")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            if path.extension()? != "cu" {
                return None;
            }
            Some(path.file_stem()?.to_str()?.to_owned())
        })
        .collect();
    families.sort();
    families
}

fn build_cpu_harness(families: &[String]) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        // The harness runs every property test: optimise it even in debug builds.
        .opt_level(2)
        .include("cuda")
        .warnings(true)
        .file("cuda/harness/runtime.cpp");
    for family in families {
        let wrapper = format!("cuda/harness/{family}_host.cpp");
        assert!(
            Path::new(&wrapper).exists(),
            "{wrapper} missing: every cuda/<family>.cu needs a CPU-harness wrapper (cuda/README.md)"
        );
        build.file(wrapper);
    }
    if env::var_os("LC_HARNESS_UCONTEXT").is_some() {
        build.define("LC_HARNESS_UCONTEXT", None);
    }
    println!("cargo:rerun-if-env-changed=LC_HARNESS_UCONTEXT");
    build.compile("lc_cuda_harness");
}

/// `CUDA_COMPUTE_CAP` as nvcc's architecture suffix: "90", "9.0", "sm_90" and "90a" all work.
fn compute_cap() -> String {
    let raw = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| DEFAULT_COMPUTE_CAP.to_owned());
    let cap: String = raw
        .trim()
        .trim_start_matches("sm_")
        .trim_start_matches("compute_")
        .chars()
        .filter(|c| *c != '.')
        .collect();
    assert!(
        cap.len() >= 2 && cap.chars().all(|c| c.is_ascii_alphanumeric()),
        "CUDA_COMPUTE_CAP={raw:?}: expected e.g. 80, 8.0, 90 or 90a"
    );
    cap
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(nvcc) = env::var_os("NVCC") {
        return Some(PathBuf::from(nvcc));
    }
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|var| env::var_os(var).map(PathBuf::from))
        .chain(std::iter::once(PathBuf::from("/usr/local/cuda")));
    for root in roots {
        let nvcc = root.join("bin").join("nvcc");
        if nvcc.is_file() {
            return Some(nvcc);
        }
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join("nvcc"))
        .find(|nvcc| nvcc.is_file())
}

fn compile_ptx(nvcc: &Path, family: &str, compute_cap: &str, out_dir: &Path) -> (String, PathBuf) {
    let source = format!("cuda/{family}.cu");
    let ptx = out_dir.join(format!("{family}.ptx"));
    let output = Command::new(nvcc)
        .args(["-ptx", "-O3", "-lineinfo", "-std=c++17"])
        .arg(format!("-arch=compute_{compute_cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg(&source)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    // A kernel that nvcc rejects is a build error, not a silent CPU-only build.
    assert!(
        output.status.success(),
        "{} -ptx {source} failed:\n{}{}",
        nvcc.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (family.to_owned(), ptx)
}

fn write_ptx_module(out_dir: &Path, ptx_files: &[(String, PathBuf)], compute_cap: &str) {
    let mut code = String::from("// Generated by build.rs.\n");
    writeln!(code, "pub const BUILT_WITH_PTX: bool = {};", !ptx_files.is_empty()).unwrap();
    writeln!(code, "pub const COMPUTE_CAP: &str = {compute_cap:?};").unwrap();
    code.push_str("/// (family, PTX of cuda/<family>.cu)\npub const FAMILIES: &[(&str, &str)] = &[\n");
    for (family, path) in ptx_files {
        writeln!(
            code,
            "    ({family:?}, include_str!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    code.push_str("];\n");
    std::fs::write(out_dir.join("ptx.rs"), code).expect("write ptx.rs");
}
