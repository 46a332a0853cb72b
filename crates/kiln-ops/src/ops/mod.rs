//! kiln's operations, one file each: the public tensor-level function (where the models
//! call one), the tensor-op reference and its backward (`reference`,
//! `reference_backward`: correct on any backend, the default of [`crate::KilnBackend`]),
//! how an autodiff backend records it (`autodiff`, or a [`crate::tensor`] binary op), and
//! the Flex hook that hands f32 operands to a host kernel (`flex`, `flex_backward`).
//!
//! Adding an operation: a new file here with those parts, one trait method in `lib.rs`
//! whose default is the reference, one line in each backend of [`crate::backends`] that
//! has a faster path (Flex) or must record a backward (autodiff), and one row in
//! [`crate::conformance`].

pub mod attention;
pub mod causal_depthwise;
pub mod chunk_attention;
pub mod cross_entropy;
pub mod dropout;
pub mod nf4_linear;
pub mod rms_norm;
pub mod rope;
pub mod scale_rows;
pub mod swiglu;
