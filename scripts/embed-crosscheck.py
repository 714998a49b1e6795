#!/usr/bin/env python3
"""Cross-checks `lora-compose embed` against an independent reference of all-MiniLM-L6-v2.

The reference is sentence-transformers' computation (BertModel -> mean over real tokens ->
L2 normalise) written out in numpy, in float64, from the same model.safetensors; tokens come
from Hugging Face's `tokenizers` on the same tokenizer.json, truncated at 512 tokens as
sentence-transformers' Transformer module does with max_seq_length = 512. (No CPU build of
torch installs from PyPI without its CUDA dependencies, so torch is not used.)

When sentence-transformers (with torch) is importable, the same texts are also embedded by
sentence-transformers itself — Transformer(max_seq_length) -> Pooling(mean) -> Normalize, the
all-MiniLM-L6-v2 pipeline, built from the same local files — at max_seq_length 512 (our
default) and 256 (sentence-transformers' own setting for this model, our `--max-tokens 256`).

Usage: embed-crosscheck.py BINARY MODEL_DIR  -> prints cosines; exits 1 if any is < 0.9999.
"""
import json
import math
import struct
import subprocess
import sys
import tempfile

import numpy as np
from tokenizers import Tokenizer

MAX_TOKENS = 512
THRESHOLD = 0.9999

SHORT = [
    "Hi.",
    "ok",
    "A",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The quick brown fox jumps over the lazy dog!",
    "Café au lait, naïve résumé, and a jalapeño: ¿qué tal?",
    "In 1969, Apollo 11 landed on the Moon at 20:17 UTC; 600 million people watched.",
    "E-mail me at someone@example.com or visit https://example.com/path?q=1.",
    "Transformers use self-attention to weigh every token against every other token.",
    "I can't believe it's not butter -- said nobody, ever.",
    "    leading and trailing spaces    ",
    "UPPER CASE TEXT IS LOWERCASED BY THE TOKENIZER",
    "Low-rank adapters compose: W + sum_i c_i s_i B_i A_i.",
    "北京是中国的首都。",
]

PARAGRAPH = (
    "Parameter-efficient fine-tuning adapts a large pretrained network to a new task by "
    "training only a small number of extra weights, while the original weights stay frozen. "
    "Low-rank adaptation, for instance, adds the product of two thin matrices to each chosen "
    "layer, so a module costs a few thousand numbers instead of millions. Because thousands of "
    "such modules already exist, one can ask whether combining them helps when a new task "
    "offers only a handful of labelled examples. Averaging their products with equal weights "
    "is cheap and surprisingly strong; learning one weight per module and layer is stronger "
    "still when the modules come from related tasks. "
)


def long_text(tok, target):
    """English text of exactly `target` tokens including [CLS] and [SEP] (or just over)."""
    words = (PARAGRAPH * 20).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix of words with at most `target` tokens
        mid = (lo + hi + 1) // 2
        if len(tok.encode(" ".join(words[:mid])).ids) <= target:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"]).astype(np.float64)
    return out


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def bert_embed(W, cfg, ids):
    """One unpadded sequence -> unit sentence embedding (float64)."""
    d, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    dh = d // heads
    t = len(ids)
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:t]
    x = x + W["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    lin = lambda v, name: v @ W[name + ".weight"].T + W[name + ".bias"]
    for l in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{l}."
        q = lin(x, p + "attention.self.query").reshape(t, heads, dh).transpose(1, 0, 2)
        k = lin(x, p + "attention.self.key").reshape(t, heads, dh).transpose(1, 0, 2)
        v = lin(x, p + "attention.self.value").reshape(t, heads, dh).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(1, 0, 2).reshape(t, d)
        x = layer_norm(x + lin(ctx, p + "attention.output.dense"), W[p + "attention.output.LayerNorm.weight"],
                       W[p + "attention.output.LayerNorm.bias"], eps)
        f = lin(gelu(lin(x, p + "intermediate.dense")), p + "output.dense")
        x = layer_norm(x + f, W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"], eps)
    e = x.mean(0)
    return e / max(np.linalg.norm(e), 1e-12)


def embed(binary, model_dir, texts, extra=()):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write("\n".join(texts) + "\n")
        path = f.name
    run = subprocess.run([binary, "embed", "--model", model_dir, "--file", path, *extra], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"embed failed:\n{run.stderr}")
    got = [np.array(json.loads(line)) for line in run.stdout.splitlines()]
    assert len(got) == len(texts), f"{len(got)} embeddings for {len(texts)} texts"
    return got, run.stderr


def against_sentence_transformers(binary, model_dir, texts):
    """Min cosine per max_seq_length, or None when sentence-transformers is not installed."""
    try:
        from sentence_transformers import SentenceTransformer, models
    except ImportError:
        print("sentence-transformers not installed: checked against the numpy reference only")
        return None
    import sentence_transformers
    import torch

    worst = []
    for max_len in (512, 256):
        word = models.Transformer(model_dir, max_seq_length=max_len)
        pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
        st = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
        ref = st.encode(texts, batch_size=8, convert_to_numpy=True).astype(np.float64)
        got, _ = embed(binary, model_dir, texts, ["--max-tokens", str(max_len)])
        cos = [float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r))) for g, r in zip(got, ref)]
        print(f"sentence-transformers {sentence_transformers.__version__} (torch {torch.__version__}), "
              f"max_seq_length {max_len}: {len(cos)} texts, min cosine {min(cos):.9f} "
              f"(1-cos {1 - min(cos):.2e}), max {max(cos):.9f}")
        worst.append(min(cos))
    return min(worst)


def main():
    binary, model_dir = sys.argv[1], sys.argv[2]
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tok.no_padding()
    tok.no_truncation()
    texts = SHORT + [long_text(tok, n) for n in (128, 300, 480, 510, 512)] + [PARAGRAPH * 6]
    tok.enable_truncation(max_length=MAX_TOKENS)

    got, stderr = embed(binary, model_dir, texts)
    if stderr:
        print(stderr.strip())

    W = load_safetensors(f"{model_dir}/model.safetensors")
    cfg = json.load(open(f"{model_dir}/config.json"))
    cos = []
    for text, g in zip(texts, got):
        ids = tok.encode(text).ids
        ref = bert_embed(W, cfg, ids)
        c = float(g @ ref / np.linalg.norm(g))
        cos.append(c)
        print(f"1-cos {1 - c:9.2e}  {len(ids):4d} tokens  {text[:60]!r}")
    print(f"{len(cos)} texts: min cosine {min(cos):.12f} (1-cos {1 - min(cos):.2e}), "
          f"max {max(cos):.12f} (threshold {THRESHOLD})")
    st_worst = against_sentence_transformers(binary, model_dir, texts)
    ok = min(cos) >= THRESHOLD and (st_worst is None or st_worst >= THRESHOLD)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
