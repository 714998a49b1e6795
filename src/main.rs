// Minimal wiring on the `model` branch for testing `embed`; the lead's main.rs replaces it.
use clap::Parser;

#[derive(Parser)]
#[command(name = "lora-compose", about = "Composing pre-trained LoRA modules")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Sentence embeddings of all-MiniLM-L6-v2, one JSON array per line.
    Embed(lora_compose::model::cli::EmbedArgs),
}

fn main() {
    let result = match Cli::parse().cmd {
        Cmd::Embed(args) => lora_compose::model::cli::run_embed(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
