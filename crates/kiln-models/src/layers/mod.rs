//! Layers that every model family composes: the token embedding (with NEFTune), RMSNorm,
//! rotate-half RoPE, the SwiGLU feed-forward block and the (optionally tied) output head.
//!
//! Each exists once, here; a family keeps only what is its own (Qwen2's attention, MoA's
//! routed paths, ConvGPT's convolutions and memory). Where two families computed the same
//! layer in a different floating-point order, the layer takes that order as a parameter
//! instead of picking one, so that unifying the code changed no result (see
//! [`rope::AngleRounding`]).

pub mod embedding;
pub mod head;
pub mod norm;
pub mod rope;
pub mod swiglu;

pub use embedding::TokenEmbedding;
pub use head::lm_head;
pub use norm::RmsNorm;
pub use rope::{AngleRounding, Rope, rotate_half};
pub use swiglu::SwiGlu;
