//! The NF4 linear layer `y = x · dequant(W)ᵀ` on a frozen NF4 base weight (QLoRA).
//!
//! The forward dequantizes `W` for the one matmul and drops it; on an autodiff backend the
//! backward dequantizes `W` again to compute `dx = dy · dequant(W)` and records nothing
//! else, so a QLoRA step never holds more than one layer's f32 weight at a time. Expressed
//! with Burn's matmul instead, the autodiff graph would keep every layer's dequantized
//! weight alive from the forward to the backward pass, and a QLoRA step would need as much
//! memory as a LoRA step on an f32 base. The base is frozen, so no gradient for `W` is ever
//! computed.
//!
//! Where the weight is expanded is the backend's choice ([`KilnBackend::nf4_weight`]): the
//! CPU backends dequantize on the host ([`dequantized`]); an accelerator keeps the 4-bit
//! codes on the device and expands them there ([`nf4_weight_on_device`]).

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::prelude::*;
use burn::tensor::ElementConversion;
use burn::tensor::ops::FloatTensor;

use crate::KilnBackend;
use crate::nf4::{self, NF4_LEVELS, Nf4Tensor};

/// The reference: `x · nf4_weight(w)ᵀ` with the backend's own expansion of the weight.
pub fn reference<B: KilnBackend>(x: FloatTensor<B>, w: &Arc<Nf4Tensor>) -> FloatTensor<B> {
    let device = B::float_device(&x);
    let weight = B::nf4_weight(w, &device);
    B::float_matmul(x, B::float_transpose(weight))
}

/// The weight `[out, in]` dequantized on the host and uploaded to `device`.
pub fn dequantized<B: Backend>(w: &Nf4Tensor, device: &B::Device) -> FloatTensor<B> {
    let [out, inp] = [w.shape[0], w.shape[1]];
    B::float_from_data(TensorData::new(w.dequantize(), [out, inp]), device)
}

/// What [`nf4_weight_on_device`] keeps on the device: the codes, eight to a 32-bit word
/// (0.5 bytes per weight, as on the host), each block's dequantized absmax, and the levels.
struct Nf4OnDevice<B: Backend> {
    device: B::Device,
    words: Tensor<B, 1, Int>,
    absmax: Tensor<B, 2>,
    levels: Tensor<B, 1>,
}

impl<B: Backend> Nf4OnDevice<B> {
    fn upload(w: &Nf4Tensor, device: &B::Device) -> Self {
        let words = w.code_words();
        let absmax = w.absmax();
        let blocks = absmax.len();
        Self {
            device: device.clone(),
            words: Tensor::from_data(TensorData::new(words.clone(), [words.len()]), device),
            absmax: Tensor::from_data(TensorData::new(absmax, [blocks, 1]), device),
            levels: Tensor::from_data(TensorData::new(NF4_LEVELS.to_vec(), [16]), device),
        }
    }
}

/// The dequantized NF4 weight `[out, in]`, computed on `device` from codes uploaded there
/// once (on first use, kept with the tensor for later uses). The f32 weight exists only
/// for the caller's matmul: a 7B QLoRA base stays at 0.53 bytes per weight on the device.
///
/// Each 32-bit word is split into its eight 4-bit codes by shifts and masks, the codes
/// index the 16 levels, and each block of [`nf4::BLOCK`] values is scaled by its absmax.
pub fn nf4_weight_on_device<B: Backend>(w: &Nf4Tensor, device: &B::Device) -> Tensor<B, 2> {
    let resident = w
        .resident()
        .get_or_insert(|| Nf4OnDevice::<B>::upload(w, device));
    let fresh;
    let r = if resident.device == *device {
        resident.as_ref()
    } else {
        // Another device than the one holding the copy: upload for this use only.
        fresh = Nf4OnDevice::<B>::upload(w, device);
        &fresh
    };
    let blocks = r.absmax.dims()[0];
    let nibbles: Vec<Tensor<B, 1, Int>> = (0..8)
        .map(|k| {
            r.words
                .clone()
                .bitwise_right_shift_scalar((28 - 4 * k).elem())
                .bitwise_and_scalar(15.elem())
        })
        .collect();
    // [words, 8] row-major: word i's k-th code is weight 8i + k.
    let codes = Tensor::stack::<2>(nibbles, 1).reshape([blocks * nf4::BLOCK]);
    let values = r
        .levels
        .clone()
        .select(0, codes)
        .reshape([blocks, nf4::BLOCK])
        * r.absmax.clone();
    let [out, inp] = [w.shape[0], w.shape[1]];
    values
        .reshape([blocks * nf4::BLOCK])
        .slice(0..out * inp)
        .reshape([out, inp])
}

/// The backward of [`KilnBackend::nf4_linear`]: `dx = dy · dequant(W)`.
#[derive(Debug)]
struct Nf4LinearBackward;

impl<B: KilnBackend> Backward<B, 1> for Nf4LinearBackward {
    type State = Arc<Nf4Tensor>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            let weight = B::nf4_weight(&w, &B::float_device(&grad));
            B::float_matmul(grad, weight)
        });
    }
}

/// The operation on an autodiff backend: the state is the shared quantized weight, no copy
/// and no f32 tensor.
pub(crate) fn autodiff<B: KilnBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: &Arc<Nf4Tensor>,
) -> FloatTensor<Autodiff<B, C>> {
    let output = B::nf4_linear(x.primitive, w);
    match Nf4LinearBackward
        .prepare::<C>([x.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(Arc::clone(w), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorPrimitive;

    use super::*;

    type B = Autodiff<Flex>;

    fn nf4_linear(x: Tensor<B, 2>, w: &Arc<Nf4Tensor>) -> Tensor<B, 2> {
        let y = B::nf4_linear(x.into_primitive().tensor(), w);
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }

    #[test]
    fn forward_and_input_gradient_match_a_dense_matmul() {
        let device = Default::default();
        let (n, inp, out) = (5, 96, 40);
        let values: Vec<f32> = (0..out * inp).map(|i| ((i as f32) * 0.71).sin()).collect();
        let w = Arc::new(Nf4Tensor::quantize(&values, &[out, inp]));
        let dense = Tensor::<B, 2>::from_data(TensorData::new(w.dequantize(), [out, inp]), &device);
        let xs: Vec<f32> = (0..n * inp).map(|i| ((i as f32) * 0.13).cos()).collect();
        let x = || Tensor::<B, 2>::from_data(TensorData::new(xs.clone(), [n, inp]), &device);
        let upstream: Vec<f32> = (0..n * out).map(|i| (i % 7) as f32 - 3.0).collect();
        let up = Tensor::<B, 2>::from_data(TensorData::new(upstream, [n, out]), &device);

        let x1 = x().require_grad();
        let y1 = nf4_linear(x1.clone(), &w);
        let g1 = (y1.clone() * up.clone()).sum().backward();
        let x2 = x().require_grad();
        let y2 = x2.clone().matmul(dense.transpose());
        let g2 = (y2.clone() * up).sum().backward();

        y1.into_data()
            .assert_approx_eq::<f32>(&y2.into_data(), burn::tensor::Tolerance::default());
        x1.grad(&g1)
            .expect("input gradient")
            .into_data()
            .assert_approx_eq::<f32>(
                &x2.grad(&g2).expect("input gradient").into_data(),
                burn::tensor::Tolerance::default(),
            );
    }

    #[test]
    fn nf4_weights_expanded_on_the_device_equal_the_host_dequantization() {
        let device = Default::default();
        // 350 weights: five whole blocks of 64 and a partial one, which the words pad.
        for shape in [[7usize, 50], [128, 96]] {
            let n = shape[0] * shape[1];
            let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.2).collect();
            let w = Nf4Tensor::quantize(&values, &shape);
            assert!(format!("{:?}", w.resident()).contains("host only"));
            for _ in 0..2 {
                let on_device = nf4_weight_on_device::<Flex>(&w, &device);
                assert_eq!(on_device.dims(), shape);
                assert_eq!(
                    on_device.into_data().into_vec::<f32>().expect("f32"),
                    w.dequantize(),
                    "{shape:?}"
                );
                assert!(format!("{:?}", w.resident()).contains("on device"));
            }
            // A clone starts without the device copy.
            assert!(format!("{:?}", w.clone().resident()).contains("host only"));
        }
    }
}
