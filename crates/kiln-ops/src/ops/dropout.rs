//! Dropout and its masks. A mask is a constant of the step, never differentiated; on the
//! CPU backends it is drawn on the host from a counter hash ([`crate::host::dropout`]) on
//! every core, seeded from the backend's generator, so both CPU backends draw the same masks
//! from the same seed. Burn's Flex samples a Bernoulli value at a time from ChaCha20 on one
//! thread: 44% of a QLoRA smoke step went to its LoRA dropout masks.

use burn::prelude::*;
use burn::tensor::Shape;
use burn::tensor::ops::FloatTensor;

use crate::KilnBackend;
use crate::host;
use crate::tensor::{float, host_float};

/// Dropout where the backend records gradients (training): `x ⊙ mask` with a
/// [`KilnBackend::kiln_dropout_mask`] of `x`'s shape, as `burn::nn::Dropout` computes it;
/// `x` itself at `prob` 0 or without autodiff.
pub fn dropout<B: KilnBackend, const D: usize>(x: Tensor<B, D>, prob: f64) -> Tensor<B, D> {
    let device = x.device();
    if prob <= 0.0 || !B::ad_enabled(&device) {
        return x;
    }
    let mask = B::kiln_dropout_mask(x.shape(), 1.0 - prob, &device);
    x * float(mask)
}

/// The reference: a Bernoulli tensor from the backend's generator, scaled by `1 / keep`.
pub fn reference<B: Backend>(shape: Shape, keep: f64, device: &B::Device) -> FloatTensor<B> {
    let mask = B::float_random(
        shape,
        burn::tensor::Distribution::Bernoulli(keep),
        device,
        burn::tensor::FloatDType::F32,
    );
    B::float_mul_scalar(mask, (1.0 / keep).into())
}

/// The mask computed on the host, on every core: 64 bits drawn from the backend's
/// generator seed [`host::dropout_mask`], a counter-based hash.
pub(crate) fn on_host<B: Backend>(shape: Shape, keep: f64, device: &B::Device) -> FloatTensor<B> {
    let draws = B::float_random(
        Shape::new([1, 1, 1, 4]),
        burn::tensor::Distribution::Uniform(0.0, 65536.0),
        device,
        burn::tensor::FloatDType::F32,
    );
    let seed = host_float::<B>(draws)
        .0
        .iter()
        .fold(0u64, |s, &d| (s << 16) | (d as u64 & 0xffff));
    let mask = host::dropout_mask(shape.num_elements(), keep, seed);
    B::float_from_data(TensorData::new(mask, shape), device)
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};

    use super::*;
    #[test]
    fn dropout_scales_kept_values_and_passes_its_mask_to_the_gradient() {
        type A = Autodiff<Flex>;
        let device = Default::default();
        let values: Vec<f32> = (0..4000).map(|i| 1.0 + (i % 7) as f32).collect();
        let x = Tensor::<A, 2>::from_data(TensorData::new(values.clone(), [40, 100]), &device)
            .require_grad();
        let y = dropout(x.clone(), 0.25);
        let grads = y.clone().sum().backward();
        let y: Vec<f32> = y.into_data().to_vec().unwrap();
        let g: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let scale = 1.0 / 0.75;
        for ((y, g), x) in y.iter().zip(&g).zip(&values) {
            // Each value is dropped (0, gradient 0) or kept (x / keep, gradient 1 / keep).
            assert!(
                (*y == 0.0 && *g == 0.0)
                    || ((y - x * scale).abs() < 1e-5 && (g - scale).abs() < 1e-6),
                "y {y}, grad {g}, x {x}"
            );
        }
        let kept = g.iter().filter(|&&g| g > 0.0).count();
        assert!((2850..3150).contains(&kept), "kept {kept} of 4000");
        // No dropout at probability 0, nor on a backend without autodiff (inference).
        let x = Tensor::<Flex, 1>::from_data(TensorData::new(values.clone(), [4000]), &device);
        assert_eq!(dropout(x.clone(), 0.25).into_data(), x.clone().into_data());
        let xa = Tensor::<A, 1>::from_data(TensorData::new(values, [4000]), &device);
        assert_eq!(dropout(xa.clone(), 0.0).into_data(), xa.into_data());
    }
}
