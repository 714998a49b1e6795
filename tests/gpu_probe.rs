//! The GPU probe never panics: without a driver, a device or PTX it returns an error that says
//! which (`probe_returns_a_clean_result`, run everywhere). On a GPU machine the ignored
//! `probe_opens_the_gpu` must open the device: `--ignored` runs it (gpu-bundle/gpu-check.sh
//! does), and it fails where the probe does.

use lora_compose::gpu::{ptx, GpuBackend};
use lora_compose::kernels::{Backend, KernelError};

#[test]
fn probe_returns_a_clean_result() {
    match GpuBackend::probe() {
        Ok(gpu) => {
            assert!(ptx::get("gemm").is_some(), "a GPU backend needs the GEMM PTX");
            println!("GPU found: {}", gpu.name());
        }
        Err(KernelError::Unavailable(reason)) => {
            println!("no GPU (the probe returned a clean error): {reason}");
            if !ptx::BUILT_WITH_PTX {
                assert!(reason.contains("built without PTX"), "{reason}");
            }
        }
        Err(other) => {
            panic!("probe failed with a driver error on a machine that has a driver: {other}")
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine (gpu-bundle/gpu-check.sh does)"]
fn probe_opens_the_gpu() {
    let gpu = GpuBackend::probe().unwrap_or_else(|reason| panic!("this test needs a usable CUDA GPU: {reason}"));
    assert!(ptx::get("gemm").is_some(), "a GPU backend needs the GEMM PTX");
    println!("GPU found: {}", gpu.name());
}

/// Every family is embedded and inflates to PTX with its entry points (the PTX is
/// stored gzip-compressed). Needs a build with nvcc: `scripts/ci-cuda.sh` runs it, and so does
/// `gpu-check.sh` from the bundle.
#[test]
#[ignore = "needs a build with PTX (nvcc): scripts/ci-cuda.sh and gpu-check.sh run it"]
fn embedded_ptx_inflates_for_every_family() {
    if !ptx::BUILT_WITH_PTX {
        panic!("this build has no PTX (nvcc was not found)");
    }
    // build.rs compiles every cuda/*.cu (a .cu that nvcc rejects fails the build), so the
    // embedded list is every family; the bundle runs this away from the source tree.
    let families: Vec<&str> = ptx::FAMILIES.iter().map(|&(f, _)| f).collect();
    assert!(families.len() >= 10, "{families:?}");
    for family in &families {
        let text = ptx::get(family).unwrap_or_else(|| panic!("no PTX embedded for {family}"));
        assert!(
            text.contains(".version") && text.contains(".entry"),
            "{family}: the inflated PTX has no .version or .entry"
        );
    }
    println!("{} families of PTX embedded and inflated", families.len());
}

#[test]
fn probe_twice_is_harmless() {
    let first = GpuBackend::probe().is_ok();
    let second = GpuBackend::probe().is_ok();
    assert_eq!(first, second);
}
