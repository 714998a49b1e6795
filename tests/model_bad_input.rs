//! Bad inputs give typed errors that name what is wrong, never a panic: missing, misnamed and
//! mis-shaped tensors, a config that does not fit the weights, empty and over-long texts,
//! invalid UTF-8, bad batches, bad libraries and checkpoints. Uses a tiny BERT written here
//! (config.json, model.safetensors, a WordPiece tokenizer.json), so it needs no assets.

use std::path::Path;

use lora_compose::compose::{Mode, Param};
use lora_compose::model::bert::{load_bert, Encoder};
use lora_compose::model::cli::{read_texts, run_embed, EmbedArgs};
use lora_compose::model::{checkpoint, Batch, Composition, Config, Library, LoraModule, Model};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn tiny() -> Config {
    Config {
        hidden: 8,
        layers: 2,
        heads: 2,
        intermediate: 16,
        max_positions: 12,
        vocab_size: 12,
        ..Config::minilm(0)
    }
}

const VOCAB: [&str; 12] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "##s", ".", "a",
];

fn tokenizer_json() -> String {
    let vocab: Vec<String> = VOCAB.iter().enumerate().map(|(i, t)| format!("\"{t}\": {i}")).collect();
    format!(
        r###"{{"version": "1.0", "truncation": {{"max_length": 4, "strategy": "LongestFirst", "stride": 0}},
 "padding": {{"strategy": {{"Fixed": 8}}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}},
 "added_tokens": [],
 "normalizer": {{"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true}},
 "pre_tokenizer": {{"type": "BertPreTokenizer"}},
 "post_processor": {{"type": "TemplateProcessing",
   "single": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}],
   "pair": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 1}}}}],
   "special_tokens": {{"[CLS]": {{"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}}, "[SEP]": {{"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}}}}},
 "decoder": null,
 "model": {{"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": {{{}}}}}}}"###,
        vocab.join(", ")
    )
}

fn config_json(hidden: usize) -> String {
    format!(
        r#"{{"hidden_size": {hidden}, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
 "max_position_embeddings": 12, "vocab_size": 12, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
 "hidden_act": "gelu", "model_type": "bert"}}"#
    )
}

/// Writes the base weights of `model`, after `edit` may drop, rename or reshape entries.
fn write_weights(model: &Model<f32>, path: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let mut ts: Vec<(String, Vec<usize>, Vec<u8>)> = model
        .params()
        .into_iter()
        .map(|p| (p.name, p.shape, p.data.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    edit(&mut ts);
    let views: Vec<(String, TensorView)> = ts
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn model_dir(edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::<f32>::init(tiny(), 1).unwrap();
    write_weights(&model, &dir.path().join("model.safetensors"), edit);
    std::fs::write(dir.path().join("config.json"), config_json(8)).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json()).unwrap();
    dir
}

fn err_of<T>(r: lora_compose::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_good_tiny_model_loads_and_embeds() {
    let dir = model_dir(|_| {});
    let enc = Encoder::load(dir.path()).unwrap();
    // The file's truncation (4) and padding (8) are off.
    let (ids, cut) = enc.tokenize(&["The cats sat on the mat.".into()], 12).unwrap();
    assert_eq!(ids[0], vec![2, 4, 5, 9, 6, 7, 4, 8, 10, 3]);
    assert!(cut.is_empty());
    let out = enc.embed(&["the cat".into(), "a mat".into()], 12, 8).unwrap();
    for v in &out.vectors {
        assert_eq!(v.len(), 8);
        assert!((v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn missing_misnamed_and_misshaped_tensors_are_named() {
    let victim = "encoder.layer.1.output.dense.weight";
    let dir = model_dir(|ts| ts.retain(|t| t.0 != victim));
    let e = err_of(load_bert(dir.path(), 0, 0));
    assert!(e.contains(victim) && e.contains("missing"), "{e}");

    let dir = model_dir(|ts| ts.iter_mut().for_each(|t| t.0 = format!("bert.{}", t.0)));
    let e = err_of(load_bert(dir.path(), 0, 0));
    assert!(e.contains("bert.") && e.contains("prefix"), "{e}");

    let dir = model_dir(|ts| {
        let t = ts.iter_mut().find(|t| t.0 == victim).unwrap();
        t.1 = vec![16, 8];
    });
    let e = err_of(load_bert(dir.path(), 0, 0));
    assert!(
        e.contains(victim) && e.contains("[16, 8]") && e.contains("[8, 16]"),
        "{e}"
    );
}

#[test]
fn a_config_that_does_not_fit_the_weights_is_named() {
    let dir = model_dir(|_| {});
    std::fs::write(dir.path().join("config.json"), config_json(16)).unwrap();
    let e = err_of(load_bert(dir.path(), 0, 0));
    assert!(
        e.contains("embeddings.word_embeddings.weight") && e.contains("config.json"),
        "{e}"
    );
    assert!(e.contains("[12, 8]") && e.contains("[12, 16]"), "{e}");

    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 8").unwrap();
    assert!(err_of(load_bert(dir.path(), 0, 0)).contains("malformed JSON"));
    std::fs::write(
        dir.path().join("config.json"),
        config_json(8).replace("\"gelu\"", "\"relu\""),
    )
    .unwrap();
    assert!(err_of(load_bert(dir.path(), 0, 0)).contains("relu"));
    std::fs::write(dir.path().join("model.safetensors"), b"not a safetensors file").unwrap();
    std::fs::write(dir.path().join("config.json"), config_json(8)).unwrap();
    assert!(err_of(load_bert(dir.path(), 0, 0)).contains("malformed safetensors"));
    assert!(err_of(Encoder::load(Path::new("/nonexistent/minilm"))).contains("/nonexistent/minilm"));
}

#[test]
fn empty_long_and_invalid_texts() {
    let dir = model_dir(|_| {});
    let enc = Encoder::load(dir.path()).unwrap();
    let e = err_of(enc.embed(&["the cat".into(), "   ".into()], 12, 4));
    assert!(e.contains("text 1 is empty"), "{e}");
    // Longer than the 12 positions: cut to [CLS] + 10 pieces + [SEP], reported.
    let long = "the cat sat on the mat ".repeat(4);
    let out = enc.embed(std::slice::from_ref(&long), 12, 4).unwrap();
    assert_eq!(out.truncated, vec![(0, 26)]);
    let (ids, _) = enc.tokenize(&[long], 12).unwrap();
    assert_eq!(ids[0].len(), 12);
    assert_eq!(*ids[0].last().unwrap(), 3);
    assert!(err_of(enc.tokenize(&["x".into()], 13)).contains("12 positions"));

    let file = dir.path().join("texts.txt");
    std::fs::write(&file, b"the cat\na mat\n\xff\xfe bad\n").unwrap();
    let e = err_of(read_texts(&file));
    assert!(
        e.contains("invalid UTF-8") && e.contains("line 3") && e.contains("texts.txt"),
        "{e}"
    );
    let args = EmbedArgs {
        model: dir.path().into(),
        texts: vec![],
        files: vec![file],
        max_tokens: 12,
        batch_size: 4,
        device: lora_compose::compose::layer::DeviceArg::CPU,
    };
    assert!(err_of(run_embed(args.clone())).contains("invalid UTF-8"));
    let e = err_of(run_embed(EmbedArgs { files: vec![], ..args }));
    assert!(e.contains("nothing to embed"), "{e}");
}

#[test]
fn bad_batches_libraries_and_checkpoints() {
    let model = Model::<f32>::init(tiny(), 1).unwrap();
    assert!(err_of(Batch::tokens(&[vec![2u32, 3], vec![]])).contains("sequence 1"));
    assert!(err_of(model.encode(&Batch::tokens(&[vec![2u32, 99]]).unwrap())).contains("token id 99"));
    let long: Vec<u32> = vec![4; 13];
    assert!(err_of(model.encode(&Batch::tokens(&[long]).unwrap())).contains("12 positions"));

    let comp = Composition {
        mode: Mode::Factor,
        param: Param::Softmax,
        global: false,
    };
    let module = |r: usize, d_in: usize, d_out: usize| LoraModule {
        a: vec![0.1; r * d_in],
        b: vec![0.1; d_out * r],
        scale: 1.0,
    };
    let mut m = model.clone();
    let lib: Library = [(
        "encoder.layer.0.attention.self.qurey".to_string(),
        vec![module(2, 8, 8)],
    )]
    .into();
    assert!(err_of(m.attach_composition(&lib, comp)).contains("qurey"));
    let lib: Library = [("encoder.layer.0.intermediate.dense".to_string(), vec![module(2, 16, 8)])].into();
    let e = err_of(m.attach_composition(&lib, comp));
    assert!(e.contains("intermediate.dense") && e.contains("d_in 8"), "{e}");
    let lib: Library = [(
        "encoder.layer.0.attention.self.query".to_string(),
        vec![module(2, 8, 8), module(3, 8, 8)],
    )]
    .into();
    assert!(err_of(m.attach_composition(&lib, comp)).contains("equal ranks"));
    assert!(err_of(m.attach_lora(&["quary"], 2, 4.0, 0)).contains("quary"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    write_weights(&model, &path, |_| {});
    assert!(err_of(checkpoint::load(&mut m, &path)).contains("not a lora-compose checkpoint"));
    assert!(err_of(checkpoint::load(&mut m, &dir.path().join("none.safetensors"))).contains("none.safetensors"));
}
