//! `eval`'s outputs: DIR/eval.json (everything), DIR/eval.md (the table a person reads) and
//! DIR/pareto.svg + .png (mean KL against measured effective bits, one point per profile).

use super::plot::{self, Point, Scatter};
use super::run::EvalReport;
use super::EvalError;
use crate::util::write_atomic;
use std::fmt::Write as _;
use std::path::Path;

fn rate(n: usize, d: usize) -> String {
    if d == 0 {
        "n/a".into()
    } else {
        format!("{n}/{d} ({:.0}%)", 100.0 * n as f64 / d as f64)
    }
}

pub fn markdown(r: &EvalReport) -> String {
    let mut s = String::new();
    let positions: usize = r.trajectories.iter().map(|t| t.positions).sum();
    let assistant: usize = r.trajectories.iter().map(|t| t.assistant_positions).sum();
    let tokens: usize = r.trajectories.iter().map(|t| t.tokens).sum();
    let _ = writeln!(s, "# Fidelity of KV-cache profiles\n");
    let _ = writeln!(
        s,
        "Model `{}` (sha256 `{}`); reference: the {} KV cache. {} trajectories, {tokens} tokens \
         replayed. Scored: {positions} of the {assistant} positions that predict a token of an \
         assistant message (reasoning, tool call, answer, closing template tokens), spread \
         evenly; each scored token ends its chunk, so its 16-bit window is the one a live \
         decode sees. Wall time {:.1} s; reference replay {:.0} tokens/s.\n",
        r.model,
        &r.model_sha256[..r.model_sha256.len().min(16)],
        r.reference.cache,
        r.trajectories.len(),
        r.wall_s,
        r.reference.tokens_per_s,
    );
    let _ = writeln!(
        s,
        "| profile | policy | bits (profile) | bits (measured) | mean KL | p95 KL | max KL | top-1 | ppl (ref) | tool-call match | identical generation | replay tok/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in &r.profiles {
        let f = &p.fidelity;
        let t = &p.tool_calls;
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.3e} | {:.3e} | {:.3e} | {:.2}% | {:.3} ({:.3}) | {} | {} | {:.0} |",
            p.name,
            p.policy,
            p.profile_bits,
            p.effective_bits,
            f.mean_kl,
            f.p95_kl,
            f.max_kl,
            100.0 * f.top1,
            f.ppl,
            f.ref_ppl,
            rate(t.matches, t.ref_parsed),
            rate(t.identical, t.steps),
            p.tokens_per_s
        );
    }
    let rt = &r.reference.tool_calls;
    let _ = writeln!(
        s,
        "\n**Tool calls.** At {} recorded tool-call steps (at most {} per trajectory) each cache \
         generates the assistant message greedily (at most {} tokens, stopping at end-of-turn) \
         from where the recorded message starts; the parsed calls (name and arguments) are \
         compared with the reference's. The reference's own generations parse as tool calls at \
         {}, reach end-of-turn at {}, and equal the recorded call at {}. `tool-call match` \
         counts only steps where the reference parses; `identical generation` compares token \
         ids over all steps.\n",
        rt.steps,
        r.options.tool_calls,
        r.options.gen_tokens,
        rate(rt.parsed, rt.steps),
        rate(rt.finished, rt.steps),
        rate(rt.matches_recorded, rt.steps),
    );
    let _ = writeln!(
        s,
        "**Measured bits** are the bits the cache stores per K/V element (codes, fp16 \
         scales/zeros, 16-bit sinks, window and keys staged until their per-channel block \
         fills), read after each scored chunk and averaged over the scored positions; `bits \
         (profile)` is what the allocator expected on the calibration mix.\n"
    );
    if !r.paired.is_empty() {
        let _ = writeln!(
            s,
            "## Against {} position by position\n\nMean of the KL differences at the same \
             positions, with a 95% interval over positions (positions of one trajectory are \
             correlated: read it as a lower bound on the uncertainty). An interval that holds \
             0 means the profiles are not told apart here.\n",
            r.paired[0].against
        );
        let _ = writeln!(
            s,
            "| profile | mean KL difference | 95% interval | lower mean KL in |"
        );
        let _ = writeln!(s, "|---|---|---|---|");
        for d in &r.paired {
            let _ = writeln!(
                s,
                "| {} | {:+.3e} | ±{:.1e} | {}/{} trajectories |",
                d.profile, d.mean, d.ci95, d.lower_in, d.trajectories
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## Per trajectory (mean KL)\n");
    let mut head = String::from("| trajectory | tokens | positions |");
    let mut rule = String::from("|---|---|---|");
    for p in &r.profiles {
        let _ = write!(head, " {} |", p.name);
        rule.push_str("---|");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for (i, t) in r.trajectories.iter().enumerate() {
        let _ = write!(
            s,
            "| {} | {}{} | {} |",
            t.id,
            t.tokens,
            if t.truncated { " (truncated)" } else { "" },
            t.positions
        );
        for p in &r.profiles {
            match p.per_trajectory.get(i) {
                Some(f) => {
                    let _ = write!(s, " {:.3e} |", f.mean_kl);
                }
                None => s.push_str(" |"),
            }
        }
        s.push('\n');
    }
    let images: usize = r.trajectories.iter().map(|t| t.image_tokens).sum();
    if images == 0 {
        let _ = writeln!(
            s,
            "\nThe image axis was not exercised: a text-only model reads image parts as their \
             alt text (observation/text), or no image was within the token limit."
        );
    } else {
        let _ = writeln!(
            s,
            "\nImages: {images} image tokens fed to the vision-language model (modality image)."
        );
    }
    for p in &r.profiles {
        for e in &p.quant_errors {
            let _ = writeln!(s, "- {}: quantization error (kept at 16 bits): {e}", p.name);
        }
        if p.fp8_rounded > 0 {
            let _ = writeln!(
                s,
                "- {}: {} of {} K/V roundings to FP8 (scale 1: waiting tokens, sinks, window) were \
                 beyond ±448 and clipped",
                p.name, p.fp8_clipped, p.fp8_rounded
            );
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

pub fn pareto(r: &EvalReport) -> Scatter {
    Scatter {
        title: format!("{}: mean KL vs effective bits", r.model),
        x_label: "effective bits per K/V element (measured)".into(),
        y_label: "mean KL(reference ‖ profile), log scale".into(),
        log_x: false,
        log_y: true,
        points: r
            .profiles
            .iter()
            .map(|p| Point {
                x: p.effective_bits,
                y: p.fidelity.mean_kl,
                label: p.name.clone(),
            })
            .collect(),
        lines: Vec::new(),
    }
}

/// Write eval.json, eval.md, pareto.svg and pareto.png into `dir`, each atomically.
pub fn write(r: &EvalReport, dir: &Path) -> Result<(), EvalError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EvalError::Io { path, source }
    };
    let json = dir.join("eval.json");
    write_atomic(&json, |w| {
        serde_json::to_writer_pretty(&mut *w, r).map_err(std::io::Error::other)?;
        w.write_all(b"\n")
    })
    .map_err(io(&json))?;
    let md = dir.join("eval.md");
    let text = markdown(r);
    write_atomic(&md, |w| w.write_all(text.as_bytes())).map_err(io(&md))?;
    let (svg, png) = (dir.join("pareto.svg"), dir.join("pareto.png"));
    plot::write(&pareto(r), &svg, &png).map_err(io(&svg))
}
