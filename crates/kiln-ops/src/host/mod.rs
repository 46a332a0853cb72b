//! Host kernels: the CPU code behind kiln's operations on Burn's Flex backend, one file per
//! operation (the operation itself, its tensor-op reference and its backward are in
//! [`crate::ops`]).
//!
//! Each kernel works on plain `f32` slices in row-major order (attention reads its heads in
//! place through [`attention::Strided`]), spreads its rows over the cores with rayon in
//! fixed-size tasks, and never depends on how many threads run it: a reduction is split at
//! the same places on every machine, so a result is the same from run to run.
//!
//! Vector code is compiled three times, for AVX-512, AVX2 with FMA and the baseline target,
//! and picked at run time ([`simd::multiversion`]), so one binary uses the widest unit the
//! CPU has.

pub mod attention;
pub mod causal_depthwise;
pub mod chunk_attention;
pub mod cross_entropy;
pub mod dropout;
pub mod rms_norm;
pub mod rope;
pub mod scale_rows;
pub(crate) mod simd;
pub mod swiglu;

pub use attention::{AttentionDims, AttentionInputs, Strided, attention, attention_backward};
pub use causal_depthwise::{causal_depthwise, causal_depthwise_backward};
pub use cross_entropy::{cross_entropy, cross_entropy_backward};
pub use dropout::dropout_mask;
pub use rms_norm::{rms_norm, rms_norm_backward};
pub use rope::rope;
pub use scale_rows::{scale_rows, scale_rows_backward};
pub use swiglu::{swiglu, swiglu_backward};
