//! `triaxkv bench serve-workload` on the bundled traces (the tokenizer of the default model;
//! skipped with a message when it has not been fetched): sessions follow the recorded turns,
//! and bad input to `bench serve` is refused before any GPU work.

mod common;

use std::path::Path;
use std::process::Command;
use triaxkv::paged::workload::Workload;
use triaxkv::tags::Role;

use common::default_model as model;

/// `bench serve-workload` of `traces` into `dir/w.json`.
fn workload(dir: &Path, traces: &Path) -> std::path::PathBuf {
    let w = dir.join("w.json");
    let o = triaxkv(&[
        "bench",
        "serve-workload",
        "--traces",
        traces.to_str().unwrap(),
        "-o",
        w.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    w
}

fn triaxkv(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_triaxkv"))
        .args(args)
        .output()
        .expect("the triaxkv binary runs")
}

#[test]
fn workload_sessions_follow_the_recorded_turns() {
    if model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.json");
    let traces = Path::new(env!("CARGO_MANIFEST_DIR")).join("traces/test");
    let o = triaxkv(&[
        "bench",
        "serve-workload",
        "--traces",
        traces.to_str().unwrap(),
        "--max-context",
        "8192",
        "--max-gen",
        "64",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = Workload::read(&out).unwrap();
    assert!(w.sessions.len() >= 5, "{} sessions", w.sessions.len());
    let assistant = [
        Role::Assistant,
        Role::Reasoning,
        Role::ToolCall,
        Role::Template,
    ];
    for s in &w.sessions {
        assert!(s.len() <= 8192);
        let mut prev_step = 0;
        for t in &s.turns {
            assert!(t.gen >= 1 && t.gen <= 64);
            // A reply starts a new agent step with an assistant-side token, after a prompt.
            let tag = s.tags(t.start..t.start + 1)[0];
            assert!(assistant.contains(&tag.role), "{:?}", tag.role);
            assert!(
                tag.step > prev_step,
                "steps {} then {}",
                prev_step,
                tag.step
            );
            prev_step = tag.step;
        }
        let last = s.turns[s.turns.len() - 1];
        assert_eq!(
            last.start + last.gen,
            s.len(),
            "sessions end with their last reply"
        );
    }
}

#[test]
fn bench_serve_refuses_bad_input_before_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        "{\"schema\": \"triaxkv.serve-workload/v1\", \"sessions\": 3}",
    )
    .unwrap();
    let o = triaxkv(&["bench", "serve", "--workload", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.json") && err.contains("not a serve workload"),
        "{err}"
    );
    let missing = dir.path().join("missing.json");
    let o = triaxkv(&["bench", "serve", "--workload", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.json"));
    let o = triaxkv(&[
        "bench",
        "serve",
        "--workload",
        bad.to_str().unwrap(),
        "--warmup",
        "100",
        "--duration",
        "10",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--warmup must be below --duration"));
    // `bench serve --workload bad.json ARGS` fails before the workload is read: the stderr.
    let refused = |args: &[&str]| -> String {
        let mut all = vec!["bench", "serve", "--workload", bad.to_str().unwrap()];
        all.extend_from_slice(args);
        let o = triaxkv(&all);
        assert!(!o.status.success(), "{args:?} ran");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!err.contains("not a serve workload"), "{args:?}: {err}");
        err
    };
    let err = refused(&["--caches", "int2", "--v-group", "48"]);
    assert!(
        err.contains("value group 48") && err.contains("--v-group"),
        "{err}"
    );
    let err = refused(&["--caches", "int2", "--k-group", "32"]);
    assert!(
        err.contains("key group 32") && err.contains("--k-group"),
        "{err}"
    );
    // Profiles allocated for different value groups need --v-group to share one run.
    let vg32 = dir.path().join("vg32.json");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut p: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("profiles/tag-only-2.8.json")).unwrap(),
    )
    .unwrap();
    p["cache"]["value_group"] = 32.into();
    std::fs::write(&vg32, p.to_string()).unwrap();
    let two = format!(
        "{},{}",
        root.join("profiles/tag-only-2.8.json").display(),
        vg32.display()
    );
    let err = refused(&["--caches", "profile", "--profile", &two]);
    assert!(
        err.contains("[64, 32]") && err.contains("--v-group"),
        "{err}"
    );
    // The profile cache reads --profile before anything else is loaded.
    let err = refused(&[
        "--caches",
        "bf16,profile",
        "--profile",
        missing.to_str().unwrap(),
    ]);
    assert!(err.contains("missing.json"), "{err}");
}

/// `bench serve --host-check`: the whole scheduler on recorded sessions without a GPU, every
/// device request checked; the pool is whole at the end and the mixed cache holds more
/// sessions than the 16-bit one in the same memory.
#[test]
fn host_check_serves_recorded_sessions() {
    if model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("serve.json");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let profile = format!(
        "{},{}",
        root.join("profiles/triaxial-2.97.json").display(),
        root.join("profiles/tag-only-2.55-w0.json").display()
    );
    let w = workload(dir.path(), &root.join("traces/test"));
    let o = triaxkv(&[
        "bench",
        "serve",
        "--workload",
        w.to_str().unwrap(),
        "--host-check",
        "600",
        "--kv-memory",
        "1GiB",
        "--clients",
        "32",
        "--caches",
        "bf16,profile",
        "--profile",
        &profile,
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["cache"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["bf16", "profile triaxial-2.97", "profile tag-only-2.55-w0"]
    );
    for r in rows {
        assert_eq!(r["leaked_slots"], 0, "{r}");
        assert!(r["turns_completed"].as_u64().unwrap() > 0, "{r}");
    }
    let mean = |i: usize| rows[i]["mean_sessions"].as_f64().unwrap();
    assert!(
        mean(1) > 3.0 * mean(0),
        "profile {} vs bf16 {}",
        mean(1),
        mean(0)
    );
    let bits = |i: usize| rows[i]["effective_bits"].as_f64().unwrap();
    assert!(bits(1) > 2.0 && bits(1) < 4.0, "{}", bits(1));
    // No 16-bit window, nearly every tag at INT2: fewer bits than the triaxial profile's.
    assert!(bits(2) < bits(1), "{} vs {}", bits(2), bits(1));
}

/// `bench serve-plot` draws every cache's timeline of several `--json` files (one polyline
/// and legend entry per cache) and refuses files without a timeline, naming the file.
#[test]
fn serve_plot_draws_each_cache_and_names_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let row = |cache: &str, rates: &[f64]| {
        let timeline: Vec<serde_json::Value> = rates
            .iter()
            .enumerate()
            .map(|(i, r)| {
                serde_json::json!({"t_s": 10.0 * (i + 1) as f64, "resident": 3 + i,
                    "decode_tokens_per_s": r, "prefill_tokens_per_s": 100.0,
                    "mean_decode_batch": 2.0})
            })
            .collect();
        let mut v =
            serde_json::to_value(triaxkv::gpu::serve_bench::ServeBenchRow::default()).unwrap();
        v["cache"] = cache.into();
        v["timeline"] = timeline.into();
        v
    };
    let write = |name: &str, rows: Vec<serde_json::Value>| {
        let p = dir.path().join(name);
        let j = serde_json::json!({"setup": "test run", "rows": rows});
        std::fs::write(&p, j.to_string()).unwrap();
        p.to_str().unwrap().to_string()
    };
    let a = write("a.json", vec![row("bf16", &[100.0, 200.0, 300.0])]);
    let b = write("b.json", vec![row("profile x", &[150.0, 900.0])]);
    let out = dir.path().join("plots");
    let o = triaxkv(&["bench", "serve-plot", &a, &b, "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svg = std::fs::read_to_string(out.join("timeline-decode.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert!(svg.contains(">bf16<") && svg.contains(">profile x<"));
    for f in [
        "timeline-decode.png",
        "timeline-sessions.svg",
        "timeline-sessions.png",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // The same cache from two runs: the legend names each run (the files' stems here).
    let c = write("c.json", vec![row("bf16", &[50.0, 60.0])]);
    let o = triaxkv(&["bench", "serve-plot", &a, &c, "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svg = std::fs::read_to_string(out.join("timeline-decode.svg")).unwrap();
    assert!(
        svg.contains(">bf16 (a)<") && svg.contains(">bf16 (c)<"),
        "{svg}"
    );
    let empty = write("empty.json", vec![row("fp8", &[])]);
    let o = triaxkv(&["bench", "serve-plot", &empty, "-o", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("empty.json") && err.contains("fp8"),
        "{err}"
    );
}

/// The GPU kernels hold no key outliers yet: `bench serve` refuses a profile that keeps them
/// for a GPU run (naming it), while `--host-check` sizes their area into every INT4/INT2 slab:
/// more stored bits and no more sessions than the same profile without them.
#[test]
fn key_outliers_are_sized_by_the_host_check_and_refused_on_the_gpu() {
    if model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let plain = root.join("profiles/tag-only-2.57-w32-fp8.json");
    let mut p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plain).unwrap()).unwrap();
    p["cache"]["key_outliers"] = 0.005.into();
    p["name"] = "with-outliers".into();
    let profile = dir.path().join("p.json");
    std::fs::write(&profile, p.to_string()).unwrap();
    let w = workload(dir.path(), &root.join("traces/test"));
    let both = format!("{},{}", plain.display(), profile.display());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "serve",
            "--workload",
            w.to_str().unwrap(),
            "--kv-memory",
            "1GiB",
            "--clients",
            "32",
            "--caches",
            "profile",
            "--profile",
            &both,
        ];
        args.extend_from_slice(extra);
        triaxkv(&args)
    };
    let o = run(&[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("with-outliers") && err.contains("key outliers"),
        "{err}"
    );
    let json = dir.path().join("serve.json");
    let o = run(&["--host-check", "400", "--json", json.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let (a, b) = (&rows[0], &rows[1]);
    assert_eq!(b["cache"], "profile with-outliers");
    assert_eq!(
        (a["leaked_slots"].as_u64(), b["leaked_slots"].as_u64()),
        (Some(0), Some(0))
    );
    let bits = |r: &serde_json::Value| r["effective_bits"].as_f64().unwrap();
    assert!(bits(b) > bits(a) + 0.03, "{} vs {}", bits(b), bits(a));
    let mean = |r: &serde_json::Value| r["mean_sessions"].as_f64().unwrap();
    assert!(mean(b) <= mean(a), "{} vs {}", mean(b), mean(a));
}
