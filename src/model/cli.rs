//! `lora-compose embed`: sentence embeddings of all-MiniLM-L6-v2, one JSON array per line.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::bert::Encoder;
use crate::compose::layer::DeviceArg;
use crate::{Error, Result};

/// Sentence embeddings (mean over real tokens, L2-normalised), one JSON array per text and line.
#[derive(clap::Args, Debug, Clone)]
pub struct EmbedArgs {
    /// Model directory with config.json, model.safetensors and tokenizer.json
    /// (`scripts/fetch-minilm.sh` puts them in assets/minilm).
    #[arg(long)]
    pub model: PathBuf,
    /// A text to embed; repeat for more.
    #[arg(long = "text")]
    pub texts: Vec<String>,
    /// A UTF-8 file with one text per line (blank lines are skipped); repeat for more. Its texts
    /// follow the --text ones.
    #[arg(long = "file")]
    pub files: Vec<PathBuf>,
    /// Longest token sequence, [CLS] and [SEP] included; longer texts are cut with a warning.
    /// 512 is the model's position table; sentence-transformers' default for this model is 256.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// Reads one text per non-blank line, rejecting invalid UTF-8 with its line number.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::Input(format!("{}: invalid UTF-8 at byte {at} (line {line})", path.display()))
    })?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

pub fn run_embed(args: EmbedArgs) -> Result<()> {
    let mut texts = args.texts.clone();
    for f in &args.files {
        texts.extend(read_texts(f)?);
    }
    if texts.is_empty() {
        return Err(Error::Arg("nothing to embed: pass --text or --file".into()));
    }
    let mut encoder = Encoder::load(&args.model)?;
    encoder.model.to_device(&args.device.select()?)?;
    let out = encoder.embed(&texts, args.max_tokens, args.batch_size)?;
    for &(i, n) in &out.truncated {
        eprintln!(
            "warning: text {i} has {n} tokens; truncated to {} ([CLS] + first {} word pieces + [SEP])",
            args.max_tokens,
            args.max_tokens - 2
        );
    }
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    for v in &out.vectors {
        let line = serde_json::to_string(v).map_err(|e| Error::Arg(format!("cannot print an embedding: {e}")))?;
        writeln!(w, "{line}").map_err(|e| Error::io("<stdout>", e))?;
    }
    w.flush().map_err(|e| Error::io("<stdout>", e))?;
    Ok(())
}
