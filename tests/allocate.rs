//! `triaxkv allocate` end to end on a small synthetic sensitivity table made for the tiny
//! Llama fixture (2 layers, 2 KV heads, head dim 16): budgets in bits and bytes, the
//! infeasibility floor, every policy, solver agreement and bad input.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use triaxkv::calibrate::table::{Provenance, Row, SensitivityTable};
use triaxkv::profile::Profile;
use triaxkv::tags::{Modality, Recency, Role, Tag};

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

const SINKS: usize = 4;
const WINDOW: usize = 8;
/// Tags of the fixture with their tokens per query and trajectories that saw them.
const TAGS: [(Role, Recency, f64, usize); 6] = [
    (Role::System, Recency::Older, 120.0, 5),
    (Role::User, Recency::Current, 40.0, 5),
    (Role::User, Recency::Previous, 25.0, 3),
    (Role::Observation, Recency::Current, 60.0, 4),
    (Role::Observation, Recency::Older, 90.0, 2),
    (Role::Template, Recency::Current, 15.0, 5),
];

/// Deterministic pseudo-random numbers in [0, 1).
fn lcg(state: &mut u64) -> f64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

fn fixture_table(model_sha: &str) -> SensitivityTable {
    let mut seed = 42u64;
    let mut rows = Vec::new();
    for layer in 0..2 {
        for kv in ["k", "v"] {
            for &(role, recency, tokens, trajectories) in &TAGS {
                let tag = Tag {
                    recency,
                    modality: Modality::Text,
                    role,
                };
                let d2 = 1e-3 + 0.2 * lcg(&mut seed);
                let d4 = d2 * (0.02 + 0.1 * lcg(&mut seed));
                for (bits, d) in [(2u8, d2), (4, d4)] {
                    rows.push(Row {
                        layer,
                        kv,
                        tag,
                        bits,
                        tokens,
                        distortion: d,
                        distortion_ci: Some(d / 10.0),
                        trajectories,
                    });
                }
            }
        }
    }
    SensitivityTable {
        rows,
        provenance: Provenance {
            model: "tiny-llama".into(),
            model_sha256: model_sha.into(),
            traces_hash: "fixture".into(),
            quantizer: "k=per_channel/g64 v=per_token/g16 scale+zero=fp16".into(),
            recency_unit: "turn".into(),
            sinks: SINKS,
            window: WINDOW,
        },
    }
}

/// A calibration folder for the tiny model; returns (tempdir, folder).
fn calib_dir() -> (tempfile::TempDir, PathBuf) {
    let sha = triaxkv::model::load::inspect(Some(&tiny_model()))
        .unwrap()
        .sha256;
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib");
    std::fs::create_dir_all(&calib).unwrap();
    fixture_table(&sha).write(&calib).unwrap();
    (dir, calib)
}

fn allocate(calib: &Path, out: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_triaxkv"))
        .arg("allocate")
        .arg("--calib")
        .arg(calib)
        .arg("-o")
        .arg(out)
        .arg("--model")
        .arg(tiny_model())
        .args(args)
        .output()
        .expect("the triaxkv binary runs")
}

fn ok(o: &Output) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "allocate failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "allocate should have failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The all-INT2 floor computed here from first principles: per layer and K|V, the table's
/// tokens at 2 bits + 32/group (keys: blocks of 64 tokens, values: groups of 16) and the
/// sinks and window at 16 bits, over all tokens.
fn floor_bits() -> f64 {
    floor_bits_protecting(SINKS + WINDOW)
}

/// `floor_bits` for a cache keeping `protected` sink and window tokens at 16 bits: the
/// calibration's context (its tokens, sinks and window) stays, the rest of it is quantized.
fn floor_bits_protecting(protected: usize) -> f64 {
    floor_bits_protecting_at(protected, 16.0)
}

/// The same with the protected tokens held at `bits` (8: FP8, `--hold-fp8`).
fn floor_bits_protecting_at(protected: usize, bits: f64) -> f64 {
    let context = TAGS.iter().map(|t| t.2).sum::<f64>() + (SINKS + WINDOW) as f64;
    let p = protected as f64;
    let n = context - p;
    let k = n * (2.0 + 32.0 / 64.0) + bits * p;
    let v = n * (2.0 + 32.0 / 16.0) + bits * p;
    (k + v) / (2.0 * (n + p))
}

#[test]
fn budget_in_bits_gives_a_valid_profile_within_budget() {
    let (dir, calib) = calib_dir();
    let out = dir.path().join("p.json");
    let stdout = ok(&allocate(&calib, &out, &["--budget", "4.0"]));
    assert!(
        stdout.contains("L0-0") && stdout.contains("objective"),
        "{stdout}"
    );
    let p = Profile::read(&out).unwrap();
    assert_eq!(p.policy, "triaxial");
    assert_eq!(p.name, "triaxial-4");
    assert_eq!(p.budget.asked_bits, Some(4.0));
    assert!(
        p.budget.achieved_bits <= 4.0 + 1e-9,
        "{}",
        p.budget.achieved_bits
    );
    assert!(p.budget.achieved_bits > floor_bits());
    assert_eq!(p.assignments.len(), 2 * 2 * TAGS.len());
    assert_eq!(
        (p.model.layers, p.model.kv_heads, p.model.head_dim),
        (2, 2, 16)
    );
    assert_eq!(
        (p.cache.sinks, p.cache.window, p.cache.value_group),
        (SINKS, WINDOW, 16)
    );
    let parquet = std::fs::read(calib.join("sensitivity.parquet")).unwrap();
    let sha: String = Sha256::digest(&parquet)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        p.provenance.calibration_sha256.as_deref(),
        Some(sha.as_str())
    );
    assert_eq!(p.provenance.solver, "microlp");
    assert!(p.provenance.objective.unwrap() > 0.0 && p.provenance.solve_s.is_some());
    // More budget never makes the objective worse; all 4-bit costs 4059 / 724 = 5.606.
    let rich = dir.path().join("rich.json");
    ok(&allocate(&calib, &rich, &["--budget", "5.61"]));
    let r = Profile::read(&rich).unwrap();
    assert!(r.provenance.objective <= p.provenance.objective);
    assert!(r.assignments.iter().all(|a| a.bits == 4));
}

#[test]
fn budget_in_bytes_is_converted_with_the_model_shape() {
    let (dir, calib) = calib_dir();
    let out = dir.path().join("p.json");
    // 4 sequences of 256 tokens: 2 (K, V) × 4 × 256 × 2 layers × 2 heads × 16 = 131,072
    // elements; 64 KiB is 4 bits per element.
    let args = ["--budget", "64KiB", "--context", "256", "--batch", "4"];
    let stdout = ok(&allocate(&calib, &out, &args));
    assert!(stdout.contains("64KiB for 4 × 256 tokens"), "{stdout}");
    let p = Profile::read(&out).unwrap();
    assert!((p.budget.asked_bits.unwrap() - 4.0).abs() < 1e-12);
    assert_eq!(p.budget.asked_bytes, Some(64 * 1024));
    assert_eq!((p.budget.context, p.budget.batch), (Some(256), Some(4)));
    assert!(p.budget.achieved_bits <= 4.0 + 1e-9);
    let e = failed(&allocate(
        &calib,
        &out,
        &["--budget", "64KiB", "--context", "256"],
    ));
    assert!(e.contains("--context N and --batch N"), "{e}");
    let e = failed(&allocate(
        &calib,
        &out,
        &["--budget", "3.0", "--batch", "2"],
    ));
    assert!(e.contains("--batch applies only"), "{e}");
}

#[test]
fn infeasible_budget_states_the_floor() {
    let (dir, calib) = calib_dir();
    let out = dir.path().join("p.json");
    let e = failed(&allocate(&calib, &out, &["--budget", "3.0"]));
    let floor = format!("{:.4}", floor_bits());
    assert!(
        e.contains("smallest feasible") && e.contains(&floor),
        "{e} (floor {floor})"
    );
    assert!(!out.exists());
    // Exactly at the floor is feasible: everything at 2 bits.
    let at = format!("{}", floor_bits() + 1e-9);
    ok(&allocate(&calib, &out, &["--budget", &at]));
    let p = Profile::read(&out).unwrap();
    assert!(p.assignments.iter().all(|a| a.bits == 2));
}

#[test]
fn every_policy_writes_a_profile_and_no_ablation_beats_triaxial() {
    let (dir, calib) = calib_dir();
    let objective = |policy: &str| -> (Profile, f64) {
        let out = dir.path().join(format!("{policy}.json"));
        ok(&allocate(
            &calib,
            &out,
            &["--budget", "4.2", "--policy", policy],
        ));
        let p = Profile::read(&out).unwrap();
        assert_eq!(p.policy, policy);
        // The runtime can build its per-(layer, tag) classes from it.
        p.to_policy().unwrap();
        let o = p.provenance.objective.unwrap();
        (p, o)
    };
    let (tri, best) = objective("triaxial");
    assert!(tri.budget.achieved_bits <= 4.2 + 1e-9);
    let mut strictly_worse = 0;
    for ablation in [
        "role-only",
        "recency-only",
        "modality-only",
        "layer-only",
        "tag-only",
        "tag-kv",
    ] {
        let (p, o) = objective(ablation);
        assert!(p.budget.achieved_bits <= 4.2 + 1e-9, "{ablation}");
        assert!(best <= o + 1e-12 * o, "{ablation}: {o} < triaxial {best}");
        strictly_worse += (o > best * (1.0 + 1e-9)) as usize;
        // The restriction holds: tags sharing the axis value share the bits.
        for a in &p.assignments {
            for b in &p.assignments {
                let same = match ablation {
                    "role-only" => a.role == b.role,
                    "recency-only" => a.recency == b.recency,
                    "tag-only" | "tag-kv" => a.tag() == b.tag(),
                    _ => true,
                };
                let same_place = match ablation {
                    "tag-only" => true,
                    "tag-kv" => a.kv == b.kv,
                    _ => a.layer == b.layer && a.kv == b.kv,
                };
                if same_place && same {
                    assert_eq!(a.bits, b.bits, "{ablation}: {a:?} vs {b:?}");
                }
            }
        }
    }
    assert!(
        strictly_worse > 0,
        "no ablation lost anything: the fixture is too easy"
    );
    // tag-kv relaxes tag-only (keys and values apart): never a higher objective.
    let ((_, only), (_, kv)) = (objective("tag-only"), objective("tag-kv"));
    assert!(kv <= only * (1.0 + 1e-12), "tag-kv {kv} > tag-only {only}");
    // Fixed baselines: bits and achieved bits from the same accounting.
    let n: f64 = TAGS.iter().map(|t| t.2).sum();
    let ctx = n + (SINKS + WINDOW) as f64;
    for (policy, bits, window, k, v) in [
        ("uniform-int4", 4, 0usize, 4.5, 6.0),
        ("uniform-int2", 2, 0, 2.5, 4.0),
        ("kivi4", 4, 128, 4.5, 6.0),
        ("kivi2", 2, 128, 2.5, 4.0),
    ] {
        let (p, _) = objective(policy);
        assert!(p.assignments.iter().all(|a| a.bits == bits), "{policy}");
        assert_eq!((p.cache.sinks, p.cache.window), (0, window), "{policy}");
        assert_eq!(p.budget.asked_bits, None, "{policy}");
        let w = (window as f64).min(ctx);
        let want = ((ctx - w) * (k + v) / 2.0 + w * 16.0) / ctx;
        assert!(
            (p.budget.achieved_bits - want).abs() < 1e-9,
            "{policy}: {} vs {want}",
            p.budget.achieved_bits
        );
        assert_eq!((p.default_k_bits, p.default_v_bits), (bits, bits));
    }
}

#[test]
fn dp_and_both_ilps_reach_the_same_optimum() {
    let (dir, calib) = calib_dir();
    let mut objectives = Vec::new();
    for budget in ["4.0", "4.6"] {
        for solver in ["ilp", "ilp-full", "dp"] {
            let out = dir.path().join(format!("{solver}-{budget}.json"));
            ok(&allocate(
                &calib,
                &out,
                &["--budget", budget, "--solver", solver],
            ));
            let p = Profile::read(&out).unwrap();
            objectives.push((budget, solver, p.provenance.objective.unwrap()));
        }
    }
    for w in objectives.chunks(3) {
        for (b, s, o) in w {
            let r = w[0].2;
            assert!((o - r).abs() <= 1e-9 * r, "budget {b}: {s} {o} vs ilp {r}");
        }
    }
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let (dir, calib) = calib_dir();
    let out = dir.path().join("p.json");
    let run = |args: &[&str]| failed(&allocate(&calib, &out, args));
    let e = run(&["--budget", "4", "--bits", "2,8"]);
    assert!(
        e.contains("no rows at [8] bits") && e.contains("--bits"),
        "{e}"
    );
    let e = run(&["--budget", "4", "--bits", "2,3"]);
    assert!(e.contains("bit width 3"), "{e}");
    let e = run(&[]);
    assert!(e.contains("give --budget"), "{e}");
    let e = run(&["--budget", "4x"]);
    assert!(e.contains("unknown unit"), "{e}");
    // A table made for another model.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    fixture_table("0000").write(&other).unwrap();
    let e = failed(&allocate(&other, &out, &["--budget", "4"]));
    assert!(e.contains("calibrated on tiny-llama (sha256 0000)"), "{e}");
    // A corrupt CSV names the line and the column.
    let csv = calib.join("sensitivity.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, text.replacen(",observation,", ",observer,", 1)).unwrap();
    let e = failed(&allocate(&csv, &out, &["--budget", "4"]));
    assert!(
        e.contains("sensitivity.csv") && e.contains("`role`") && e.contains("observer"),
        "{e}"
    );
    let e = failed(&allocate(
        &dir.path().join("nope"),
        &out,
        &["--budget", "4"],
    ));
    assert!(e.contains("nope"), "{e}");
    assert!(!out.exists());
}

#[test]
fn value_weight_moves_bits_to_values_and_is_recorded() {
    let (dir, calib) = calib_dir();
    // Summed bits of the value items at a budget between the floor and all-INT4.
    let value_bits = |w: &str| {
        let out = dir.path().join(format!("vw-{w}.json"));
        ok(&allocate(
            &calib,
            &out,
            &["--budget", "4.6", "--value-weight", w],
        ));
        let p = Profile::read(&out).unwrap();
        let v: u32 = p
            .assignments
            .iter()
            .filter(|a| a.kv.as_str() == "v")
            .map(|a| a.bits as u32)
            .sum();
        (v, p.provenance.value_weight)
    };
    let (plain, recorded_plain) = value_bits("1");
    let (heavy, recorded_heavy) = value_bits("50");
    let (light, _) = value_bits("0.02");
    assert!(heavy > plain, "weight 50: {heavy} value bits vs {plain}");
    assert!(light < plain, "weight 0.02: {light} value bits vs {plain}");
    assert_eq!(recorded_plain, None);
    assert_eq!(recorded_heavy, Some(50.0));
    let err = failed(&allocate(
        &calib,
        &dir.path().join("bad.json"),
        &["--budget", "4.6", "--value-weight", "0"],
    ));
    assert!(err.contains("--value-weight"), "{err}");
}

#[test]
fn sinks_and_window_flags_set_the_cache_and_the_floor() {
    let (dir, calib) = calib_dir();
    let out = dir.path().join("w0.json");
    // Without a window the all-INT2 floor drops to what the sinks alone cost.
    let e = failed(&allocate(
        &calib,
        &out,
        &["--budget", "2.0", "--policy", "tag-only", "--window", "0"],
    ));
    let floor = format!("{:.4}", floor_bits_protecting(SINKS));
    assert!(e.contains(&floor), "{e} (floor {floor})");
    let at = format!("{}", floor_bits_protecting(SINKS) + 1e-9);
    let stdout = ok(&allocate(
        &calib,
        &out,
        &["--budget", &at, "--policy", "tag-only", "--window", "0"],
    ));
    assert!(stdout.contains("estimate"), "{stdout}");
    let p = Profile::read(&out).unwrap();
    assert_eq!((p.cache.sinks, p.cache.window), (SINKS, 0));
    assert!(p.assignments.iter().all(|a| a.bits == 2));
    // A fixed baseline takes them too: uniform INT2 with sinks and a window.
    let out = dir.path().join("int2-w.json");
    ok(&allocate(
        &calib,
        &out,
        &["--policy", "uniform-int2", "--sinks", "2", "--window", "7"],
    ));
    let p = Profile::read(&out).unwrap();
    assert_eq!((p.cache.sinks, p.cache.window), (2, 7));
    let want = floor_bits_protecting(9);
    assert!(
        (p.budget.achieved_bits - want).abs() < 1e-9,
        "{}",
        p.budget.achieved_bits
    );
}

/// `--hold-fp8` charges the sinks and window at 8 bits (the floor drops by what that saves),
/// records it in the profile, and the CPU cache the profile builds holds them in FP8.
#[test]
fn hold_fp8_charges_sinks_and_window_at_8_bits() {
    let (dir, calib) = calib_dir();
    let out = dir.path().join("hold.json");
    let e = failed(&allocate(
        &calib,
        &out,
        &["--budget", "2.0", "--policy", "tag-only", "--hold-fp8"],
    ));
    let floor = floor_bits_protecting_at(SINKS + WINDOW, 8.0);
    assert!(floor < floor_bits_protecting(SINKS + WINDOW));
    assert!(
        e.contains(&format!("{floor:.4}")) && e.contains("at 8"),
        "{e}"
    );
    let at = format!("{}", floor + 1e-9);
    ok(&allocate(
        &calib,
        &out,
        &["--budget", &at, "--policy", "tag-only", "--hold-fp8"],
    ));
    let p = Profile::read(&out).unwrap();
    assert!(p.cache.hold_fp8);
    assert!(p.assignments.iter().all(|a| a.bits == 2));
    assert!((p.budget.achieved_bits - floor).abs() < 1e-9);
    let cfg = p.cache.cache_config();
    assert!(cfg.wait_fp8 && cfg.sinks_fp8 && cfg.window_fp8, "{cfg:?}");
    // Without the flag the field is left out of the file.
    let plain = dir.path().join("plain.json");
    ok(&allocate(&calib, &plain, &["--budget", "4.0"]));
    let text = std::fs::read_to_string(&plain).unwrap();
    assert!(!text.contains("hold_fp8"));
    assert!(!Profile::read(&plain).unwrap().cache.hold_fp8);
}

/// `--layer-bands N` relaxes tag-only to one bit width per tag in each band of layers (K and
/// V alike inside a band): never a higher objective, and refused where it means nothing.
#[test]
fn layer_bands_relax_tag_only_per_band() {
    let (dir, calib) = calib_dir();
    let run = |extra: &[&str]| -> Profile {
        let out = dir.path().join("bands.json");
        let mut args = vec!["--budget", "4.2", "--policy", "tag-only"];
        args.extend_from_slice(extra);
        ok(&allocate(&calib, &out, &args));
        Profile::read(&out).unwrap()
    };
    let one = run(&[]);
    let two = run(&["--layer-bands", "2"]);
    let (o1, o2) = (
        one.provenance.objective.unwrap(),
        two.provenance.objective.unwrap(),
    );
    assert!(o2 <= o1 * (1.0 + 1e-12), "2 bands {o2} > 1 band {o1}");
    assert!(two.budget.achieved_bits <= 4.2 + 1e-9);
    // One band is plain tag-only; two bands on the 2-layer fixture are one per layer, where a
    // tag's K and V still share the bits.
    assert_eq!(run(&["--layer-bands", "1"]).assignments, one.assignments);
    for a in &two.assignments {
        for b in &two.assignments {
            if a.layer == b.layer && a.tag() == b.tag() {
                assert_eq!(a.bits, b.bits, "{a:?} vs {b:?}");
            }
        }
    }
    let out = dir.path().join("refused.json");
    for args in [
        &[
            "--budget",
            "4.2",
            "--policy",
            "tag-only",
            "--layer-bands",
            "3",
        ][..],
        &[
            "--budget",
            "4.2",
            "--policy",
            "tag-only",
            "--layer-bands",
            "0",
        ][..],
        &[
            "--budget",
            "4.2",
            "--policy",
            "triaxial",
            "--layer-bands",
            "2",
        ][..],
    ] {
        let e = failed(&allocate(&calib, &out, args));
        assert!(e.contains("--layer-bands") && e.contains("2 layers"), "{e}");
    }
    assert!(!out.exists());
}

#[test]
fn layer_band_splits_layers_into_contiguous_bands() {
    use triaxkv::allocate::policy::layer_band;
    let bands: Vec<usize> = (0..30).map(|l| layer_band(l, 3, 30)).collect();
    assert_eq!(&bands[..10], &[0; 10]);
    assert_eq!(&bands[10..20], &[1; 10]);
    assert_eq!(&bands[20..], &[2; 10]);
    assert_eq!(
        (0..7).map(|l| layer_band(l, 2, 7)).collect::<Vec<_>>(),
        [0, 0, 0, 0, 1, 1, 1]
    );
    assert!((0..5).all(|l| layer_band(l, 1, 5) == 0));
}

/// `--key-outliers F` charges each quantized key element 32 F bits (an fp16 value and a
/// 16-bit index per kept element), records F in the profile, and the CPU cache the profile
/// builds keeps them; out-of-range fractions are refused.
#[test]
fn key_outliers_are_charged_to_the_keys_and_recorded() {
    let (dir, calib) = calib_dir();
    let out = dir.path().join("ko.json");
    ok(&allocate(&calib, &out, &["--policy", "uniform-int2"]));
    let plain = Profile::read(&out).unwrap();
    assert_eq!(plain.cache.key_outliers, 0.0);
    // Old readers see no new field in a profile without outliers.
    assert!(!std::fs::read_to_string(&out)
        .unwrap()
        .contains("key_outliers"));
    ok(&allocate(
        &calib,
        &out,
        &["--policy", "uniform-int2", "--key-outliers", "0.01"],
    ));
    let p = Profile::read(&out).unwrap();
    assert_eq!(p.cache.key_outliers, 0.01);
    assert!((p.cache.cache_config().key_outliers - 0.01).abs() < 1e-9);
    // No sinks or window under uniform INT2: every key pays 0.32 bits, K and V averaged.
    let d = p.budget.achieved_bits - plain.budget.achieved_bits;
    assert!((d - 0.16).abs() < 1e-9, "{d}");
    for bad in ["--key-outliers=0.5", "--key-outliers=-0.1"] {
        let e = failed(&allocate(
            &calib,
            &dir.path().join("bad.json"),
            &["--policy", "uniform-int2", bad],
        ));
        assert!(e.contains("--key-outliers"), "{e}");
    }
    // A table calibrated with outliers (`calibrate --key-outliers 0.01`) measured its keys
    // with them: the profile keeps them without the flag, charged alike.
    let sha = triaxkv::model::load::inspect(Some(&tiny_model()))
        .unwrap()
        .sha256;
    let mut t = fixture_table(&sha);
    t.provenance.quantizer =
        "k=per_channel/g64 v=per_token/g16 scale+zero=fp16 k_outliers=0.01".into();
    let calib_ko = dir.path().join("calib-ko");
    std::fs::create_dir_all(&calib_ko).unwrap();
    t.write(&calib_ko).unwrap();
    let o = allocate(&calib_ko, &out, &["--policy", "uniform-int2"]);
    let said = ok(&o) + &String::from_utf8_lossy(&o.stderr);
    let q = Profile::read(&out).unwrap();
    assert_eq!(q.cache.key_outliers, 0.01);
    assert!(!q.cache.key_outliers_pooled);
    assert_eq!(q.budget.achieved_bits, p.budget.achieved_bits);
    assert!(said.contains("measured with them"), "{said}");
    // Pooled over a group's KV heads: from the flag or from a table calibrated so, recorded
    // and applied by the cache the profile builds; the flag alone pools nothing.
    ok(&allocate(
        &calib,
        &out,
        &[
            "--policy",
            "uniform-int2",
            "--key-outliers",
            "0.01",
            "--key-outliers-pooled",
        ],
    ));
    let r = Profile::read(&out).unwrap();
    assert!(r.cache.key_outliers_pooled && r.cache.cache_config().key_outliers_pooled);
    assert_eq!(r.budget.achieved_bits, p.budget.achieved_bits);
    t.provenance.quantizer =
        "k=per_channel/g64 v=per_token/g16 scale+zero=fp16 k_outliers=0.01/pooled".into();
    t.write(&calib_ko).unwrap();
    let o = allocate(&calib_ko, &out, &["--policy", "uniform-int2"]);
    let said = ok(&o) + &String::from_utf8_lossy(&o.stderr);
    assert!(Profile::read(&out).unwrap().cache.key_outliers_pooled);
    assert!(said.contains("measured with them"), "{said}");
    let e = failed(&allocate(
        &calib,
        &dir.path().join("bad.json"),
        &["--policy", "uniform-int2", "--key-outliers-pooled"],
    ));
    assert!(e.contains("--key-outliers-pooled"), "{e}");
}
