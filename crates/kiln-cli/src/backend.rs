//! The only place a concrete Burn backend is chosen: each job is monomorphized once per
//! backend here, at the edge.

use anyhow::{Result, bail};
use burn::backend::{Autodiff, Flex, NdArray};
use kiln_models::KilnAutodiffBackend;

use kiln_recipe::{BackendKind, Recipe};

/// Work that runs on whichever backend the recipe names.
pub trait Job {
    /// What the job returns.
    type Output;
    /// Runs the job on backend `B` (an autodiff backend; `B::InnerBackend` for inference).
    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the recipe's backend and device.
pub fn dispatch<J: Job>(recipe: &Recipe, job: J) -> Result<J::Output> {
    dispatch_on(recipe.run.backend, &recipe.run.device, job)
}

/// Runs `job` on a backend and device (`cpu`, `cuda`, `cuda:N`).
pub fn dispatch_on<J: Job>(backend: BackendKind, device: &str, job: J) -> Result<J::Output> {
    match backend {
        BackendKind::Flex => job.run::<Autodiff<Flex>>(burn::backend::flex::FlexDevice),
        BackendKind::Ndarray => {
            job.run::<Autodiff<NdArray>>(burn::backend::ndarray::NdArrayDevice::Cpu)
        }
        BackendKind::Cuda => run_cuda(device, job),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda<J: Job>(device: &str, job: J) -> Result<J::Output> {
    probe_libcuda()?;
    let index = device
        .strip_prefix("cuda:")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    job.run::<Autodiff<burn::backend::Cuda>>(burn::backend::cuda::CudaDevice::new(index))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: Job>(_device: &str, _job: J) -> Result<J::Output> {
    bail!(
        "run.backend = \"cuda\", but this kiln was built without CUDA support: rebuild with \
         `cargo build --release --features cuda`, or set `--set run.backend=flex --set run.device=cpu`"
    )
}

/// Fails with a clear message when the NVIDIA driver library cannot be loaded, instead of
/// letting cudarc panic later.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn probe_libcuda() -> Result<()> {
    for name in ["libcuda.so.1", "libcuda.so", "nvcuda.dll"] {
        // SAFETY: loading the NVIDIA driver library runs only its own initializers, the
        // same library that cudarc loads right after; nothing is called through it here.
        if unsafe { libloading::Library::new(name) }.is_ok() {
            return Ok(());
        }
    }
    bail!(
        "run.backend = \"cuda\", but the NVIDIA driver library (libcuda.so.1) was not found on \
         this machine: install the NVIDIA driver, or run on CPU with `--set run.backend=flex --set run.device=cpu`"
    )
}
