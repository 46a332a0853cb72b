//! NF4 4-bit quantization with double quantization, as bitsandbytes'
//! `quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`.
//!
//! - Weights are cut into blocks of 64 (flat, row-major; the last block may be partial).
//!   Each block keeps its absmax; each weight becomes the index of the nearest of the 16 NF4
//!   levels of `w / absmax`, two indices per byte (first in the high nibble).
//! - Double quantization: `offset = mean(absmax)`; `absmax - offset` is quantized blockwise
//!   (blocks of 256) to 8-bit indices into bitsandbytes' signed dynamic map, with one f32
//!   scale per 256 absmax values. Dequantized absmax = `map[code] * scale + offset`.
//! - Rounding follows bitsandbytes' CPU path exactly. NF4: values are scaled by
//!   `x * (1 / absmax)` (by `x / absmax` in a partial last block), clamped to `[-1, 1]`, and
//!   bucketized against the f32 midpoints of the levels (a value on a midpoint takes the lower
//!   level). The 8-bit absmax codes use bitsandbytes' native CPU quantizer instead:
//!   `x / absmax`, the largest level at or below it (the lowest level searched as -1.0), then
//!   the right neighbour only if strictly nearer.
//!
//! Memory: 0.5 bytes per weight for the codes, plus 1 byte per 64 weights for the absmax
//! codes and 4 bytes per 16,384 weights for their scales: about 4.127 bits per weight.

use std::any::Any;
use std::sync::{Arc, Mutex};

use crate::parallel::{concat_parallel, in_parallel};

/// The 16 NF4 levels (bitsandbytes `get_4bit_type("nf4")`), sorted.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Weights per absmax block.
pub const BLOCK: usize = 64;
/// Absmax values per block of the double quantization.
pub const ABSMAX_BLOCK: usize = 256;

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): 256 sorted
/// levels in `[-1, 1]` with a dynamic exponent, computed as bitsandbytes does (f32
/// `linspace`, f32 midpoints, scaled by powers of ten).
pub fn dynamic_map() -> [f32; 256] {
    let max_exponent_bits = 7i32;
    let non_sign_bits = 7i32;
    let mut data: Vec<f64> = Vec::with_capacity(256);
    let push_scaled = |means: &[f32], scale: f64, data: &mut Vec<f64>| {
        // torch multiplies an f32 tensor by a Python float in f32.
        let s = scale as f32;
        data.extend(means.iter().map(|m| f64::from(s * m)));
        data.extend(means.iter().map(|m| f64::from(-s * m)));
    };
    for i in 0..max_exponent_bits {
        let items = 2usize.pow((i + non_sign_bits - max_exponent_bits) as u32) + 1;
        let means = linspace_means(items);
        push_scaled(&means, 10f64.powi(-(max_exponent_bits - 1) + i), &mut data);
    }
    // bitsandbytes then adds `additional_items = 2^(non_sign_bits - max_exponent_bits) - 1`
    // levels at the last exponent: 0 for the signed 8-bit map, so nothing more to add.
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(|a, b| a.partial_cmp(b).expect("finite levels"));
    let mut out = [0f32; 256];
    for (o, d) in out.iter_mut().zip(&data) {
        *o = *d as f32;
    }
    out
}

/// bitsandbytes' unsigned 8-bit dynamic map (`create_dynamic_map(signed=False)`): 256
/// sorted levels in `[0, 1]`, used for the second moment of 8-bit AdamW.
pub fn dynamic_map_unsigned() -> [f32; 256] {
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = 2usize.pow((i + 1) as u32) + 1;
        let s = 10f64.powi(-6 + i) as f32;
        data.extend(linspace_means(items).iter().map(|m| f64::from(s * m)));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.partial_cmp(b).expect("finite levels"));
    let mut out = [0f32; 256];
    for (o, d) in out.iter_mut().zip(&data) {
        *o = *d as f32;
    }
    out
}

/// Nearest-level blockwise quantization onto sorted `levels` (an all-zero block gets
/// absmax 0 and the level nearest 0): the codes and each block's absmax.
pub fn quantize_nearest(values: &[f32], levels: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    quantize_blockwise(values, levels, block)
}

/// Inverse of [`quantize_nearest`].
pub fn dequantize_blockwise(
    codes: &[u8],
    absmax: &[f32],
    levels: &[f32],
    block: usize,
) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(i, c)| levels[*c as usize] * absmax[i / block])
        .collect()
}

/// `(b[:-1] + b[1:]) / 2` of `torch.linspace(0.1, 1, n, dtype=float32)`, in f32.
fn linspace_means(n: usize) -> Vec<f32> {
    let (start, end) = (0.1f32, 1.0f32);
    let step = (end - start) / (n as f32 - 1.0);
    let half = n / 2;
    // torch's CPU linspace fills the first half forward from `start` and the second half
    // backward from `end`, with fused multiply-adds (one rounding each).
    let points: Vec<f32> = (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            }
        })
        .collect();
    points.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// Index of the level nearest to `x` among sorted `levels`: the number of f32 midpoints
/// strictly below `x` (`torch.bucketize(x, midpoints, right=False)`).
fn bucketize(x: f32, midpoints: &[f32]) -> u8 {
    midpoints.partition_point(|m| *m < x) as u8
}

fn midpoints(levels: &[f32]) -> Vec<f32> {
    levels.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// Blockwise absmax quantization onto `levels`: returns the codes and each block's absmax.
fn quantize_blockwise(values: &[f32], levels: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let mids = midpoints(levels);
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
    let full = values.len() - values.len() % block;
    for chunk in values[..full].chunks(block) {
        let am = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 1.0 / am.max(1e-38);
        codes.extend(
            chunk
                .iter()
                .map(|v| bucketize((v * inv).clamp(-1.0, 1.0), &mids)),
        );
        absmax.push(am);
    }
    if full < values.len() {
        let rest = &values[full..];
        let am = rest.iter().fold(0f32, |m, v| m.max(v.abs()));
        let am = am.max(1e-38);
        codes.extend(
            rest.iter()
                .map(|v| bucketize((v / am).clamp(-1.0, 1.0), &mids)),
        );
        absmax.push(am);
    }
    (codes, absmax)
}

/// Blockwise 8-bit quantization as bitsandbytes' native CPU kernel does it.
fn quantize_blockwise_8bit(
    values: &[f32],
    levels: &[f32; 256],
    block: usize,
) -> (Vec<u8>, Vec<f32>) {
    // The kernel searches with the lowest level set to -1.0 (the map's own is -0.993), so
    // that -1.0 is always inside the searched range.
    let mut search = *levels;
    search[0] = -1.0;
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block) {
        let am = chunk.iter().fold(f32::MIN, |m, v| m.max(v.abs()));
        absmax.push(am);
        for v in chunk {
            let x = v / am;
            // The largest level at or below `x`.
            let mut idx = search.partition_point(|l| *l <= x).saturating_sub(1);
            if idx < 255 && (x - search[idx + 1]).abs() < (x - search[idx]).abs() {
                idx += 1;
            }
            codes.push(idx as u8);
        }
    }
    (codes, absmax)
}

/// A weight matrix in NF4 with double-quantized absmax.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Shape of the weight.
    pub shape: Vec<usize>,
    /// Two 4-bit level indices per byte, first in the high nibble.
    pub packed: Vec<u8>,
    /// 8-bit dynamic-map codes of `absmax - offset`, one per 64 weights.
    pub absmax_codes: Vec<u8>,
    /// Scale of each block of 256 absmax codes.
    pub absmax_scales: Vec<f32>,
    /// Mean of the absmax values.
    pub offset: f32,
    /// A copy on an accelerator, made on first use there.
    resident: Resident,
}

/// A type-erased copy of an [`Nf4Tensor`] kept by a backend on its device, so that the codes
/// cross to the device once rather than at every use. Cloning the tensor does not clone the
/// copy, and it takes no part in equality.
#[derive(Default)]
pub struct Resident(Mutex<Option<Arc<dyn Any + Send + Sync>>>);

impl Resident {
    /// The copy of type `T`, made by `make` if there is none (or one of another type).
    pub fn get_or_insert<T: Any + Send + Sync>(&self, make: impl FnOnce() -> T) -> Arc<T> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = slot.as_ref().and_then(|a| a.clone().downcast::<T>().ok()) {
            return found;
        }
        let made = Arc::new(make());
        *slot = Some(made.clone());
        made
    }
}

impl Clone for Resident {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Resident {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.0.lock().map(|s| s.is_some()).unwrap_or(false);
        write!(
            f,
            "Resident({})",
            if held { "on device" } else { "host only" }
        )
    }
}

impl Nf4Tensor {
    /// Quantizes a row-major tensor.
    pub fn quantize(values: &[f32], shape: &[usize]) -> Self {
        // Blocks are independent: cut the weights into whole blocks, one run of them per
        // core (a 7B model is 6.5 billion weights). Every piece but the last holds an even
        // number of codes, so the pieces pack into bytes on their own.
        let pieces = in_parallel(values.len(), BLOCK, |range| {
            let (codes, absmax) = quantize_blockwise(&values[range], &NF4_LEVELS, BLOCK);
            let mut packed = Vec::with_capacity(codes.len().div_ceil(2));
            for pair in codes.chunks(2) {
                // An odd count pads with the level of 0.0, as bitsandbytes pads with zero.
                let low = pair.get(1).copied().unwrap_or(7);
                packed.push((pair[0] << 4) | low);
            }
            (packed, absmax)
        });
        let mut packed = Vec::with_capacity(values.len().div_ceil(2));
        let mut absmax = Vec::with_capacity(values.len().div_ceil(BLOCK));
        for (p, a) in pieces {
            packed.extend_from_slice(&p);
            absmax.extend_from_slice(&a);
        }
        // torch's `mean` of f32; summed in f64 here, which agrees to the last bit on every
        // fixture (a difference would show as a wrong absmax code in the golden test).
        let offset =
            (absmax.iter().map(|a| f64::from(*a)).sum::<f64>() / absmax.len() as f64) as f32;
        let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let (absmax_codes, absmax_scales) =
            quantize_blockwise_8bit(&centered, &dynamic_map(), ABSMAX_BLOCK);
        Self {
            shape: shape.to_vec(),
            packed,
            absmax_codes,
            absmax_scales,
            offset,
            resident: Resident::default(),
        }
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor holds no weights.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dequantized absmax of every block of 64 weights.
    pub fn absmax(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.absmax_codes
            .iter()
            .enumerate()
            .map(|(i, c)| map[*c as usize] * self.absmax_scales[i / ABSMAX_BLOCK] + self.offset)
            .collect()
    }

    /// The dequantized weights, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax();
        let n = self.len();
        concat_parallel(n, BLOCK, |range| {
            range
                .map(|j| {
                    let byte = self.packed[j / 2];
                    let code = if j % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                    NF4_LEVELS[code as usize] * absmax[j / BLOCK]
                })
                .collect()
        })
    }

    /// The weights' codes as 32-bit words, eight 4-bit codes per word (the first code in
    /// the highest nibble), zero-padded to a whole number of [`BLOCK`]s: the layout
    /// [`crate::ops::nf4_linear::nf4_weight_on_device`] uploads.
    pub fn code_words(&self) -> Vec<i32> {
        let padded = self.len().div_ceil(BLOCK) * BLOCK;
        let mut bytes = self.packed.clone();
        bytes.resize(padded / 2, 0x77);
        bytes
            .chunks_exact(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// The per-backend copy of this tensor kept on a device (see
    /// [`crate::ops::nf4_linear::nf4_weight_on_device`]).
    pub fn resident(&self) -> &Resident {
        &self.resident
    }

    /// Bytes held: codes, absmax codes, their scales and the offset.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax_codes.len() + 4 * self.absmax_scales.len() + 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_match_the_design_table() {
        assert_eq!(NF4_LEVELS[1], -0.6961928009986877_f64 as f32);
        assert_eq!(NF4_LEVELS[8], 0.07958029955625534_f64 as f32);
        let map = dynamic_map();
        assert!(map[0] < -0.99 && map[0] > -1.0, "{}", map[0]);
        assert!(map.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert_eq!(map[255], 1.0);
    }

    #[test]
    fn quantizing_and_dequantizing_on_all_cores_equals_one_pass() {
        // Over the one-million threshold, with a partial last block.
        let n = (1 << 20) + 1000 + 37;
        let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.377).sin() * 0.3).collect();
        let q = Nf4Tensor::quantize(&values, &[n]);
        let (codes, absmax) = quantize_blockwise(&values, &NF4_LEVELS, BLOCK);
        let serial: Vec<u8> = codes
            .chunks(2)
            .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(7))
            .collect();
        assert_eq!(q.packed, serial);
        assert_eq!(q.absmax_codes.len(), absmax.len());
        let table = q.absmax();
        let one_pass: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, c)| NF4_LEVELS[*c as usize] * table[i / BLOCK])
            .collect();
        assert_eq!(q.dequantize(), one_pass);
        // Eight codes per word, first code highest; the padding is the level of 0.0.
        let words = q.code_words();
        assert_eq!(words.len(), n.div_ceil(BLOCK) * BLOCK / 8);
        assert_eq!((words[0] >> 28) & 15, i32::from(codes[0]));
        assert_eq!(words[0] & 15, i32::from(codes[7]));
        assert_eq!(words[words.len() - 1] & 15, 7);
    }

    #[test]
    fn round_trip_error_is_within_half_a_level_step() {
        let values: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 0.1).collect();
        let q = Nf4Tensor::quantize(&values, &[10, 100]);
        assert_eq!(q.packed.len(), 500);
        assert_eq!(q.absmax_codes.len(), 16);
        let d = q.dequantize();
        let worst = values
            .iter()
            .zip(&d)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // The widest NF4 gap is 0.304 of the absmax (0.1 here), plus the absmax's own error.
        assert!(worst < 0.0162, "{worst}");
        // About 4.127 bits per weight for large tensors; small ones pay the fixed costs.
        assert!(q.bytes() * 8 < 1000 * 42 / 10);
    }
}
