//! `triaxkv trace inspect`: render trace files with the model's chat template and report
//! token counts per tag, one trajectory's coloured token stream, or ids and tags as JSON.

use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use triaxkv::model::load::{default_model_path, ModelError};
use triaxkv::model::tokenizer::Tokenizer;
use triaxkv::tags::{Modality, Recency, RecencyUnit, Role, TokenTag};
use triaxkv::trace::render::{render, RenderOptions, Rendered};
use triaxkv::trace::schema::Part;
use triaxkv::trace::template::{ChatTemplate, ImageTokens};
use triaxkv::trace::{read_glob, MessageRole, Trajectory};

/// Images of a trajectory per agent step (assistant messages so far, as tags count them) and
/// the tokens they take in Qwen2-VL's layout (`<|vision_start|>`, the merged patches of the
/// resized image, `<|vision_end|>`). Sizes the processor refuses count 0 tokens.
fn image_tokens_by_step(traj: &Trajectory, layout: &ImageTokens) -> BTreeMap<u32, (usize, usize)> {
    let mut by_step = BTreeMap::new();
    let mut step = 0u32;
    for m in &traj.messages {
        if m.role == MessageRole::Assistant {
            step += 1;
        }
        for part in &m.content {
            if let Part::Image { width, height, .. } = part {
                let n = layout
                    .count(*width as usize, *height as usize)
                    .map_or(0, |n| n + 2);
                let e = by_step.entry(step).or_insert((0, 0));
                e.0 += 1;
                e.1 += n;
            }
        }
    }
    by_step
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Trace JSONL files, folders or glob patterns.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<String>,
    /// Model whose tokenizer and chat template render the traces: a GGUF file or a directory
    /// with tokenizer.json [default: the bundled SmolLM2 from scripts/setup.sh].
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Print trajectory N (0-based, counted across all files in order) as its rendered token
    /// stream coloured by role.
    #[arg(long, value_name = "N")]
    show: Option<usize>,
    /// Print JSON instead: counts, and per trajectory its rendered text, token ids and tags.
    #[arg(long, conflicts_with = "show")]
    json: bool,
}

/// Token counts of one tag family: role × modality, each split by recency in both units.
#[derive(Debug, Default, Clone, Serialize)]
struct Counts {
    tokens: u64,
    /// "role/modality" -> [tokens, by turn recency ×4, by step recency ×4].
    by_tag: BTreeMap<String, [u64; 9]>,
}

impl Counts {
    fn add(&mut self, tags: &[TokenTag]) {
        let now_turn = tags.iter().map(|t| t.turn).max().unwrap_or(0);
        let now_step = tags.iter().map(|t| t.step).max().unwrap_or(0);
        for t in tags {
            let key = format!("{}/{}", t.role.as_str(), t.modality.as_str());
            let row = self.by_tag.entry(key).or_default();
            row[0] += 1;
            row[1 + t.at(RecencyUnit::Turn, now_turn, now_step).recency as usize] += 1;
            row[5 + t.at(RecencyUnit::Step, now_turn, now_step).recency as usize] += 1;
        }
        self.tokens += tags.len() as u64;
    }

    fn merge(&mut self, other: &Counts) {
        self.tokens += other.tokens;
        for (k, v) in &other.by_tag {
            let row = self.by_tag.entry(k.clone()).or_default();
            for (a, b) in row.iter_mut().zip(v) {
                *a += b;
            }
        }
    }
}

#[derive(Serialize)]
struct FileSummary<'a> {
    path: &'a Path,
    trajectories: usize,
    #[serde(flatten)]
    counts: &'a Counts,
}

#[derive(Serialize)]
struct SpanJson {
    index: usize,
    role: &'static str,
    tokens: [usize; 2],
    body: [usize; 2],
}

#[derive(Serialize)]
struct TrajectoryJson<'a> {
    file: &'a Path,
    id: &'a str,
    text: &'a str,
    ids: &'a [u32],
    /// Index into `roles` / `modalities` of the top-level object.
    role: Vec<u8>,
    modality: Vec<u8>,
    turn: Vec<u32>,
    step: Vec<u32>,
    messages: Vec<SpanJson>,
}

pub(crate) fn load_tokenizer(model: Option<&Path>) -> anyhow::Result<(Tokenizer, PathBuf)> {
    let path = match model {
        Some(p) => p.to_path_buf(),
        None => {
            let p = default_model_path();
            if !p.exists() {
                return Err(ModelError::MissingDefault { path: p }.into());
            }
            p
        }
    };
    let tok = if path.is_dir() {
        let config = path.join("tokenizer_config.json");
        Tokenizer::from_file(
            &path.join("tokenizer.json"),
            config.is_file().then_some(config.as_path()),
        )
    } else {
        Tokenizer::from_gguf_path(&path)
    }
    .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
    Ok((tok, path))
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    // A reader that stops early (`| head`) is not an error.
    match inspect(args) {
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let (tok, model_path) = load_tokenizer(args.model.as_deref())?;
    let template = ChatTemplate::for_tokenizer(&tok)
        .with_context(|| format!("chat template of {}", model_path.display()))?;
    let files = read_glob(&args.files)?;
    // A vision-language model directory renders images as its vision tokens.
    let vlm = args
        .model
        .as_deref()
        .is_some_and(|p| p.is_dir() && triaxkv::model::vision::has_vision_config(p));
    let layout = ImageTokens::qwen2_vl();
    let opts = RenderOptions {
        images: vlm.then_some(layout),
        ..RenderOptions::default()
    };
    let mut image_totals: Vec<(usize, usize)> = Vec::new();

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.json {
        write!(
            out,
            "{{\"model\":{},\"template\":\"{}\",\"roles\":{},\"modalities\":{},\"trajectories\":[",
            serde_json::to_string(&model_path)?,
            template.name(),
            serde_json::to_string(&Role::ALL.map(Role::as_str))?,
            serde_json::to_string(&Modality::ALL.map(Modality::as_str))?,
        )?;
    }

    let mut summaries = Vec::new();
    let mut total = Counts::default();
    let mut index = 0usize;
    let mut shown = false;
    for file in &files {
        let mut counts = Counts::default();
        let mut images = (0usize, 0usize);
        for traj in &file.trajectories {
            for (n, t) in image_tokens_by_step(traj, &layout).values() {
                images.0 += n;
                images.1 += t;
            }
            let r = render(traj, &template, &tok, &opts)
                .with_context(|| format!("rendering {}", file.path.display()))?;
            counts.add(&r.tags);
            if args.json {
                if index > 0 {
                    out.write_all(b",")?;
                }
                serde_json::to_writer(&mut out, &trajectory_json(&file.path, &traj.id, &r))?;
            }
            if args.show == Some(index) {
                show(&mut out, &tok, &traj.id, &file.path, &r)?;
                let by_step = image_tokens_by_step(traj, &layout);
                if !by_step.is_empty() {
                    writeln!(
                        out,
                        "\nimages per step ({}):",
                        if vlm {
                            "rendered as Qwen2-VL vision tokens"
                        } else {
                            "rendered as alt text here; tokens a Qwen2-VL model would take"
                        }
                    )?;
                    for (step, (n, t)) in &by_step {
                        writeln!(out, "  step {step:>3}: {n} image(s), {t} tokens")?;
                    }
                }
                shown = true;
            }
            index += 1;
        }
        total.merge(&counts);
        image_totals.push(images);
        summaries.push((file.path.clone(), file.trajectories.len(), counts));
    }
    if let Some(n) = args.show {
        if !shown {
            anyhow::bail!("--show {n}: the files hold {index} trajectories (0-based index)");
        }
        return Ok(out.flush()?);
    }
    if args.json {
        let files: Vec<FileSummary> = summaries
            .iter()
            .map(|(path, n, counts)| FileSummary {
                path,
                trajectories: *n,
                counts,
            })
            .collect();
        write!(
            out,
            "],\"files\":{},\"total\":{}}}",
            serde_json::to_string(&files)?,
            serde_json::to_string(&total)?
        )?;
        writeln!(out)?;
        return Ok(out.flush()?);
    }

    writeln!(
        out,
        "model {} (template {}, vocab {})\n",
        model_path.display(),
        template.name(),
        tok.vocab_size()
    )?;
    let w = summaries
        .iter()
        .map(|(p, _, _)| p.display().to_string().len())
        .max()
        .unwrap_or(0)
        .max(5);
    writeln!(
        out,
        "{:<w$} {:>6} {:>10} {:>11}",
        "file", "trajs", "tokens", "tokens/traj"
    )?;
    for (path, n, counts) in &summaries {
        writeln!(
            out,
            "{:<w$} {:>6} {:>10} {:>11.0}",
            path.display(),
            n,
            counts.tokens,
            counts.tokens as f64 / (*n).max(1) as f64
        )?;
    }
    writeln!(
        out,
        "{:<w$} {:>6} {:>10} {:>11.0}",
        "total",
        index,
        total.tokens,
        total.tokens as f64 / index.max(1) as f64
    )?;
    for (path, _, counts) in &summaries {
        writeln!(out, "\n{}", path.display())?;
        tag_table(&mut out, counts)?;
    }
    writeln!(out, "\ntotal")?;
    tag_table(&mut out, &total)?;
    writeln!(
        out,
        "\nrecency: turns (user message to user message) or steps (assistant message to \
         assistant message) back from each trajectory's last."
    )?;
    let (n_img, t_img) = image_totals
        .iter()
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    if vlm {
        writeln!(
            out,
            "images: {n_img}, rendered as Qwen2-VL vision tokens ({t_img} tokens, modality image)."
        )?;
    } else if n_img > 0 {
        writeln!(
            out,
            "images: {n_img}, rendered as alt text (text-only model: the image modality is not \
             exercised); a Qwen2-VL model would give them {t_img} tokens{}.",
            summaries
                .iter()
                .zip(&image_totals)
                .filter(|(_, (n, _))| *n > 0)
                .map(|((p, _, _), (n, t))| format!("; {}: {n} images, {t} tokens", p.display()))
                .collect::<String>()
        )?;
    } else {
        writeln!(out, "images: none.")?;
    }
    Ok(out.flush()?)
}

fn tag_table(out: &mut impl Write, c: &Counts) -> std::io::Result<()> {
    let short = |r: Recency| match r {
        Recency::Current => "cur",
        Recency::Previous => "prev",
        Recency::TwoBack => "2back",
        Recency::Older => "older",
    };
    let mut head = format!("  {:<22} {:>9} {:>6} |", "role/modality", "tokens", "share");
    for unit in ["turn", "step"] {
        for r in Recency::ALL {
            head.push_str(&format!(" {:>9}", format!("{unit}:{}", short(r))));
        }
        if unit == "turn" {
            head.push_str(" |");
        }
    }
    writeln!(out, "{head}")?;
    for (tag, row) in &c.by_tag {
        let mut line = format!(
            "  {:<22} {:>9} {:>5.1}% |",
            tag,
            row[0],
            100.0 * row[0] as f64 / c.tokens.max(1) as f64
        );
        for (i, v) in row[1..].iter().enumerate() {
            line.push_str(&format!(" {v:>9}"));
            if i == 3 {
                line.push_str(" |");
            }
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn trajectory_json<'a>(file: &'a Path, id: &'a str, r: &'a Rendered) -> TrajectoryJson<'a> {
    let role_index = |role: Role| Role::ALL.iter().position(|x| *x == role).unwrap_or(0) as u8;
    TrajectoryJson {
        file,
        id,
        text: &r.text,
        ids: &r.ids,
        role: r.tags.iter().map(|t| role_index(t.role)).collect(),
        modality: r.tags.iter().map(|t| t.modality as u8).collect(),
        turn: r.tags.iter().map(|t| t.turn).collect(),
        step: r.tags.iter().map(|t| t.step).collect(),
        messages: r
            .messages
            .iter()
            .map(|m| SpanJson {
                index: m.index,
                role: m.role.as_str(),
                tokens: [m.tokens.start, m.tokens.end],
                body: [m.body.start, m.body.end],
            })
            .collect(),
    }
}

fn role_style(role: Role) -> anstyle::Style {
    use anstyle::{AnsiColor, Style};
    let fg = |c: AnsiColor| Style::new().fg_color(Some(c.into()));
    match role {
        Role::System => fg(AnsiColor::Blue),
        Role::User => fg(AnsiColor::Green),
        Role::Reasoning => fg(AnsiColor::Magenta),
        Role::ToolCall => fg(AnsiColor::Yellow).bold(),
        Role::Observation => fg(AnsiColor::Cyan),
        Role::Assistant => fg(AnsiColor::BrightWhite).bold(),
        Role::Template => fg(AnsiColor::BrightBlack),
    }
}

/// One trajectory's tokens, coloured by role on a terminal (plain `«role»` markers when
/// stdout is not a terminal or NO_COLOR is set).
fn show(
    out: &mut impl Write,
    tok: &Tokenizer,
    id: &str,
    file: &Path,
    r: &Rendered,
) -> anyhow::Result<()> {
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let turns = r.tags.iter().map(|t| t.turn).max().unwrap_or(0);
    let steps = r.tags.iter().map(|t| t.step).max().unwrap_or(0);
    let assistants = r
        .messages
        .iter()
        .filter(|m| m.role == MessageRole::Assistant)
        .count();
    writeln!(
        out,
        "{id} ({}): {} tokens, {turns} user turns, {steps} steps ({assistants} assistant messages)",
        file.display(),
        r.ids.len()
    )?;
    write!(out, "legend:")?;
    for role in Role::ALL {
        if colour {
            let s = role_style(role);
            write!(out, " {s}{}{s:#}", role.as_str())?;
        } else {
            write!(out, " «{}»", role.as_str())?;
        }
    }
    writeln!(out, "\n")?;
    let mut last_role = None;
    for (tag, range) in r.runs() {
        let text = tok
            .decode(&r.ids[range.clone()])
            .with_context(|| format!("decoding tokens {range:?} of {id}"))?;
        if colour {
            let s = role_style(tag.role);
            write!(out, "{s}{text}{s:#}")?;
        } else {
            if last_role != Some(tag.role) {
                write!(out, "«{}»", tag.role.as_str())?;
            }
            write!(out, "{text}")?;
        }
        last_role = Some(tag.role);
    }
    writeln!(out)?;
    Ok(())
}
