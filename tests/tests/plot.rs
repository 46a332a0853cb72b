//! `kiln plot`: a well-formed SVG with every panel, the phase boundaries and a legend entry
//! per run.

use kiln_tests::*;

#[test]
fn plot_overlays_runs_with_panels_phases_and_legend() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    // MoA into its second phase (the boundary is after step 30), with dream cycles at 10,
    // 20 and 30; and a short second run to overlay.
    for (name, stop) in [("moa-a", "34"), ("moa-b", "12")] {
        let train = run(&[
            "train",
            "recipes/smoke/moa-tiny.toml",
            "--out",
            out,
            "--set",
            &format!("run.name={name}"),
            "--stop-after",
            stop,
        ]);
        assert_eq!(train.status.code(), Some(75), "{}", stderr(&train));
    }
    let a = dir.path().join("moa-a");
    let b = dir.path().join("moa-b");
    let svg_path = dir.path().join("both.svg");
    let plot = run(&[
        "plot",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--out",
        svg_path.to_str().unwrap(),
    ]);
    assert_ok(&plot);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .collect();
    let has = |s: &str| texts.iter().any(|t| t.contains(s));
    for expected in [
        "loss",
        "learning rate",
        "throughput",
        "router path usage of moa-a",
        "dream: LR multipliers",
        "logic →",
        "moa-a train (smoothed)",
        "moa-b train (smoothed)",
        "mixer: metric attention",
        "HyperFFN: SwiGLU",
    ] {
        assert!(has(expected), "no text `{expected}` in the plot: {texts:?}");
    }
    // Lines were drawn: one polyline per curve at least.
    assert!(
        doc.descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .count()
            >= 10
    );
    // No font is referenced but the viewer's own.
    assert!(!svg.contains("@font-face") && !svg.contains(".ttf"));

    // One run: the plot lands in its directory. PNG is refused with the reason.
    assert_ok(&run(&["plot", b.to_str().unwrap()]));
    assert!(
        roxmltree::Document::parse(&std::fs::read_to_string(b.join("plot.svg")).unwrap()).is_ok()
    );
    let png = run(&["plot", b.to_str().unwrap(), "--out", "x.png"]);
    assert_eq!(png.status.code(), Some(1));
    assert!(stderr(&png).contains("SVG only"), "{}", stderr(&png));
    let nothing = run(&["plot", dir.path().to_str().unwrap()]);
    assert_eq!(nothing.status.code(), Some(1));
    assert!(
        stderr(&nothing).contains("is not a run directory"),
        "{}",
        stderr(&nothing)
    );
}
