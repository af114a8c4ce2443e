//! The calibration run: render and replay each trajectory, measure every (layer, K|V, tag,
//! bits), cache per-trajectory results, then write the table, summary and heatmap.

use super::capture::{pick_positions, replay_from, reusable_prefix, Capture};
use super::distortion::{
    column_counts, layer_distortion, quantize_layer, Protected, QuantizedLayer,
};
use super::table::{Provenance, SensitivityTable, TrajectoryResult};
use super::{plot, summary, CalibrateError, QuantizerSettings};
use crate::kvcache::KvCache;
use crate::model::llama::DEFAULT_PREFILL_CHUNK;
use crate::model::load::LoadedModel;
use crate::quant::Bits;
use crate::tags::RecencyUnit;
use crate::trace::read::TraceFile;
use crate::trace::render::render;
use crate::trace::template::ChatTemplate;
use crate::util::write_atomic;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    pub out_dir: PathBuf,
    /// Replay at most this many tokens of a trajectory (also capped by the model context).
    pub max_tokens: Option<usize>,
    /// Decode positions measured per trajectory, spread evenly over the assistant tokens.
    pub max_queries: usize,
    pub bits: Vec<u8>,
    pub unit: RecencyUnit,
    pub quantizer: QuantizerSettings,
    pub protected: Protected,
    pub chunk: usize,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        CalibrateOptions {
            out_dir: PathBuf::from("calib"),
            max_tokens: None,
            max_queries: 96,
            bits: vec![2, 4],
            unit: RecencyUnit::Turn,
            quantizer: QuantizerSettings::default(),
            protected: Protected::default(),
            chunk: DEFAULT_PREFILL_CHUNK,
            progress: false,
        }
    }
}

#[derive(Debug)]
pub struct CalibrateReport {
    pub table: SensitivityTable,
    pub results: Vec<TrajectoryResult>,
    /// Trajectories whose result came from `DIR/cache/`.
    pub cached: usize,
    pub wall_s: f64,
    /// Tokens replayed in this run (cached trajectories excluded).
    pub replayed_tokens: usize,
    pub replay_s: f64,
    /// Human-readable notes (truncations, skipped trajectories).
    pub notes: Vec<String>,
}

impl CalibrateReport {
    /// Replay throughput of this run (tokens per second of replay time).
    pub fn tokens_per_s(&self) -> f64 {
        if self.replay_s > 0.0 {
            self.replayed_tokens as f64 / self.replay_s
        } else {
            0.0
        }
    }
}

/// The sha256 of every image file a trajectory names (relative to `file`'s folder), in order:
/// a changed image under the same path must not reuse a cached result. A file that cannot be
/// read hashes as its error, so the key still changes when it appears.
fn image_digest(file: &Path, traj: &crate::trace::Trajectory) -> String {
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut h = Sha256::new();
    for m in &traj.messages {
        for part in &m.content {
            if let crate::trace::Part::Image { path: Some(p), .. } = part {
                h.update(p.as_bytes());
                match std::fs::read(dir.join(p)) {
                    Ok(bytes) => h.update(Sha256::digest(&bytes)),
                    Err(e) => h.update(e.to_string().as_bytes()),
                }
            }
        }
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unit_name(u: RecencyUnit) -> &'static str {
    match u {
        RecencyUnit::Turn => "turn",
        RecencyUnit::Step => "step",
    }
}

fn bar(mp: &MultiProgress, len: u64, template: &str) -> ProgressBar {
    let pb = mp.add(ProgressBar::new(len));
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// What both calibration entry points check and derive from their inputs first.
struct Inputs<'a> {
    trajs: Vec<(&'a Path, &'a crate::trace::Trajectory)>,
    bits: Vec<Bits>,
    /// The model's context length.
    context: usize,
    /// Tokens replayed per trajectory: `--max-tokens`, never past the model's context.
    limit: usize,
    template: ChatTemplate,
}

fn check_inputs<'a>(
    model: &LoadedModel,
    files: &'a [TraceFile],
    opts: &CalibrateOptions,
) -> Result<Inputs<'a>, CalibrateError> {
    let trajs: Vec<(&Path, &crate::trace::Trajectory)> = files
        .iter()
        .flat_map(|f| f.trajectories.iter().map(move |t| (f.path.as_path(), t)))
        .collect();
    if trajs.is_empty() {
        return Err(CalibrateError::NoTrajectories);
    }
    let bits: Vec<Bits> = opts
        .bits
        .iter()
        .map(|&b| Bits::from_u32(b as u32))
        .collect::<Result<_, _>>()?;
    if bits.is_empty() {
        return Err(CalibrateError::Option("--bits is empty".into()));
    }
    let context = model.model.config.max_position_embeddings.max(1);
    let limit = opts.max_tokens.map_or(context, |m| m.min(context));
    let template = ChatTemplate::for_tokenizer(&model.tokenizer)
        .map_err(|e| CalibrateError::Option(format!("chat template of {}: {e}", model.name)))?;
    Ok(Inputs {
        trajs,
        bits,
        context,
        limit,
        template,
    })
}

/// Calibrate `model` on every trajectory of `files` and write the outputs into
/// `opts.out_dir`.
pub fn calibrate(
    model: &LoadedModel,
    files: &[TraceFile],
    opts: &CalibrateOptions,
) -> Result<CalibrateReport, CalibrateError> {
    let t0 = Instant::now();
    let Inputs {
        trajs,
        bits,
        context,
        limit,
        template,
    } = check_inputs(model, files, opts)?;

    // Everything that changes a trajectory's numbers goes into its cache key.
    let settings = format!(
        "model={} q={} unit={} bits={:?} limit={limit} queries={} sinks={} window={} v1",
        model.sha256,
        opts.quantizer,
        unit_name(opts.unit),
        opts.bits,
        opts.max_queries,
        opts.protected.sinks,
        opts.protected.window
    );
    let cache_dir = opts.out_dir.join("cache");
    let mut traces_hasher = Sha256::new();

    let mp = MultiProgress::with_draw_target(if opts.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let traj_bar = bar(
        &mp,
        trajs.len() as u64,
        "trajectories [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
    );
    let pass_bar = bar(&mp, 1, "  {prefix:8} [{bar:30}] {pos}/{len} {msg}");

    // First pass, in input order: cached results, and the rendered trajectories to measure.
    let mut slots: Vec<Option<TrajectoryResult>> = Vec::new();
    let mut todo: Vec<Todo> = Vec::new();
    let mut notes = Vec::new();
    let (mut cached, mut replayed_tokens, mut reused_tokens, mut replay_s) =
        (0, 0usize, 0usize, 0.0f64);
    for (file, traj) in trajs {
        let json =
            serde_json::to_string(traj).map_err(|e| CalibrateError::Option(e.to_string()))?;
        traces_hasher.update(json.as_bytes());
        let images = image_digest(file, traj);
        traces_hasher.update(images.as_bytes());
        let key = hex(&Sha256::digest(
            format!("{settings}\n{json}\n{images}").as_bytes(),
        ));
        let cache_path = cache_dir.join(format!("{key}.json"));
        if let Some(r) = read_cached(&cache_path) {
            if r.truncated {
                notes.push(format!(
                    "{} ({}): truncated from {} to {} tokens (cached)",
                    r.id, r.file, r.rendered_tokens, r.tokens
                ));
            }
            slots.push(Some(r));
            cached += 1;
            traj_bar.inc(1);
            continue;
        }
        match prepare(
            model, &template, file, traj, limit, opts, context, &mut notes,
        )? {
            Some(prep) => todo.push(Todo {
                slot: slots.len(),
                file,
                traj,
                cache_path,
                prep,
            }),
            None => traj_bar.inc(1),
        }
        slots.push(None);
    }

    // Measure in token order: trajectories that start alike (one system prompt and tool
    // schema) become neighbours, and each one reuses the K/V of the prefix it shares with
    // the one before it instead of replaying it (DESIGN §6: the replay is the cost).
    todo.sort_by(|a, b| (&a.prep.ids, a.slot).cmp(&(&b.prep.ids, b.slot)));
    let shape = model.model.kv_shape();
    let mut prev: Option<(usize, Capture)> = None;
    for (ti, item) in todo.iter().enumerate() {
        let Todo {
            file,
            traj,
            prep,
            cache_path,
            ..
        } = item;
        traj_bar.set_message(traj.id.clone());
        let terr = |msg: String| CalibrateError::Trajectory {
            id: traj.id.clone(),
            file: file.to_path_buf(),
            msg,
        };
        let (ids, tags) = (&prep.ids[..], &prep.tags[..]);
        // Replay only up to the last measured position: later tokens cannot affect it.
        let upto = prep.positions.last().map_or(ids.len(), |&p| p + 1);
        let first = prep.positions.first().copied().unwrap_or(0);
        let prefix = prev.take().and_then(|(pi, mut cap)| {
            let p = &todo[pi].prep;
            // Image tokens share ids whatever the image: no reuse across trajectories with media.
            if p.media.is_some() || prep.media.is_some() {
                return None;
            }
            let pn = cap.full.len(0);
            let n = reusable_prefix(
                (&ids[..upto], &tags[..upto]),
                (&p.ids[..pn], &p.tags[..pn]),
                first,
                opts.chunk,
            );
            (n > 0).then(|| {
                cap.full.truncate(n);
                cap.full
            })
        });
        let reused = prefix.as_ref().map_or(0, |f| f.len(0));
        pass_bar.set_prefix("replay");
        pass_bar.set_length(upto as u64);
        pass_bar.set_position(reused as u64);
        let tr = Instant::now();
        let cap = replay_from(
            &model.model,
            &ids[..upto],
            &tags[..upto],
            prep.media.as_ref(),
            prep.positions.clone(),
            opts.chunk,
            prefix,
            &mut |d| pass_bar.set_position(d as u64),
        );
        let rs = tr.elapsed().as_secs_f64();
        replay_s += rs;
        replayed_tokens += upto - reused;
        reused_tokens += reused;

        let tm = Instant::now();
        pass_bar.set_prefix("measure");
        pass_bar.set_length(shape.num_layers as u64);
        pass_bar.set_position(0);
        let tags_u = &tags[..upto];
        let layers = (0..shape.num_layers)
            .into_par_iter()
            .map(|l| {
                let (k, v) = (cap.full.keys(l), cap.full.values(l));
                let variants = bits
                    .iter()
                    .map(|&b| {
                        quantize_layer(
                            shape,
                            k,
                            v,
                            tags_u,
                            opts.unit,
                            opts.protected.sinks,
                            b,
                            &opts.quantizer,
                            false,
                        )
                    })
                    .collect::<Result<Vec<QuantizedLayer>, _>>()?;
                let d = layer_distortion(
                    shape,
                    k,
                    v,
                    &cap.q[l],
                    &cap.positions,
                    tags_u,
                    opts.unit,
                    opts.protected,
                    &variants,
                );
                pass_bar.inc(1);
                Ok(d)
            })
            .collect::<Result<Vec<_>, CalibrateError>>()
            .map_err(|e| terr(e.to_string()))?;
        let result = TrajectoryResult {
            id: traj.id.clone(),
            file: file.display().to_string(),
            tokens: upto,
            rendered_tokens: prep.rendered_tokens,
            truncated: prep.truncated,
            queries: cap.positions.len(),
            bits: opts.bits.clone(),
            layers,
            columns: column_counts(tags_u, opts.unit, opts.protected, &cap.positions),
            replay_s: rs,
            measure_s: tm.elapsed().as_secs_f64(),
        };
        write_atomic(cache_path, |w| {
            serde_json::to_writer(w, &result).map_err(std::io::Error::other)
        })
        .map_err(|source| CalibrateError::Io {
            path: cache_path.clone(),
            source,
        })?;
        slots[item.slot] = Some(result);
        traj_bar.inc(1);
        prev = Some((ti, cap));
    }
    if reused_tokens > 0 {
        notes.push(format!(
            "{reused_tokens} tokens of prefixes shared between trajectories were replayed once and their K/V reused"
        ));
    }
    let results: Vec<TrajectoryResult> = slots.into_iter().flatten().collect();
    pass_bar.finish_and_clear();
    traj_bar.finish_and_clear();
    if results.is_empty() {
        return Err(CalibrateError::Option(
            "no trajectory had assistant tokens to measure".into(),
        ));
    }

    let provenance = Provenance {
        model: model.name.clone(),
        model_sha256: model.sha256.clone(),
        traces_hash: hex(&traces_hasher.finalize()),
        quantizer: opts.quantizer.to_string(),
        recency_unit: unit_name(opts.unit).into(),
        sinks: opts.protected.sinks,
        window: opts.protected.window,
    };
    let table = SensitivityTable::from_results(&results, provenance)?;
    let mut report = CalibrateReport {
        table,
        results,
        cached,
        wall_s: 0.0,
        replayed_tokens,
        replay_s,
        notes,
    };
    table_outputs(&report, &opts.out_dir)?;
    report.wall_s = t0.elapsed().as_secs_f64();
    let md = summary::render(&report);
    let path = opts.out_dir.join("summary.md");
    write_atomic(&path, |w| w.write_all(md.as_bytes())).map_err(|source| CalibrateError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(report)
}

fn table_outputs(report: &CalibrateReport, dir: &Path) -> Result<(), CalibrateError> {
    report.table.write(dir)?;
    plot::write_heatmaps(&report.table, dir)
}

/// A cached result, when present and readable (a damaged file is measured again).
fn read_cached(path: &Path) -> Option<TrajectoryResult> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A trajectory still to measure: where its result goes, and its rendering.
struct Todo<'a> {
    /// Index in input order.
    slot: usize,
    file: &'a Path,
    traj: &'a crate::trace::Trajectory,
    cache_path: PathBuf,
    prep: Prepared,
}

/// A rendered, truncated and checked trajectory with its measured positions.
struct Prepared {
    ids: Vec<u32>,
    tags: Vec<crate::tags::TokenTag>,
    /// A vision-language model's image inputs (feature rows, multimodal positions).
    media: Option<crate::model::llama::Media>,
    positions: Vec<usize>,
    rendered_tokens: usize,
    truncated: bool,
}

/// Render, truncate to `limit`, check ids against the model, pick decode positions. `None`
/// (with a note) when the trajectory has no assistant token to measure.
#[allow(clippy::too_many_arguments)]
fn prepare(
    model: &LoadedModel,
    template: &ChatTemplate,
    file: &Path,
    traj: &crate::trace::Trajectory,
    limit: usize,
    opts: &CalibrateOptions,
    context: usize,
    notes: &mut Vec<String>,
) -> Result<Option<Prepared>, CalibrateError> {
    let terr = |msg: String| CalibrateError::Trajectory {
        id: traj.id.clone(),
        file: file.to_path_buf(),
        msg,
    };
    let rendered = render(traj, template, &model.tokenizer, &model.render_options())
        .map_err(|e| terr(e.to_string()))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let media = model
        .media(&traj.messages, dir, &rendered.ids)
        .map_err(terr)?;
    let rendered_tokens = rendered.ids.len();
    let n = rendered_tokens.min(limit);
    let truncated = n < rendered_tokens;
    if truncated {
        notes.push(format!(
            "{} ({}): truncated from {rendered_tokens} to {n} tokens ({})",
            traj.id,
            file.display(),
            if opts.max_tokens.is_some_and(|m| m < context) {
                "--max-tokens"
            } else {
                "model context"
            }
        ));
    }
    model
        .model
        .check_tokens(&rendered.ids[..n])
        .map_err(|e| terr(format!("model/trace mismatch: {e}")))?;
    let bodies: Vec<_> = rendered
        .assistant_bodies()
        .filter(|r| r.start < n)
        .map(|r| r.start..r.end.min(n))
        .collect();
    let positions = pick_positions(&bodies, opts.max_queries);
    if positions.is_empty() {
        notes.push(format!(
            "{} ({}): no assistant tokens within {n} tokens; skipped",
            traj.id,
            file.display()
        ));
        return Ok(None);
    }
    Ok(Some(Prepared {
        ids: rendered.ids[..n].to_vec(),
        tags: rendered.tags[..n].to_vec(),
        media,
        positions,
        rendered_tokens,
        truncated,
    }))
}

/// The quantizer settings `--compare-quantizers` measures on a model of head dimension `hd`.
pub fn candidate_settings(hd: usize) -> Vec<QuantizerSettings> {
    use crate::quant::KeyMode;
    let mut out = Vec::new();
    for g in [32, 64, 128] {
        out.push(QuantizerSettings {
            key_mode: KeyMode::PerChannel,
            key_group: g,
            value_group: 64.min(hd),
            ..QuantizerSettings::default()
        });
    }
    for rotate in [false, true] {
        for g in [32, 64, 128] {
            if hd % g == 0 {
                out.push(QuantizerSettings {
                    key_mode: KeyMode::PerToken { rotate },
                    key_group: g,
                    value_group: g,
                    ..QuantizerSettings::default()
                });
            }
        }
    }
    out
}

/// One quantizer `--compare-quantizers` measures: `settings`, with per-channel keys
/// quantized before RoPE (`pre_rope`: un-rotated from the cache, quantized, rotated back, as
/// KVQuant does) or after it, as the cache stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub settings: QuantizerSettings,
    pub pre_rope: bool,
    /// Group ranges by least squared error instead of min/max (`fake_quantize_clipped`).
    pub clip: bool,
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.settings.to_string();
        if self.pre_rope {
            text = text.replacen("per_channel", "per_channel_pre_rope", 1);
        }
        if self.clip {
            text = text.replace("scale+zero=fp16", "scale+zero=fp16,mse-clip");
        }
        write!(f, "{text}")
    }
}

/// [`candidate_settings`], then the per-channel ones with least-squares group ranges, then
/// (when the model's RoPE is plain, not multimodal) with keys before RoPE.
pub fn candidates(hd: usize, plain_rope: bool) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = candidate_settings(hd)
        .into_iter()
        .map(|settings| Candidate {
            settings,
            pre_rope: false,
            clip: false,
        })
        .collect();
    let per_channel: Vec<Candidate> = out
        .iter()
        .filter(|c| c.settings.key_mode == crate::quant::KeyMode::PerChannel)
        .copied()
        .collect();
    out.extend(per_channel.iter().map(|c| Candidate { clip: true, ..*c }));
    if plain_rope {
        out.extend(per_channel.iter().map(|c| Candidate {
            pre_rope: true,
            ..*c
        }));
    }
    out
}

/// Replay each trajectory once and measure every candidate quantizer: per (settings, bits,
/// K|V) the token-weighted mean distortion over tags, averaged over layers and trajectories.
/// Writes `DIR/quantizer_comparison.md` and returns its text.
pub fn compare_quantizers(
    model: &LoadedModel,
    files: &[TraceFile],
    opts: &CalibrateOptions,
) -> Result<String, CalibrateError> {
    let t0 = Instant::now();
    let Inputs {
        trajs,
        bits,
        context,
        limit,
        template,
    } = check_inputs(model, files, opts)?;
    let shape = model.model.kv_shape();
    let config = &model.model.config;
    let plain_rope = !matches!(
        config.rope_scaling,
        crate::model::config::RopeScaling::MRope { .. }
    );
    let cands = candidates(shape.head_dim, plain_rope);
    // [cand][bits][kv] -> per-trajectory scores
    let mut scores = vec![vec![[Vec::new(), Vec::new()]; bits.len()]; cands.len()];
    let mut notes = Vec::new();
    let mut tokens = 0;
    for (file, traj) in trajs {
        let Some(p) = prepare(
            model, &template, file, traj, limit, opts, context, &mut notes,
        )?
        else {
            continue;
        };
        let upto = p.positions.last().map_or(p.ids.len(), |&x| x + 1);
        tokens += upto;
        let cap = replay_from(
            &model.model,
            &p.ids[..upto],
            &p.tags[..upto],
            p.media.as_ref(),
            p.positions,
            opts.chunk,
            None,
            &mut |_| {},
        );
        let tags = &p.tags[..upto];
        let cols = column_counts(tags, opts.unit, opts.protected, &cap.positions);
        for (ci, cand) in cands.iter().enumerate() {
            if cand.pre_rope && p.media.is_some() {
                // Image tokens' positions are not their index: RoPE cannot be undone by index.
                notes.push(format!(
                    "{} ({}): {cand} skipped (image positions)",
                    traj.id,
                    file.display()
                ));
                continue;
            }
            let per_layer = (0..shape.num_layers)
                .into_par_iter()
                .map(|l| {
                    let (k, v) = (cap.full.keys(l), cap.full.values(l));
                    let pre;
                    let kq: &[f32] = if cand.pre_rope {
                        let mut x = k.to_vec();
                        crate::model::llama::rope_rows(config, &mut x, 0, true);
                        pre = x;
                        &pre
                    } else {
                        k
                    };
                    let mut variants = bits
                        .iter()
                        .map(|&b| {
                            quantize_layer(
                                shape,
                                kq,
                                v,
                                tags,
                                opts.unit,
                                opts.protected.sinks,
                                b,
                                &cand.settings,
                                cand.clip,
                            )
                        })
                        .collect::<Result<Vec<QuantizedLayer>, _>>()?;
                    if cand.pre_rope {
                        for var in &mut variants {
                            crate::model::llama::rope_rows(config, &mut var.k, 0, false);
                        }
                    }
                    Ok(layer_distortion(
                        shape,
                        k,
                        v,
                        &cap.q[l],
                        &cap.positions,
                        tags,
                        opts.unit,
                        opts.protected,
                        &variants,
                    ))
                })
                .collect::<Result<Vec<_>, CalibrateError>>()?;
            for (b, per_bits) in scores[ci].iter_mut().enumerate() {
                for (kv, out) in per_bits.iter_mut().enumerate() {
                    let (mut num, mut den) = (0.0, 0.0);
                    for d in &per_layer {
                        for (t, &c) in cols.iter().enumerate() {
                            if d.queries[t] > 0 {
                                let w = c as f64;
                                num += w * d.sum[b][kv][t] / d.queries[t] as f64;
                                den += w;
                            }
                        }
                    }
                    if den > 0.0 {
                        out.push(num / den);
                    }
                }
            }
        }
    }
    let mut md = String::from("| quantizer | bits | K distortion (± 95%) | V distortion (± 95%) | K eff. bits | V eff. bits |\n|---|---|---|---|---|---|\n");
    for (ci, cand) in cands.iter().enumerate() {
        for (b, bw) in bits.iter().enumerate() {
            let (km, kci) = super::table::mean_ci(&scores[ci][b][0]);
            let (vm, vci) = super::table::mean_ci(&scores[ci][b][1]);
            let eb = |g: usize| bw.get() as f64 + 32.0 / g as f64;
            md.push_str(&format!(
                "| {cand} | {} | {km:.3e} ± {:.1e} | {vm:.3e} ± {:.1e} | {:.3} | {:.3} |\n",
                bw.get(),
                kci.unwrap_or(f64::NAN),
                vci.unwrap_or(f64::NAN),
                eb(cand.settings.key_group),
                eb(cand.settings.value_group)
            ));
        }
    }
    md.push_str(&format!(
        "\n{} trajectories' tokens replayed ({tokens} tokens), {} decode positions max per trajectory, {:.1} s.\n",
        scores.first().and_then(|s| s.first()).map_or(0, |s| s[0].len()),
        opts.max_queries,
        t0.elapsed().as_secs_f64()
    ));
    for n in notes {
        md.push_str(&format!("- {n}\n"));
    }
    let path = opts.out_dir.join("quantizer_comparison.md");
    write_atomic(&path, |w| w.write_all(md.as_bytes())).map_err(|source| CalibrateError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pre-RoPE variants of the per-channel candidates only for plain RoPE, named apart.
    #[test]
    fn pre_rope_candidates_follow_the_per_channel_ones() {
        let plain = candidates(64, true);
        let mrope = candidates(64, false);
        assert_eq!(mrope.len(), candidate_settings(64).len() + 3);
        assert!(mrope.iter().all(|c| !c.pre_rope));
        assert_eq!(mrope.iter().filter(|c| c.clip).count(), 3);
        assert!(
            mrope
                .iter()
                .any(|c| c.to_string()
                    == "k=per_channel/g64 v=per_token/g64 scale+zero=fp16,mse-clip")
        );
        let pre: Vec<String> = plain
            .iter()
            .filter(|c| c.pre_rope)
            .map(|c| c.to_string())
            .collect();
        assert_eq!(pre.len(), 3, "{pre:?}");
        for (p, g) in pre.iter().zip([32, 64, 128]) {
            assert_eq!(
                p,
                &format!("k=per_channel_pre_rope/g{g} v=per_token/g64 scale+zero=fp16")
            );
        }
    }
}
