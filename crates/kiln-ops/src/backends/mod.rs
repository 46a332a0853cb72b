//! [`crate::KilnBackend`] on each of Burn's backends kiln runs on, one thin file each: a
//! backend overrides only the operations it has its own path for, one line per operation,
//! and every other operation runs its tensor-op reference.
//!
//! | backend | overrides |
//! |---|---|
//! | Flex (CPU) | every operation with a host kernel ([`crate::host`]) |
//! | NdArray (CPU) | dropout masks, drawn as on Flex |
//! | CubeCL: CUDA and wgpu, fused or not | the NF4 weight, expanded on the device from 4-bit codes kept there |
//! | `Autodiff<B>` | every differentiable operation, recorded with its own backward |

pub mod autodiff;
#[cfg(feature = "cubecl")]
pub mod cubecl;
pub mod flex;
pub mod ndarray;
