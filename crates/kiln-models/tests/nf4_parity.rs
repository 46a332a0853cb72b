//! Golden test: kiln's NF4 with double quantization against bitsandbytes'
//! `quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`.
//! Regenerate the fixture with `.venv/bin/python scripts/make_nf4_fixtures.py`.
//!
//! The 4-bit codes must be identical; the absmax offset and scales identical or one ulp away
//! (torch's f32 `mean` is not always the exactly rounded mean that kiln computes). The 8-bit
//! absmax codes are identical except where bitsandbytes' native CPU kernel, whose division is
//! not exact (its choices near a midpoint deviate by a few 1e-6 of the scale, as a
//! reciprocal approximation would), picks the farther of two adjacent levels: kiln picks the
//! nearer one. The test checks that every such difference is of that kind, that they are
//! rare, and what they cost in the dequantized weights.

use kiln_models::nf4::{Nf4Tensor, dynamic_map, dynamic_map_unsigned};

struct Fixture(Vec<u8>);

impl Fixture {
    fn load() -> Self {
        Self(
            std::fs::read(manifest_dir().join("../../tests/fixtures/nf4/nf4.safetensors")).unwrap(),
        )
    }

    fn view(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let v = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture lacks {name}"));
        (v.shape().to_vec(), v.data().to_vec())
    }

    fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, bytes) = self.view(name);
        (
            shape,
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}

#[test]
fn dynamic_map_is_bitsandbytes() {
    let fx = Fixture::load();
    let (_, want) = fx.f32("dynamic_map");
    assert_eq!(dynamic_map().to_vec(), want);
    let (_, want) = fx.f32("dynamic_map_unsigned");
    assert_eq!(dynamic_map_unsigned().to_vec(), want);
}

#[test]
fn codes_absmax_and_dequantized_weights_match_bitsandbytes() {
    let fx = Fixture::load();
    for name in ["normal", "heavy", "odd", "big", "bf16"] {
        let (shape, w) = fx.f32(&format!("{name}.weight"));
        let q = Nf4Tensor::quantize(&w, &shape);
        let (_, packed) = fx.view(&format!("{name}.packed"));
        let (_, absmax_codes) = fx.view(&format!("{name}.absmax_q"));
        let (_, offset) = fx.f32(&format!("{name}.offset"));
        let (_, scales) = fx.f32(&format!("{name}.absmax2"));
        let (_, deq) = fx.f32(&format!("{name}.dequant"));
        let differing = q.packed.iter().zip(&packed).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "{name}: {differing} of {} packed bytes differ",
            packed.len()
        );
        assert_eq!(q.packed.len(), packed.len(), "{name}");
        // kiln rounds the mean of the absmax exactly; torch's f32 `mean` may land one ulp away.
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        assert!(
            ulps(q.offset, offset[0]) <= 1,
            "{name}: offset {} vs {}",
            q.offset,
            offset[0]
        );
        // A scale is the largest |absmax - offset|: it inherits the offset's rounding.
        let tol = 2.0 * f32::EPSILON * offset[0].abs().max(1.0);
        for (a, b) in q.absmax_scales.iter().zip(&scales) {
            assert!((a - b).abs() <= tol, "{name}: absmax scale {a} vs {b}");
        }
        assert_eq!(q.absmax_codes.len(), absmax_codes.len(), "{name}");
        let map = dynamic_map();
        let mut differing = 0;
        for (i, (ours, theirs)) in q.absmax_codes.iter().zip(&absmax_codes).enumerate() {
            if ours == theirs {
                continue;
            }
            differing += 1;
            assert_eq!(
                (i32::from(*ours) - i32::from(*theirs)).abs(),
                1,
                "{name}: absmax code {i}: {ours} vs {theirs}"
            );
            // The block's true absmax, centered and normalized as both quantizers do.
            let scale = q.absmax_scales[i / 256];
            let true_x = {
                let block = &w[i * 64..((i + 1) * 64).min(w.len())];
                let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                (am - q.offset) / scale
            };
            let (d_ours, d_theirs) = (
                (true_x - map[*ours as usize]).abs(),
                (true_x - map[*theirs as usize]).abs(),
            );
            assert!(
                d_ours <= d_theirs,
                "{name}: absmax code {i}: kiln's level is the farther one"
            );
            assert!(
                d_theirs - d_ours < 1e-4,
                "{name}: absmax code {i}: not a near-midpoint case ({d_ours} vs {d_theirs})"
            );
        }
        assert!(
            differing * 100 <= absmax_codes.len().max(100),
            "{name}: {differing} absmax codes differ"
        );
        let got = q.dequantize();
        let worst = got
            .iter()
            .zip(&deq)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        if differing == 0 && ulps(q.offset, offset[0]) == 0 {
            assert_eq!(worst, 0.0, "{name}: dequantized weights differ by {worst}");
        } else if differing == 0 {
            // Only the offset's last bit differs.
            assert!(
                worst <= 4.0 * f32::EPSILON * scale,
                "{name}: dequantized weights differ by {worst}"
            );
        } else {
            assert!(
                worst <= scale * 2e-3,
                "{name}: dequantized weights differ by {worst}"
            );
        }
        let bits = q.bytes() as f64 * 8.0 / w.len() as f64;
        eprintln!(
            "{name}: {} weights: 4-bit codes identical to bitsandbytes; offset {} ulp away; {differing} of {} absmax codes differ (kiln's is the nearer level); dequantized max abs diff {worst:.2e}; {bits:.3} bits/weight",
            w.len(),
            ulps(q.offset, offset[0]),
            absmax_codes.len()
        );
    }
}

/// The package directory: cargo's run-time `CARGO_MANIFEST_DIR` (right even when the
/// build directory is shared by checkouts at other paths), else the compile-time one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
