//! [`KilnBackend`] on Burn's NdArray CPU backend: the tensor-op references, except dropout
//! masks, which it draws on the host as Flex does, so that both CPU backends draw the same
//! masks from the same seed.

use burn::backend::NdArray;
use burn::tensor::Shape;
use burn::tensor::ops::FloatTensor;

use crate::KilnBackend;
use crate::ops::dropout;

impl KilnBackend for NdArray {
    fn kiln_dropout_mask(shape: Shape, keep: f64, device: &Self::Device) -> FloatTensor<Self> {
        dropout::on_host::<Self>(shape, keep, device)
    }
}
