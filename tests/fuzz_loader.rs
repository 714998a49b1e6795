//! The adapter loader on hostile input: arbitrary bytes, and valid files with bytes flipped,
//! inserted or cut off. Every case must end in `Ok` or `Err`, never a panic or an abort; an
//! adapter that loads must also survive a merge and a fold.
//!
//! Default case count is small for CI; raise it with `PROPTEST_CASES=100000`.

use std::path::Path;
use std::sync::OnceLock;

use lora_compose::merge::{fold_into_base, merge, Mode};
use lora_compose::peft::{demo_adapters, demo_base, Adapter, Library, StoreDtype, CONFIG_FILE, WEIGHTS_FILE};
use proptest::prelude::*;

/// A valid adapter's two files, and a valid base model for it.
struct Seeds {
    config: Vec<u8>,
    weights: Vec<u8>,
    base: Vec<u8>,
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        // adapter_1 has rank_pattern/alpha_pattern, so its config exercises the pattern parser.
        let adapter = demo_adapters(2, 1).unwrap().remove(1);
        adapter.save(tmp.path(), StoreDtype::F16).unwrap();
        Seeds {
            config: std::fs::read(tmp.path().join(CONFIG_FILE)).unwrap(),
            weights: std::fs::read(tmp.path().join(WEIGHTS_FILE)).unwrap(),
            base: demo_base(1, Path::new("base")).unwrap(),
        }
    })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}

#[derive(Clone, Debug)]
enum Edit {
    Flip { at: usize, xor: u8 },
    Set { at: usize, byte: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Truncate { keep: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(at, xor)| Edit::Flip { at, xor }),
        // Digits, quotes and brackets are the bytes that change a JSON header's meaning.
        (
            any::<usize>(),
            prop::sample::select(b"0123456789\"{}[],:-eE.x \x00\xff".to_vec())
        )
            .prop_map(|(at, byte)| Edit::Set { at, byte }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        any::<usize>().prop_map(|keep| Edit::Truncate { keep }),
    ]
}

fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for e in edits {
        let n = bytes.len().max(1);
        match e {
            Edit::Flip { at, xor } => {
                if let Some(b) = bytes.get_mut(at % n) {
                    *b ^= xor;
                }
            }
            Edit::Set { at, byte } => {
                if let Some(b) = bytes.get_mut(at % n) {
                    *b = *byte;
                }
            }
            Edit::Insert { at, bytes: ins } => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, ins.iter().copied());
            }
            Edit::Truncate { keep } => bytes.truncate(keep % (bytes.len() + 1)),
        }
    }
    bytes
}

/// Edits that mostly land in the safetensors header (its first few hundred bytes), where a
/// change alters shapes, offsets and dtypes rather than tensor values.
fn header_edit() -> impl Strategy<Value = Edit> {
    edit().prop_map(|e| match e {
        Edit::Flip { at, xor } => Edit::Flip { at: at % 600, xor },
        Edit::Set { at, byte } => Edit::Set { at: at % 600, byte },
        other => other,
    })
}

/// Loads an adapter from the given file contents; if it loads, merges it with itself and
/// folds it into the demo base. Panics only if the code under test panics.
fn exercise(config: &[u8], weights: Option<&[u8]>) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(CONFIG_FILE), config).unwrap();
    if let Some(w) = weights {
        std::fs::write(tmp.path().join(WEIGHTS_FILE), w).unwrap();
    }
    let Ok(adapter) = Adapter::load(tmp.path()) else {
        return;
    };
    let Ok(library) = Library::new(vec![adapter.clone(), adapter]) else {
        return;
    };
    for mode in [Mode::Cat, Mode::Linear, Mode::Lorahub] {
        if let Ok(merged) = merge(&library, &[0.5, -0.25], mode) {
            let _ = fold_into_base(Path::new("base"), &seeds().base, &merged);
            let _ = merged.to_safetensors(StoreDtype::Bf16, Path::new("out"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_weights_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise(&seeds().config, Some(&bytes));
    }

    #[test]
    fn arbitrary_config_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise(&bytes, Some(&seeds().weights));
    }

    #[test]
    fn arbitrary_header_length_prefix(len in any::<u64>(), tail in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend(tail);
        exercise(&seeds().config, Some(&bytes));
    }

    #[test]
    fn mutated_weights(edits in prop::collection::vec(edit(), 1..6)) {
        exercise(&seeds().config, Some(&mutate(&seeds().weights, &edits)));
    }

    #[test]
    fn mutated_weights_header(edits in prop::collection::vec(header_edit(), 1..4)) {
        exercise(&seeds().config, Some(&mutate(&seeds().weights, &edits)));
    }

    #[test]
    fn mutated_config(edits in prop::collection::vec(edit(), 1..6)) {
        exercise(&mutate(&seeds().config, &edits), Some(&seeds().weights));
    }

    #[test]
    fn mutated_both_or_missing(
        config_edits in prop::collection::vec(edit(), 0..3),
        weight_edits in prop::collection::vec(edit(), 0..3),
        drop_weights in any::<bool>(),
    ) {
        let weights = mutate(&seeds().weights, &weight_edits);
        exercise(&mutate(&seeds().config, &config_edits), (!drop_weights).then_some(weights.as_slice()));
    }
}

#[test]
fn seeds_are_valid() {
    // Guards the fuzz targets against silently fuzzing an adapter that never loads.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(CONFIG_FILE), &seeds().config).unwrap();
    std::fs::write(tmp.path().join(WEIGHTS_FILE), &seeds().weights).unwrap();
    let adapter = Adapter::load(tmp.path()).unwrap();
    let library = Library::new(vec![adapter.clone(), adapter]).unwrap();
    let merged = merge(&library, &[0.5, -0.25], Mode::Cat).unwrap();
    fold_into_base(Path::new("base"), &seeds().base, &merged).unwrap();
}
