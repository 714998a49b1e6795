"""PyTorch beside lora-compose on the same CPU work, alternating, as ratios.

Run through scripts/torch-peer.sh (it installs torch into an ignored venv and builds the
`cpu-peer` binary). Each round times every work once on each side: ours in a `cpu-peer`
subprocess, PyTorch in this process, with the same shapes, the same data and the same number
of threads, so that a noisy shared machine slows both alike. The table gives the median over
rounds of each side's per-round median and the ratio torch / ours (> 1: ours is faster).

Works (the same definitions as src/bin/cpu-peer.rs):
  gemm 1024                 1024³ f32 GEMM: the machine's ceiling on each side
  compose-fwd T D N R       y = x Wᵀ + b + ((x A_catᵀ) ∘ d) B_catᵀ, d_j = c_i s_i (product mode,
                            one coefficient row), under no_grad
  compose-fwdbwd T D N R    the same with ∂x and ∂c (W, b, A, B frozen), y.backward(g)
  vit-step                  tiny ViT (28×28, 7×7 patches, width 64, 4 pre-LN blocks, 4 heads,
                            MLP 256, exact GELU), batch 128, every parameter trains, AdamW(wd 0.01)
  embed                     all-MiniLM-L6-v2 sentence embeddings of 128 texts of 122 tokens,
                            batch 16: sentence-transformers' encode vs `Encoder::embed`
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

COMPOSE_SHAPES = [(16, 768, 8, 16), (256, 768, 32, 16), (2048, 384, 64, 8)]


def timed(secs, min_reps, fn):
    fn()
    start, times = time.perf_counter(), []
    while len(times) < min_reps or time.perf_counter() - start < secs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.rand(*shape, generator=g) * 2 - 1


def gemm_work(n):
    r = gen(1)
    a, b = r(n, n), r(n, n)
    out = torch.empty(n, n)
    return lambda: torch.mm(a, b, out=out), 2.0 * n**3


def compose_work(t, d, n, rank, backward):
    r = gen(7)
    a_cat, b_cat = r(n * rank, d), r(d, n * rank)
    w, bias, x, gy = r(d, d), r(d), r(t, d), r(t, d)
    scales = torch.full((n,), 2.0)
    c = torch.full((n,), 1.0 / n)

    def layer(x, c):
        dvec = (c * scales).repeat_interleave(rank)
        return F.linear(x, w, bias) + F.linear(F.linear(x, a_cat) * dvec, b_cat)

    flops = 2.0 * t * d * d + 4.0 * t * d * n * rank
    if not backward:
        def fwd():
            with torch.no_grad():
                layer(x, c)
        return fwd, flops

    xg, cg = x.clone().requires_grad_(), c.clone().requires_grad_()

    def fwdbwd():
        xg.grad, cg.grad = None, None
        layer(xg, cg).backward(gy)
    return fwdbwd, 2 * flops


class Block(nn.Module):
    def __init__(self, d, heads, f):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(ctx.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyVit(nn.Module):
    def __init__(self, width=64, layers=4, heads=4, labels=10, side=28, patch=7):
        super().__init__()
        self.patch, self.n = patch, (side // patch) ** 2
        self.proj = nn.Linear(patch * patch, width)
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.Parameter(torch.randn(self.n + 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, 4 * width) for _ in range(layers))
        self.ln = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, labels)

    def forward(self, px):
        b, p = px.shape[0], self.patch
        patches = px.view(b, 28 // p, p, 28 // p, p).permute(0, 1, 3, 2, 4).reshape(b, self.n, p * p)
        x = torch.cat([self.cls.expand(b, 1, -1), self.proj(patches)], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x)[:, 0])


def vit_work():
    torch.manual_seed(0)
    model = TinyVit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    px = torch.rand(128, 28, 28)
    labels = torch.arange(128) % 10

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(px), labels).backward()
        opt.step()
    return step, 0.0


def make_texts(model_dir, path):
    """128 texts of exactly 122 tokens ([CLS] + 120 + [SEP]) from whole words of the vocab."""
    from tokenizers import Tokenizer
    import random

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    # The file pads every encoding to 128 tokens: counted with padding, no text would ever fit.
    tok.no_padding()
    tok.no_truncation()
    words = [w.strip() for w in open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8")]
    words = [w for w in words if w.isalpha() and w.isascii() and len(w) > 2]
    rng, texts = random.Random(5), []
    while len(texts) < 128:
        text, n = "", 2
        while n < 122:
            cand = (text + " " + rng.choice(words)).strip()
            m = len(tok.encode(cand).ids)
            if m <= 122:
                text, n = cand, m
        texts.append(text)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps(t) + "\n")
    return texts


def embed_work(model_dir, texts):
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(model_dir, max_seq_length=512)
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    st = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
    return lambda: st.encode(texts, batch_size=16, convert_to_numpy=True), 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True, help="the cpu-peer binary")
    ap.add_argument("--minilm", help="all-MiniLM-L6-v2 directory (skips `embed` when absent)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="work names to run (default: all)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    tmp = tempfile.mkdtemp()
    works = [("gemm 1024", lambda: gemm_work(1024))]
    for s in COMPOSE_SHAPES:
        works.append(("compose-fwd " + " ".join(map(str, s)), lambda s=s: compose_work(*s, False)))
        works.append(("compose-fwdbwd " + " ".join(map(str, s)), lambda s=s: compose_work(*s, True)))
    works.append(("vit-step", vit_work))
    extra = {}
    if args.minilm and os.path.exists(os.path.join(args.minilm, "model.safetensors")):
        texts_path = os.path.join(tmp, "texts.jsonl")
        texts = make_texts(args.minilm, texts_path)
        works.append(("embed", lambda: embed_work(args.minilm, texts)))
        extra["embed"] = ["embed", args.minilm, texts_path]
    if args.only:
        works = [w for w in works if w[0].split()[0] in args.only or w[0] in args.only]

    built = {name: make() for name, make in works}
    ours, theirs = {n: [] for n, _ in works}, {n: [] for n, _ in works}
    for rnd in range(args.rounds):
        for name, _ in works:
            cmd = [args.ours, "--secs", str(args.secs)] + extra.get(name, name.split())
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            ours[name].append(json.loads(out.strip().splitlines()[-1])["median_s"])
            fn, _ = built[name]
            theirs[name].append(timed(args.secs, 5, fn))
            print(f"round {rnd + 1}/{args.rounds} {name}: ours {ours[name][-1] * 1e3:.3f} ms, "
                  f"torch {theirs[name][-1] * 1e3:.3f} ms", file=sys.stderr, flush=True)

    print(f"\ntorch {torch.__version__}, {args.threads} threads, {args.rounds} alternating rounds, "
          f"medians of medians")
    print("| work | ours | PyTorch | ratio (torch / ours) | ours GFLOP/s | of our GEMM ceiling |")
    print("|---|---|---|---|---|---|")
    ceiling = 2.0 * 1024**3 / statistics.median(ours["gemm 1024"]) if "gemm 1024" in ours else None
    for name, _ in works:
        o, t = statistics.median(ours[name]), statistics.median(theirs[name])
        flops = built[name][1]
        gf = f"{flops / o / 1e9:.1f}" if flops else "–"
        frac = f"{100 * (flops / o) / ceiling:.0f}%" if flops and ceiling else "–"
        print(f"| {name} | {o * 1e3:.3f} ms | {t * 1e3:.3f} ms | {t / o:.2f} | {gf} | {frac} |")


if __name__ == "__main__":
    main()
