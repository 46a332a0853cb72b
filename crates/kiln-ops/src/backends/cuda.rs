//! [`KilnBackend`] on Burn's CUDA backend: the tensor-op references, except the NF4 weight,
//! whose 4-bit codes are uploaded once and expanded on the device at each use, so a 7B
//! QLoRA base stays at 0.53 bytes per weight in device memory.

use std::sync::Arc;

use burn::backend::Cuda;
use burn::tensor::ops::FloatTensor;

use crate::KilnBackend;
use crate::nf4::Nf4Tensor;
use crate::ops::nf4_linear;
use crate::tensor::prim;

impl KilnBackend for Cuda {
    fn nf4_weight(w: &Arc<Nf4Tensor>, device: &Self::Device) -> FloatTensor<Self> {
        prim(nf4_linear::nf4_weight_on_device::<Self>(w, device))
    }
}
