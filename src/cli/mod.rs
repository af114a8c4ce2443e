//! The `triaxkv` command line: parses arguments, calls the library, reports results.
//! One file per subcommand; no model or cache logic lives here.

mod allocate;
mod bench;
mod bench_attention;
mod bench_decode_step;
mod bench_serve;
mod calibrate;
mod eval;
mod generate;
mod serve;
mod trace_import;
mod trace_inspect;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "triaxkv",
    version,
    about = "Tri-axial mixed-precision KV cache for long-horizon AI agents"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a continuation of a prompt or of a recorded trajectory.
    Generate(generate::GenerateArgs),
    /// Import, inspect and check agent trajectories.
    #[command(subcommand)]
    Trace(TraceCommand),
    /// Measure how quantizing each tag's keys/values distorts attention, per layer.
    Calibrate(calibrate::CalibrateArgs),
    /// Solve for the bits of each (layer, K|V, tag) under a memory budget; write a profile.
    Allocate(allocate::AllocateArgs),
    /// Fidelity of profiles against the 16-bit KV cache on traces.
    Eval(eval::EvalArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Serve the model over an OpenAI-compatible HTTP API with a mixed-precision KV cache.
    Serve(serve::ServeArgs),
}

#[derive(Debug, Subcommand)]
enum TraceCommand {
    /// Convert another agent-log format into triaxkv trace JSONL.
    Import(trace_import::ImportArgs),
    /// Token counts per tag, and the tagged token stream of one trajectory.
    Inspect(trace_inspect::InspectArgs),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Generate(args) => generate::run(args),
            Command::Trace(TraceCommand::Import(args)) => trace_import::run(args),
            Command::Trace(TraceCommand::Inspect(args)) => trace_inspect::run(args),
            Command::Bench(cmd) => bench::run(cmd),
            Command::Calibrate(args) => calibrate::run(args),
            Command::Allocate(args) => allocate::run(args),
            Command::Eval(args) => eval::run(args),
            Command::Serve(args) => serve::run(args),
        }
    }
}
