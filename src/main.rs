//! The `kiln` command line: the only place that knows about flags, files on disk and
//! human-readable reports. Each subcommand lives in its own module under `cli/`; library
//! crates are called with typed options and return typed errors, which become one-line
//! messages here (anyhow) and a non-zero exit status.

mod cli;
mod config;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln: an ONNX model compiler for edge devices"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's opsets, inputs, outputs, op histogram, parameters and unsupported ops;
    /// or a compiled artifact's target, parameter count, weight bytes, inputs and outputs.
    Inspect {
        model: PathBuf,
        /// Also print the imported graph in Kiln's text form.
        #[arg(long)]
        graph: bool,
        /// Bind a dynamic dimension and print every value's inferred static shape.
        #[arg(long = "dim", value_name = "NAME=VALUE")]
        dims: Vec<String>,
        /// Run shape inference (needs every dynamic dim bound with --dim).
        #[arg(long)]
        shapes: bool,
    },
    /// Run a model on ONNX TensorProto inputs with the reference interpreter.
    Run {
        model: PathBuf,
        /// Folder with input_N.pb files in graph input order.
        #[arg(long)]
        inputs_dir: Option<PathBuf>,
        /// Folder to write output_N.pb files to.
        #[arg(long)]
        output_dir: PathBuf,
        /// Override one input by name with a TensorProto file.
        #[arg(long = "input", value_name = "NAME=FILE")]
        inputs: Vec<String>,
    },
    /// Compile a model into a self-contained shared object for a target (or, with --config,
    /// for every target a YAML config lists), optionally quantizing its weights.
    Compile(cli::compile::Args),
    /// Measure accuracy: perplexity of a causal LM over a token file, or cosine similarity
    /// and max error of every output against the reference interpreter.
    Eval(cli::eval::Args),
    /// Time a compiled artifact (median, p95, min latency, peak RSS), optionally side by side
    /// with onnxruntime on the ONNX model.
    Bench(cli::bench::Args),
    /// List the targets Kiln knows, with the features each requires.
    Targets,
    /// Run every ONNX-test-layout folder (model.onnx + test_data_set_*/) under the given dirs.
    Conformance {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = cli::conformance::Backend::Interp)]
        backend: cli::conformance::Backend,
        /// Write one `name status reason` line per test to this file.
        #[arg(long)]
        list_file: Option<PathBuf>,
        /// Exit with status 0 even when tests fail.
        #[arg(long)]
        allow_failures: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Inspect {
            model,
            graph,
            dims,
            shapes,
        } => cli::inspect::run(&model, graph, &dims, shapes),
        Command::Run {
            model,
            inputs_dir,
            output_dir,
            inputs,
        } => cli::run::run(&model, inputs_dir.as_deref(), &output_dir, &inputs),
        Command::Targets => cli::targets::run(),
        Command::Compile(args) => cli::compile::run(args),
        Command::Bench(args) => cli::bench::run(&args),
        Command::Eval(args) => cli::eval::run(&args),
        Command::Conformance {
            dirs,
            backend,
            list_file,
            allow_failures,
        } => cli::conformance::run(&dirs, backend, list_file.as_deref(), allow_failures),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes joined, no backtrace.
            let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", msg.join(": "));
            ExitCode::FAILURE
        }
    }
}
