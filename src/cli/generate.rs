//! `triaxkv generate`: continue a one-message prompt or a recorded trajectory with the CPU
//! forward pass, streaming the text as tokens come and stopping at end-of-turn.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use triaxkv::model::llama::{Logits, DEFAULT_PREFILL_CHUNK};
use triaxkv::model::load;
use triaxkv::model::sampling::{Sampler, SamplingParams};
use triaxkv::tags::{Modality, Role, TokenTag};
use triaxkv::trace::render::{render, RenderOptions};
use triaxkv::trace::schema::{Message, MessageRole, Part, Trajectory};
use triaxkv::trace::template::ChatTemplate;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "trace"])))]
pub struct GenerateArgs {
    /// GGUF file or safetensors directory (default: the bundled SmolLM2 from scripts/setup.sh).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    prompt: Option<String>,
    /// A trace JSONL file: continue one of its trajectories.
    #[arg(long, requires = "upto_step")]
    trace: Option<PathBuf>,
    /// Which trajectory of --trace, by position (0-based).
    #[arg(long, conflicts_with = "id")]
    index: Option<usize>,
    /// Which trajectory of --trace, by its `id`.
    #[arg(long)]
    id: Option<String>,
    /// Render the trajectory up to (not including) its N-th assistant message, 0-based, and
    /// generate that message.
    #[arg(long)]
    upto_step: Option<usize>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        bail!("--temperature must be >= 0, got {}", args.temperature);
    }
    let traj = match (&args.prompt, &args.trace) {
        (Some(p), _) => prompt_trajectory(p),
        (None, Some(path)) => pick_trajectory(path, args.index, args.id.as_deref())?,
        (None, None) => bail!("pass --prompt TEXT or --trace FILE --upto-step N"),
    };

    let t = Instant::now();
    let loaded = load::load_or_default(args.model.as_deref())?;
    eprintln!(
        "[model {} loaded in {:.1} s]",
        loaded.name,
        t.elapsed().as_secs_f64()
    );
    let model = &loaded.model;
    let tok = &loaded.tokenizer;
    let template =
        ChatTemplate::for_tokenizer(tok).with_context(|| format!("model {}", loaded.name))?;
    let opts = RenderOptions {
        upto_step: args.trace.as_ref().and(args.upto_step),
        add_generation_prompt: true,
        max_tokens: None,
        images: None,
    };
    let rendered = render(&traj, &template, tok, &opts)?;
    model
        .check_tokens(&rendered.ids)
        .with_context(|| format!("rendering trajectory {}", traj.id))?;
    let n = rendered.ids.len();
    if n > model.config.max_position_embeddings {
        eprintln!(
            "[warning: the context has {n} tokens, more than the {} the model was trained for]",
            model.config.max_position_embeddings
        );
    }

    // Prefill, with a progress bar when it takes a while.
    let t = Instant::now();
    let mut cache = model.new_cache();
    let bar = (n > 2 * DEFAULT_PREFILL_CHUNK).then(|| {
        let b = indicatif::ProgressBar::new(n as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "prefill {bar:30} {pos}/{len} tokens {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut logits = model.prefill(
        &rendered.ids,
        &rendered.tags,
        &mut cache,
        Logits::Last,
        DEFAULT_PREFILL_CHUNK,
        &mut |done| {
            if let Some(b) = &bar {
                b.set_position(done as u64);
            }
        },
    );
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let prefill_s = t.elapsed().as_secs_f64();

    // Generated tokens belong to the assistant message the prompt opens.
    let last = rendered.tags.last().copied();
    let gen_tag = TokenTag {
        role: Role::Assistant,
        modality: Modality::Text,
        turn: last.map_or(0, |t| t.turn),
        step: last.map_or(1, |t| t.step),
    };
    let mut sampler = Sampler::new(SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    });
    let t = Instant::now();
    let mut out_ids: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout().lock();
    let mut stopped_at_eos = false;
    while out_ids.len() < args.max_tokens {
        let next = sampler.sample(&logits);
        if tok.eos_ids().contains(&next) {
            stopped_at_eos = true;
            break;
        }
        out_ids.push(next);
        // Print whatever new text is complete: a multi-byte character can span tokens.
        let text = tok.decode(&out_ids)?;
        if !text.ends_with('\u{FFFD}') && text.len() > printed {
            stdout.write_all(&text.as_bytes()[printed..])?;
            stdout.flush()?;
            printed = text.len();
        }
        if out_ids.len() < args.max_tokens {
            logits = model.forward(&[next], &[gen_tag], &mut cache, Logits::Last);
        }
    }
    let text = tok.decode(&out_ids)?;
    if text.len() > printed {
        stdout.write_all(&text.as_bytes()[printed..])?;
    }
    writeln!(stdout)?;
    let decode_s = t.elapsed().as_secs_f64();
    eprintln!(
        "[{n} prompt tokens in {prefill_s:.2} s ({:.0} tok/s); {} generated in {decode_s:.2} s ({:.1} tok/s); {}]",
        n as f64 / prefill_s.max(1e-9),
        out_ids.len(),
        out_ids.len() as f64 / decode_s.max(1e-9),
        if stopped_at_eos { "stopped at end of turn" } else { "stopped at --max-tokens" }
    );
    Ok(())
}

fn prompt_trajectory(prompt: &str) -> Trajectory {
    Trajectory {
        id: "prompt".into(),
        source: serde_json::Value::Null,
        meta: serde_json::Value::Null,
        tools: Vec::new(),
        messages: vec![Message {
            role: MessageRole::User,
            content: vec![Part::Text {
                text: prompt.into(),
            }],
            reasoning: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }],
    }
}

fn pick_trajectory(
    path: &std::path::Path,
    index: Option<usize>,
    id: Option<&str>,
) -> Result<Trajectory> {
    let mut all = triaxkv::trace::read_jsonl(path)?;
    let count = all.len();
    if let Some(id) = id {
        return all
            .into_iter()
            .find(|t| t.id == id)
            .with_context(|| format!("{}: no trajectory with id {id:?}", path.display()));
    }
    let i = index.unwrap_or(0);
    if i >= count {
        bail!(
            "{}: --index {i} but the file holds {count} trajectories",
            path.display()
        );
    }
    Ok(all.swap_remove(i))
}
