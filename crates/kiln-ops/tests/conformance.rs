//! The conformance table ([`kiln_ops::conformance`]) on the CPU backends: every operation's
//! fast path (Flex's host kernels, kiln's recorded backward passes) against its tensor-op
//! reference differentiated by Burn, and the two CPU backends against each other. `kiln
//! doctor` runs the same table on any backend against the CPU.

use burn::backend::{Autodiff, Flex, NdArray};
use kiln_ops::KilnAutodiffBackend;
use kiln_ops::conformance::{CHECKS, Check, Outputs, Path, Sizes, relative_error};

/// Largest accepted `max |a - b| / max |reference|`: the paths differ only in the order of
/// f32 sums and in NdArray's matmul rounding (up to about 2e-5 in attention's key
/// gradients), which a wrong formula exceeds by orders of magnitude.
const TOLERANCE: f64 = 5e-5;

fn run<B: KilnAutodiffBackend>(check: Check, path: Path, sizes: &Sizes) -> Outputs {
    check.run::<B>(path, sizes, &Default::default())
}

/// Every output of `got` within [`TOLERANCE`] of `want`, each failure named.
fn compare(what: &str, check: Check, got: &Outputs, want: &Outputs) -> Vec<String> {
    assert_eq!(got.len(), want.len(), "{what}: {} outputs", check.name());
    got.iter()
        .zip(want)
        .filter_map(|((name, g), (_, w))| {
            assert!(!w.is_empty(), "{what}: {} has no {name}", check.name());
            let error = relative_error(g, w);
            (error > TOLERANCE)
                .then(|| format!("{what}: {} ({name}) off by {error:.1e}", check.name()))
        })
        .collect()
}

fn kernel_matches_reference<B: KilnAutodiffBackend>(backend: &str, sizes: &Sizes) -> Vec<String> {
    CHECKS
        .iter()
        .flat_map(|&check| {
            let kernel = run::<B>(check, Path::Kernel, sizes);
            let reference = run::<B>(check, Path::Reference, sizes);
            compare(backend, check, &kernel, &reference)
        })
        .collect()
}

#[test]
fn every_operation_matches_its_reference_on_flex() {
    let failures = kernel_matches_reference::<Autodiff<Flex>>("flex", &Sizes::SMALL);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn every_operation_matches_its_reference_on_ndarray() {
    let failures = kernel_matches_reference::<Autodiff<NdArray>>("ndarray", &Sizes::SMALL);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn the_cpu_backends_agree_on_every_operation() {
    let failures: Vec<String> = CHECKS
        .iter()
        .flat_map(|&check| {
            let flex = run::<Autodiff<Flex>>(check, Path::Kernel, &Sizes::SMALL);
            let ndarray = run::<Autodiff<NdArray>>(check, Path::Kernel, &Sizes::SMALL);
            compare("ndarray vs flex", check, &ndarray, &flex)
        })
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The table catches a wrong operation: a reference compared with another check's outputs,
/// or with its own outputs perturbed in one value, fails.
#[test]
fn the_comparison_fails_on_a_changed_value() {
    let sizes = Sizes::SMALL;
    let mut kernel = run::<Autodiff<Flex>>(Check::Swiglu, Path::Kernel, &sizes);
    let reference = run::<Autodiff<Flex>>(Check::Swiglu, Path::Reference, &sizes);
    assert!(compare("flex", Check::Swiglu, &kernel, &reference).is_empty());
    kernel[1].1[17] += 1e-2;
    let failures = compare("flex", Check::Swiglu, &kernel, &reference);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("swiglu (d gate)"), "{failures:?}");
}
