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

/// Refuses training configurations known to train wrongly.
///
/// QLoRA on CUDA: measured on an H100 (issue #8), the forward pass of the NF4 layers
/// matches the CPU but the gradients do not, and differ from run to run, with the NF4
/// weight dequantized either on the host or on the device; LoRA on an f32 base, MoA and
/// Qwen2 match the CPU there. The same code trains QLoRA right on wgpu (lavapipe, fusion
/// and autotune on or off), so the cause is in CUDA's own path (docs/accelerators.md);
/// until a GPU shows which, training it would silently waste the GPU.
/// `KILN_ALLOW_UNVERIFIED_CUDA_QLORA=1` lets a developer run it to debug.
pub fn check_training(recipe: &Recipe) -> Result<()> {
    let qlora = recipe
        .adapter
        .as_ref()
        .is_some_and(|a| a.kind == kiln_recipe::AdapterKind::Qlora);
    if recipe.run.backend == BackendKind::Cuda
        && qlora
        && std::env::var_os("KILN_ALLOW_UNVERIFIED_CUDA_QLORA").is_none()
    {
        bail!(
            "run.backend = \"cuda\" with adapter.kind = \"qlora\": QLoRA training on CUDA computes \
             wrong gradients in this kiln (its NF4 forward pass matches the CPU, its gradients do \
             not; see docs/accelerators.md). Train QLoRA on the CPU (`--set run.backend=flex \
             --set run.device=cpu`), through wgpu (a build with `--features wgpu`, `--set \
             run.backend=wgpu --set run.device=default`; checked on a software Vulkan, not yet on \
             a GPU), or LoRA on an f32 base on CUDA (`--set adapter.kind=lora`), which matches the CPU. `kiln doctor --backend \
             cuda` compares the NF4 operations with the CPU on this GPU"
        );
    }
    Ok(())
}

/// Runs `job` on the recipe's backend and device.
pub fn dispatch<J: Job>(recipe: &Recipe, job: J) -> Result<J::Output> {
    dispatch_on(
        recipe.run.backend,
        &recipe.run.device,
        recipe.run.fusion,
        job,
    )
}

/// Runs `job` on a backend and device (`cpu`; `cuda`, `cuda:N`; a wgpu device as
/// [`kiln_recipe::WgpuDeviceSpec`] parses it), with burn-fusion on the GPU backends when
/// `fusion` is set.
pub fn dispatch_on<J: Job>(
    backend: BackendKind,
    device: &str,
    fusion: bool,
    job: J,
) -> Result<J::Output> {
    match backend {
        BackendKind::Flex => job.run::<Autodiff<Flex>>(burn::backend::flex::FlexDevice),
        BackendKind::Ndarray => {
            job.run::<Autodiff<NdArray>>(burn::backend::ndarray::NdArrayDevice::Cpu)
        }
        BackendKind::Cuda => run_cuda(device, fusion, job),
        BackendKind::Wgpu => run_wgpu(device, fusion, job),
    }
}

/// Runs `job` on the CPU backend (Flex), whichever backend the run trained on: for work that
/// only moves weights between files, such as `kiln export`.
pub fn on_cpu<J: Job>(job: J) -> Result<J::Output> {
    job.run::<Autodiff<Flex>>(burn::backend::flex::FlexDevice)
}

#[cfg(feature = "cuda")]
fn run_cuda<J: Job>(device: &str, fusion: bool, job: J) -> Result<J::Output> {
    use kiln_models::backend::backends::cubecl::{Cuda, CudaDevice, CudaFused};
    probe_libcuda()?;
    persistent_kernel_caches();
    let index = device
        .strip_prefix("cuda:")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    let device = CudaDevice::new(index);
    if fusion {
        job.run::<Autodiff<CudaFused>>(device)
    } else {
        job.run::<Autodiff<Cuda>>(device)
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: Job>(_device: &str, _fusion: bool, _job: J) -> Result<J::Output> {
    bail!(
        "run.backend = \"cuda\", but this kiln was built without CUDA support: rebuild with \
         `cargo build --release --features cuda,autotune`, or set `--set run.backend=flex --set run.device=cpu`"
    )
}

#[cfg(feature = "wgpu")]
fn run_wgpu<J: Job>(device: &str, fusion: bool, job: J) -> Result<J::Output> {
    use kiln_models::backend::backends::cubecl::{Wgpu, WgpuFused};
    let device = crate::wgpu_adapter::select(device)?;
    persistent_kernel_caches();
    if fusion {
        job.run::<Autodiff<WgpuFused>>(device)
    } else {
        job.run::<Autodiff<Wgpu>>(device)
    }
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu<J: Job>(_device: &str, _fusion: bool, _job: J) -> Result<J::Output> {
    bail!(
        "run.backend = \"wgpu\", but this kiln was built without wgpu support: rebuild with \
         `cargo build --release --features wgpu,autotune`, or set `--set run.backend=flex --set run.device=cpu`"
    )
}

/// Where kiln keeps CubeCL's compiled kernels and autotune results:
/// `$KILN_CACHE_DIR/cubecl`, else `$XDG_CACHE_HOME/kiln/cubecl`, else `~/.cache/kiln/cubecl`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn kernel_cache_dir() -> std::path::PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let base = env("KILN_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| env("XDG_CACHE_HOME").map(|d| std::path::Path::new(&d).join("kiln")))
        .or_else(|| env("HOME").map(|h| std::path::Path::new(&h).join(".cache/kiln")))
        .unwrap_or_else(|| std::env::temp_dir().join("kiln"));
    base.join("cubecl")
}

/// Keeps CubeCL's compiled kernels and autotune results from run to run.
///
/// On a GPU, the first step of a run compiles (NVRTC) and autotunes every kernel it meets:
/// 3 to 6 minutes on an H100 for a smoke recipe. CubeCL does not keep compiled kernels by
/// default, and keeps autotune results in the `target/` folder above the working
/// directory. With both in one cache folder, the next run of the same shapes starts in
/// seconds (measured: 355 s for the QLoRA smoke's first step without, 14 s for three
/// whole steps with). A `cubecl.toml` (or `CUBECL_*` variables) that sets a cache wins.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn persistent_kernel_caches() {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dir = kernel_cache_dir();
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if config.compilation.cache.is_none() {
            config.compilation.cache = Some(CacheConfig::File(dir.clone()));
        }
        if matches!(config.autotune.cache, CacheConfig::Target) {
            config.autotune.cache = CacheConfig::File(dir);
        }
        CubeClRuntimeConfig::set(config);
    });
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
