//! The GPU probe never panics: without a driver, a device or PTX it returns an error that says
//! which. On a machine with a GPU and a PTX build it opens the device.

use lora_compose::gpu::{ptx, GpuBackend};
use lora_compose::kernels::KernelError;

#[test]
fn probe_returns_a_clean_result() {
    match GpuBackend::probe() {
        Ok(gpu) => {
            use lora_compose::kernels::Backend;
            assert!(ptx::get("gemm").is_some(), "a GPU backend needs the GEMM PTX");
            println!("GPU found: {}", gpu.name());
        }
        Err(KernelError::Unavailable(reason)) => {
            println!("GPU tests skipped: {reason}");
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
fn probe_twice_is_harmless() {
    let first = GpuBackend::probe().is_ok();
    let second = GpuBackend::probe().is_ok();
    assert_eq!(first, second);
}
