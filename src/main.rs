//! `lora-compose`: the few-shot experiment (no subcommand), adapter merging, demo adapters, embeddings.
//!
//! Exit status: 0 on success, 1 for an error in the inputs or while writing (printed as
//! `error: …`), 2 for a malformed command line (clap's usage errors).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lora_compose::experiment;
use lora_compose::merge::{self, Mode};
use lora_compose::peft::{self, Library, StoreDtype};
use lora_compose::{Error, Result};

/// The model allocates its activations afresh each step; mimalloc, with purging off
/// ([`lora_compose::alloc::keep_freed_pages`]), reuses freed pages where the system allocator
/// returns them to the kernel and faults them back in.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "lora-compose", version, about = "Compose pre-trained LoRA modules")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand: run the whole sweep instead of the reduced comparison.
    #[arg(long)]
    full: bool,
    // With no subcommand: where the model runs.
    #[command(flatten)]
    device: lora_compose::compose::layer::DeviceArg,
}

#[derive(Subcommand)]
enum Command {
    /// Merge PEFT adapters into one adapter (or into base weights with --base).
    Merge(MergeArgs),
    /// Write N small random PEFT adapters and a matching base model into DIR.
    DemoAdapters(DemoArgs),
    /// Sentence embeddings from all-MiniLM-L6-v2 (or a BERT of its layout): one JSON array per line.
    Embed(lora_compose::model::cli::EmbedArgs),
    /// Pretrain the tiny ViT on Fashion-MNIST train (needs scripts/fetch-assets.sh).
    Pretrain(experiment::PretrainArgs),
    /// Train the upstream LoRA library on MNIST tasks, in PEFT layout.
    Upstream(experiment::UpstreamArgs),
    /// Train the upstream LoRA library on MiniLM text tasks (needs fetch-assets.sh --text, fetch-minilm.sh).
    UpstreamText(experiment::text_upstream::TextUpstreamArgs),
    /// Write the downstream tasks' pools and test sets into one compact file.
    Prepare(experiment::PrepareArgs),
    /// Write the downstream text tasks' pools and test sets (MiniLM token ids) into one compact file.
    PrepareText(experiment::text_fewshot::PrepareTextArgs),
    /// Few-shot comparison of methods × tasks × shots × seeds (resumable JSONL).
    Fewshot(experiment::FewshotArgs),
    /// The few-shot comparison on MiniLM with the text library (resumable JSONL).
    FewshotText(experiment::text_fewshot::TextFewshotArgs),
    /// The reduced language comparison (needs scripts/fetch-minilm.sh), table and plots.
    Language(experiment::text_fewshot::LanguageArgs),
    /// Markdown table and SVG plots from the few-shot results.
    Report(experiment::ReportArgs),
    /// Compose your own PEFT adapters on your own BERT and labelled file: table, learned
    /// coefficients and composed adapters.
    Adapt(experiment::AdaptArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors); repeat it.
    #[arg(long = "adapter", value_name = "DIR", required = true)]
    adapters: Vec<PathBuf>,
    /// One weight per adapter, comma separated [default: 1/N each].
    #[arg(long, value_name = "W1,W2,...", allow_hyphen_values = true)]
    weights: Option<String>,
    /// cat: exact Σ w_i s_i B_i A_i with rank Σ r_i; linear: PEFT's factor sum, equal ranks.
    #[arg(long, value_enum, default_value_t = Mode::Cat)]
    mode: Mode,
    /// Output adapter directory, or output .safetensors file with --base.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Fold ΔW into this base model's weights instead of writing an adapter.
    #[arg(long, value_name = "MODEL.safetensors")]
    base: Option<PathBuf>,
    /// Element type of the written adapter tensors (not with --base, which keeps the base's).
    #[arg(long, value_enum)]
    dtype: Option<StoreDtype>,
}

#[derive(Args)]
struct DemoArgs {
    /// Directory to create adapter_0 … adapter_{N-1} and base_model.safetensors in.
    dir: PathBuf,
    #[arg(long, default_value_t = 4)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn run_merge(args: &MergeArgs) -> Result<()> {
    let weights = args.weights.as_deref().map(merge::parse_weights).transpose()?;
    let weights = merge::resolve_weights(args.adapters.len(), weights.as_deref())?;
    if args.base.is_some() && args.dtype.is_some() {
        return Err(Error::Arg(
            "--dtype applies to adapter output; --base keeps the base's dtypes".into(),
        ));
    }
    let library = Library::load(&args.adapters)?;
    let merged = merge::merge(&library, &weights, args.mode)?;
    match &args.base {
        Some(base) => {
            let bytes = std::fs::read(base).map_err(|e| Error::io(base, e))?;
            let folded = merge::fold_into_base(base, &bytes, &merged)?;
            merge::write_file_atomic(&args.out, &folded)?;
            eprintln!(
                "folded {} layers of {} adapters into {}",
                merged.layers.len(),
                library.adapters.len(),
                args.out.display()
            );
        }
        None => {
            merge::write_adapter_atomic(&args.out, &merged, args.dtype.unwrap_or_default())?;
            eprintln!(
                "merged {} adapters ({} layers, r = {}) into {}",
                library.adapters.len(),
                merged.layers.len(),
                merged.config.r,
                args.out.display()
            );
        }
    }
    Ok(())
}

fn run_demo(args: &DemoArgs) -> Result<()> {
    if args.n == 0 {
        return Err(Error::Arg("--n must be at least 1".into()));
    }
    std::fs::create_dir_all(&args.dir).map_err(|e| Error::io(&args.dir, e))?;
    for adapter in peft::demo_adapters(args.n, args.seed)? {
        adapter.save(args.dir.join(&adapter.name), StoreDtype::F32)?;
    }
    let base_path = args.dir.join("base_model.safetensors");
    let base = peft::demo_base(args.seed, &base_path)?;
    std::fs::write(&base_path, base).map_err(|e| Error::io(&base_path, e))?;
    eprintln!(
        "wrote {} adapters (adapter_0 … adapter_{}) and base_model.safetensors into {}",
        args.n,
        args.n - 1,
        args.dir.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    lora_compose::alloc::keep_freed_pages();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Merge(args)) => run_merge(&args),
        Some(Command::DemoAdapters(args)) => run_demo(&args),
        Some(Command::Embed(args)) => lora_compose::model::cli::run_embed(args),
        Some(Command::Pretrain(args)) => experiment::run_pretrain(args),
        Some(Command::Upstream(args)) => experiment::run_upstream(args),
        Some(Command::UpstreamText(args)) => experiment::text_upstream::run_text_upstream(args),
        Some(Command::Prepare(args)) => experiment::run_prepare(args),
        Some(Command::Fewshot(args)) => experiment::run_fewshot(args),
        Some(Command::PrepareText(args)) => experiment::text_fewshot::run_prepare_text(args),
        Some(Command::FewshotText(args)) => experiment::text_fewshot::run_text_fewshot(args),
        Some(Command::Language(args)) => experiment::text_fewshot::run_language(args),
        Some(Command::Report(args)) => experiment::run_report(args),
        Some(Command::Adapt(args)) => experiment::run_adapt(args),
        None => experiment::run_default(experiment::DefaultArgs {
            full: cli.full,
            device: cli.device,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                // Io's Display already includes its source; skip exact repeats.
                if !msg.ends_with(&s.to_string()) {
                    msg.push_str(&format!(": {s}"));
                }
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(1)
        }
    }
}
