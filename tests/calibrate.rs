//! `triaxkv calibrate` end to end on the bundled SmolLM2 (skipped with a message when it has
//! not been fetched): outputs, the per-trajectory cache, truncation notes and bad input.

mod common;

use std::path::Path;
use std::process::Command;

use common::default_model as model;

fn calibrate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_triaxkv"))
        .arg("calibrate")
        .args(args)
        .output()
        .expect("the triaxkv binary runs")
}

fn trace_file() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("traces/calib/webvoyager.jsonl")
        .display()
        .to_string()
}

#[test]
fn short_run_writes_every_output_and_reuses_its_cache() {
    let Some(model) = model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("calib");
    let (m, o) = (model.display().to_string(), out.display().to_string());
    let args = [
        "--model",
        &m,
        "--traces",
        &trace_file(),
        "-o",
        &o,
        "--max-tokens",
        "1024",
        "--queries",
        "4",
    ];
    let first = calibrate(&args);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "calibrate failed: {stderr}");
    assert!(
        stderr.contains("truncated from"),
        "truncation must be reported: {stderr}"
    );
    for f in [
        "sensitivity.parquet",
        "sensitivity.csv",
        "summary.md",
        "heatmap.svg",
        "heatmap.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let csv = std::fs::read_to_string(out.join("sensitivity.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    assert_eq!(
        &header[..9],
        &[
            "layer",
            "kv",
            "recency",
            "modality",
            "role",
            "bits",
            "tokens",
            "distortion",
            "distortion_ci"
        ]
    );
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (di, bi) = (col("distortion"), col("bits"));
    let (mut sum2, mut sum4, mut rows) = (0.0, 0.0, 0);
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let d: f64 = f[di].parse().unwrap();
        assert!(d.is_finite() && d >= 0.0, "bad distortion in {line}");
        if f[bi] == "2" {
            sum2 += d;
        } else {
            sum4 += d;
        }
        rows += 1;
    }
    assert!(rows >= 2 * 30 * 2, "only {rows} rows");
    assert!(
        sum2 > 4.0 * sum4,
        "INT2 ({sum2}) must distort far more than INT4 ({sum4})"
    );
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("image axis was not exercised") && summary.contains("tokens/s"));
    // "N rows from T trajectories (0 cached)": one cached result per measured trajectory.
    let stdout1 = String::from_utf8_lossy(&first.stdout).into_owned();
    let measured: usize = stdout1
        .split(" trajectories")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no trajectory count in {stdout1}"));
    assert!(measured >= 1);
    let cached = std::fs::read_dir(out.join("cache")).unwrap().count();
    assert_eq!(
        cached, measured,
        "one cached result per measured trajectory"
    );

    // A re-run measures nothing again and writes the same table.
    let second = calibrate(&args);
    assert!(second.status.success());
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(stdout.contains(&format!("({measured} cached)")), "{stdout}");
    // Same rows (cached f64s may differ in the last ulp through JSON).
    let csv2 = std::fs::read_to_string(out.join("sensitivity.csv")).unwrap();
    let keys = |c: &str| -> Vec<String> {
        c.lines()
            .map(|l| l.split(',').take(7).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(keys(&csv2), keys(&csv));
    // No temporary files are left behind.
    for e in std::fs::read_dir(&out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "leftover {name}");
    }
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let Some(model) = model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("calib");
    let (m, o) = (model.display().to_string(), out.display().to_string());
    let missing = dir.path().join("none-*.jsonl").display().to_string();
    let r = calibrate(&["--model", &m, "--traces", &missing, "-o", &o]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("none-*.jsonl"),
        "error must name the pattern: {err}"
    );
    assert!(!out.exists(), "no output on error");

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let r = calibrate(&[
        "--model",
        &m,
        "--traces",
        &empty.display().to_string(),
        "-o",
        &o,
    ]);
    assert!(!r.status.success());
    assert!(!out.exists());

    let r = calibrate(&[
        "--model",
        &m,
        "--traces",
        &trace_file(),
        "-o",
        &o,
        "--bits",
        "3",
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("bit width 3"));

    let tf = trace_file();
    for bad in [
        &["--key-outliers", "0.5"][..],
        &["--key-outliers", "0.01", "--key-mode", "per-token"],
    ] {
        let mut args = vec!["--model", &m, "--traces", &tf, "-o", &o];
        args.extend_from_slice(bad);
        let r = calibrate(&args);
        assert!(!r.status.success(), "{bad:?}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains("--key-outliers"), "{bad:?}: {err}");
        assert!(!out.exists());
    }
}

/// Calibration replays a prefix shared with the previous trajectory only once: continuing
/// from its K/V must give bit for bit what a fresh replay gives (whole chunks, same order).
#[test]
fn replay_from_a_shared_prefix_equals_a_fresh_replay() {
    use triaxkv::calibrate::capture::{replay, replay_from, reusable_prefix, RecordingCache};
    use triaxkv::kvcache::KvCache;
    use triaxkv::model::llama::Logits;
    use triaxkv::tags::{Modality, Role, TokenTag};
    if model().is_none() {
        return;
    }
    let loaded = triaxkv::model::load::load_or_default(None).unwrap();
    let m = &loaded.model;
    let tag = TokenTag {
        role: Role::System,
        modality: Modality::Text,
        turn: 0,
        step: 0,
    };
    let a: Vec<u32> = (0..80u32).map(|i| 200 + (i * 37) % 5000).collect();
    let mut b = a[..70].to_vec();
    b.extend((0..14u32).map(|i| 300 + (i * 91) % 7000));
    let tags = vec![tag; 84];
    let chunk = 16;
    let first_query = 66;
    let positions = vec![first_query, 75, 83];

    let cap_a = replay(m, &a, &tags[..80], vec![79], chunk, &mut |_| {});
    let n = reusable_prefix((&b, &tags), (&a, &tags[..80]), first_query, chunk);
    assert_eq!(n, 64, "common prefix 70, cut to whole chunks of 16");
    let mut prefix = cap_a.full;
    prefix.truncate(n);
    let mut seen = Vec::new();
    let resumed = replay_from(
        m,
        &b,
        &tags,
        None,
        positions.clone(),
        chunk,
        Some(prefix),
        &mut |d| seen.push(d),
    );
    assert_eq!(seen, vec![80, 84], "progress counts whole-sequence tokens");
    let fresh = replay(m, &b, &tags, positions, chunk, &mut |_| {});
    for l in 0..m.config.num_layers {
        assert!(resumed.full.keys(l) == fresh.full.keys(l), "layer {l} keys");
        assert!(
            resumed.full.values(l) == fresh.full.values(l),
            "layer {l} values"
        );
        assert!(resumed.q[l] == fresh.q[l], "layer {l} queries");
    }
    assert_eq!(resumed.full.len(0), 84);
    // Without logits the last layer skips its attention but still records its queries:
    // the same as a pass that attends everywhere (same chunks, so bit for bit).
    let mut rec = RecordingCache::new(m.kv_shape(), vec![first_query, 75, 83]);
    m.prefill(&b, &tags, &mut rec, Logits::All, chunk, &mut |_| {});
    let attended = rec.into_capture();
    let last = m.config.num_layers - 1;
    assert!(fresh.q[last].iter().any(|&x| x != 0.0));
    assert!(
        attended.q == fresh.q,
        "queries recorded with and without attention"
    );
    // A measured position inside the common prefix limits what may be reused.
    assert_eq!(
        reusable_prefix((&b, &tags), (&a, &tags[..80]), 40, chunk),
        32
    );
}
