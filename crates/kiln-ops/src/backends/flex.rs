//! [`KilnBackend`] on Burn's Flex CPU backend: every operation with a host kernel runs it
//! (through the operation's `flex` hook, which falls back to the reference for operands
//! that are not f32), and the helpers those hooks share to read and build Flex tensors.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Shape, TensorData};

use crate::KilnBackend;
use crate::ops::{
    attention, causal_depthwise, cross_entropy, dropout, rms_norm, rope, scale_rows, swiglu,
};

impl KilnBackend for Flex {
    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<Self> {
        attention::flex(q, k, v, bias, scale, causal)
    }

    fn kiln_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        scale_causal: (f64, bool),
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        attention::flex_backward(q, k, v, bias, scale_causal, d_out)
    }

    fn kiln_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        cross_entropy::flex(logits, targets)
    }

    fn kiln_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        d_loss: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        cross_entropy::flex_backward(logits, targets, d_loss)
    }

    fn kiln_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        swiglu::flex(gate, up)
    }

    fn kiln_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        swiglu::flex_backward(gate, up, d_out)
    }

    fn kiln_dropout_mask(shape: Shape, keep: f64, device: &Self::Device) -> FloatTensor<Self> {
        dropout::on_host::<Self>(shape, keep, device)
    }

    fn kiln_scale_rows(x: FloatTensor<Self>, s: FloatTensor<Self>) -> FloatTensor<Self> {
        scale_rows::flex(x, s)
    }

    fn kiln_scale_rows_backward(
        x: FloatTensor<Self>,
        s: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        scale_rows::flex_backward(x, s, d_out)
    }

    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        rope::flex(x, cos, sin, false)
    }

    fn kiln_rope_backward(
        d_out: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        rope::flex(d_out, cos, sin, true)
    }

    fn kiln_causal_depthwise(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        causal_depthwise::flex(x, w)
    }

    fn kiln_causal_depthwise_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        causal_depthwise::flex_backward(x, w, d_out)
    }

    fn kiln_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        rms_norm::flex(x, w, eps)
    }

    fn kiln_rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
        d_out: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        rms_norm::flex_backward(x, w, eps, d_out)
    }
}

/// `kernel` on contiguous copies of the operands when every one is f32, else `reference` on
/// the operands as they are: the shape of every operation's Flex hook.
pub(crate) fn f32_or<const N: usize, R>(
    operands: [FlexTensor; N],
    kernel: impl FnOnce(&[FlexTensor; N]) -> R,
    reference: impl FnOnce([FlexTensor; N]) -> R,
) -> R {
    let contiguous: Option<Vec<FlexTensor>> = operands.iter().map(contiguous_f32).collect();
    match contiguous.map(<[FlexTensor; N]>::try_from) {
        Some(Ok(c)) => kernel(&c),
        _ => reference(operands),
    }
}

/// A contiguous copy (or the tensor itself) of an f32 Flex tensor; `None` for other types.
pub(crate) fn contiguous_f32(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == burn::tensor::DType::F32).then(|| t.to_contiguous())
}

/// The f32 values of a contiguous Flex tensor.
pub(crate) trait AsF32 {
    fn as_f32(&self) -> &[f32];
}

impl AsF32 for FlexTensor {
    fn as_f32(&self) -> &[f32] {
        self.as_slice::<f32>()
            .expect("a contiguous f32 tensor (checked by the caller)")
    }
}

/// A Flex tensor of `shape` holding `values`.
pub(crate) fn flex_f32<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// A Flex tensor of `like`'s shape holding `values`.
pub(crate) fn flex_like(like: &FlexTensor, values: Vec<f32>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, like.layout().shape().clone()))
}
