//! Projections with optional LoRA adapters on a frozen, optionally NF4-quantized base.
//!
//! PEFT semantics: `y = base(x) + B(A(dropout(x))) * scale` with `scale = alpha / r`
//! (`alpha / sqrt(r)` with rsLoRA); `A` is kaiming-uniform (a = sqrt(5), so
//! `U(-1/sqrt(in), 1/sqrt(in))`), `B` is zero, dropout applies to the adapter input only and
//! only when gradients are tracked (training). Checkpoint names follow PEFT:
//! `<module>.lora_A.weight`, `<module>.lora_B.weight` (stored here in Burn's `[in, out]`
//! layout: `lora_A` is `[in, r]`, `lora_B` is `[r, out]`).
//!
//! A QLoRA base keeps no f32 weight: it holds the NF4 codes of the Hugging Face `[out, in]`
//! matrix (as bitsandbytes quantizes it) and dequantizes on the fly in `forward`.

// Field names are checkpoint keys, and PEFT's are `lora_A` / `lora_B`.
#![allow(non_snake_case)]

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use crate::backend::KilnBackend;
use crate::nf4::Nf4Tensor;

/// A linear projection: f32 or NF4 base, optional LoRA adapter.
#[derive(Module, Debug)]
pub struct Proj<B: KilnBackend> {
    /// Base weight `[in, out]`; absent when the base is NF4.
    pub weight: Option<Param<Tensor<B, 2>>>,
    /// Base bias `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Adapter down-projection, `[in, r]`.
    pub lora_A: Option<Linear<B>>,
    /// Adapter up-projection, `[r, out]`.
    pub lora_B: Option<Linear<B>>,
    /// Dropout on the adapter input.
    pub lora_dropout: Option<Dropout>,
    /// The NF4 base, Hugging Face layout `[out, in]`.
    #[module(skip)]
    pub nf4: Option<Arc<Nf4Tensor>>,
    /// Adapter scale (`alpha / r`).
    #[module(skip)]
    pub scale: f64,
}

impl<B: KilnBackend> From<Linear<B>> for Proj<B> {
    fn from(l: Linear<B>) -> Self {
        Self {
            weight: Some(l.weight),
            bias: l.bias,
            lora_A: None,
            lora_B: None,
            lora_dropout: None,
            nf4: None,
            scale: 0.0,
        }
    }
}

/// How to attach an adapter.
#[derive(Debug, Clone, Copy)]
pub struct LoraSpec {
    /// Rank.
    pub rank: usize,
    /// Scale applied to the adapter output.
    pub scale: f64,
    /// Dropout probability on the adapter input.
    pub dropout: f64,
    /// Quantize the base to NF4.
    pub nf4: bool,
}

impl<B: KilnBackend> Proj<B> {
    /// `[in, out]` of the projection.
    pub fn dims(&self) -> [usize; 2] {
        match (&self.weight, &self.nf4) {
            // The shape without materializing a lazily initialized weight.
            (Some(w), _) => w.lazy_shape().dims::<2>(),
            (None, Some(q)) => [q.shape[1], q.shape[0]],
            (None, None) => [0, 0],
        }
    }

    /// The base weight `[in, out]` (dequantized for an NF4 base).
    pub fn base_weight(&self, device: &B::Device) -> Tensor<B, 2> {
        match (&self.weight, &self.nf4) {
            (Some(w), _) => w.val(),
            (None, Some(q)) => {
                let [out, inp] = [q.shape[0], q.shape[1]];
                Tensor::<B, 2>::from_data(TensorData::new(q.dequantize(), [out, inp]), device)
                    .transpose()
            }
            (None, None) => unreachable!("a projection always has a base"),
        }
    }

    /// Replaces the base weight by an already quantized one (Hugging Face layout
    /// `[out, in]`); the f32 weight is dropped without ever being materialized.
    pub fn set_nf4_base(&mut self, q: Arc<Nf4Tensor>) {
        self.weight = None;
        self.nf4 = Some(q);
    }

    /// Attaches a LoRA adapter (A from `a_init`, B zero) and freezes the base; with
    /// `spec.nf4` the base is quantized and its f32 weight dropped.
    pub fn attach_lora(&mut self, spec: LoraSpec, a_init: Tensor<B, 2>, device: &B::Device) {
        let [inp, out] = self.dims();
        // Quantize in the Hugging Face [out, in] layout, as bitsandbytes does.
        if let Some(w) = self.weight.take_if(|_| spec.nf4) {
            let hf = w.val().transpose();
            let values = hf
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 weights");
            self.nf4 = Some(Arc::new(Nf4Tensor::quantize(&values, &[out, inp])));
        }
        self.weight = self.weight.take().map(|p| p.set_require_grad(false));
        self.bias = self.bias.take().map(|p| p.set_require_grad(false));
        self.lora_A = Some(Linear {
            weight: Param::from_tensor(a_init),
            bias: None,
        });
        self.lora_B = Some(Linear {
            weight: Param::from_tensor(Tensor::zeros([spec.rank, out], device)),
            bias: None,
        });
        self.lora_dropout = (spec.dropout > 0.0).then(|| DropoutConfig::new(spec.dropout).init());
        self.scale = spec.scale;
    }

    /// # Shapes
    /// - x: `[..., in]` -> `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // One 2-D matmul over all rows: a batched matmul against a broadcast weight would
        // compute the weight's gradient per batch row and then sum the copies.
        let dims = x.dims();
        let inp = dims[D - 1];
        let x = x.reshape([dims[..D - 1].iter().product::<usize>(), inp]);
        let mut y = match (&self.weight, &self.nf4) {
            (Some(w), _) => burn::tensor::module::linear(
                x.clone(),
                w.val(),
                self.bias.as_ref().map(|b| b.val()),
            ),
            (None, Some(q)) => {
                let flat = x.clone().into_primitive().tensor();
                let y =
                    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(B::nf4_linear(flat, q)));
                match &self.bias {
                    Some(b) => y + b.val().unsqueeze(),
                    None => y,
                }
            }
            (None, None) => unreachable!("a projection always has a base"),
        };
        if let (Some(a), Some(b)) = (&self.lora_A, &self.lora_B) {
            let x = match &self.lora_dropout {
                Some(d) => crate::ops::dropout(x, d.prob),
                None => x,
            };
            y = y + b.forward(a.forward(x)).mul_scalar(self.scale);
        }
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }

    /// Merges the adapter into an f32 base (`W + A B * scale`, the base dequantized first
    /// for NF4, which bakes its rounding into the merged weight); nothing without one.
    pub fn merge(&mut self, device: &B::Device) {
        let (Some(a), Some(b)) = (&self.lora_A, &self.lora_B) else {
            return;
        };
        let delta = a.weight.val().matmul(b.weight.val()).mul_scalar(self.scale); // [in, out]
        let w = (self.base_weight(device) + delta).detach();
        self.weight = Some(Param::from_tensor(w));
        self.lora_A = None;
        self.lora_B = None;
        self.lora_dropout = None;
        self.nf4 = None;
        self.scale = 0.0;
    }

    /// Bytes held by the frozen base weight (NF4 codes and statistics, or f32).
    pub fn base_bytes(&self) -> usize {
        match (&self.weight, &self.nf4) {
            (Some(w), _) => w.lazy_shape().num_elements() * 4,
            (None, Some(q)) => q.bytes(),
            (None, None) => 0,
        }
    }
}
