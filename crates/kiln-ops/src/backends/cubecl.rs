//! [`KilnBackend`] on Burn's CubeCL backends, CUDA and wgpu alike (one generic impl over the
//! runtime), with and without burn-fusion: the tensor-op references, except the NF4 weight,
//! whose 4-bit codes are uploaded once and expanded on the device at each use, so a 7B
//! QLoRA base stays at 0.53 bytes per weight in device memory.
//!
//! The concrete backends a run picks from are named here once, with Burn's element types
//! (f32 floats, i32 ints; u8 bools on CUDA, u32 on wgpu, whose shaders have no byte type):
//! `run.fusion` chooses between the `*Fused` and the plain type.

use std::sync::Arc;

use burn::tensor::ops::FloatTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::{Fusion, FusionBackend};

use crate::KilnBackend;
use crate::nf4::Nf4Tensor;
use crate::ops::nf4_linear;
use crate::tensor::prim;

/// Burn's CUDA backend without burn-fusion: each tensor operation launches its own kernel.
#[cfg(feature = "cuda")]
pub type Cuda = CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
/// Burn's CUDA backend with burn-fusion (Burn's default): element-wise chains and
/// reductions are compiled into fused kernels at run time.
#[cfg(feature = "cuda")]
pub type CudaFused = Fusion<Cuda>;
/// The CUDA device type.
#[cfg(feature = "cuda")]
pub use burn_cuda::CudaDevice;

/// Burn's wgpu backend (Vulkan, Metal, DX12; shaders in WGSL) without burn-fusion.
#[cfg(feature = "wgpu")]
pub type Wgpu = CubeBackend<burn_wgpu::WgpuRuntime, f32, i32, u32>;
/// Burn's wgpu backend with burn-fusion (Burn's default).
#[cfg(feature = "wgpu")]
pub type WgpuFused = Fusion<Wgpu>;
/// The wgpu device type.
#[cfg(feature = "wgpu")]
pub use burn_wgpu::WgpuDevice;

/// Whether this build compiled CubeCL's autotune (the `autotune` feature).
pub const AUTOTUNE: bool = cfg!(feature = "autotune");

/// Where a CubeCL backend builds an NF4 weight: on the device from its 4-bit codes (the
/// default), or, with `KILN_NF4_WEIGHT=host`, dequantized on the host and uploaded at each
/// use. The second is a diagnostic switch for the CUDA QLoRA fault (docs/accelerators.md):
/// it takes the device-side expansion out of the graph, at 8 times the upload.
fn nf4_on_host() -> bool {
    static ON_HOST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON_HOST.get_or_init(|| std::env::var("KILN_NF4_WEIGHT").is_ok_and(|v| v == "host"))
}

/// The NF4 weight on a CubeCL backend, where [`nf4_on_host`] says.
fn nf4_weight<B: burn::tensor::backend::Backend>(
    w: &Arc<Nf4Tensor>,
    device: &B::Device,
) -> FloatTensor<B> {
    if nf4_on_host() {
        nf4_linear::dequantized::<B>(w, device)
    } else {
        prim(nf4_linear::nf4_weight_on_device::<B>(w, device))
    }
}

impl<R, F, I, BT> KilnBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn nf4_weight(w: &Arc<Nf4Tensor>, device: &Self::Device) -> FloatTensor<Self> {
        nf4_weight::<Self>(w, device)
    }
}

impl<B> KilnBackend for Fusion<B>
where
    B: FusionBackend + KilnBackend,
{
    fn nf4_weight(w: &Arc<Nf4Tensor>, device: &Self::Device) -> FloatTensor<Self> {
        nf4_weight::<Self>(w, device)
    }
}
