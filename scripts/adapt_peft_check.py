"""Checks `lora-compose adapt`'s output with PEFT and transformers, end to end.

Usage: python scripts/adapt_peft_check.py MODEL_DIR OUT_DIR TEST.jsonl

MODEL_DIR: the BERT directory given to `adapt --model` (e.g. assets/minilm); OUT_DIR: its
`--out`; TEST.jsonl: its `--test` file. Runs in the venv of scripts/peft-crosscheck.sh (torch,
peft, transformers; no GPU, no network). For every method in `heads.safetensors`:
1. its composed adapter (if any) loads into PEFT on a fresh `BertModel`, and PEFT's state dict
   of it holds exactly the file's tensors (nothing ignored, nothing missing);
2. the head applied to the mean-pooled last hidden states (real tokens only) of the PEFT
   model gives, on the test file, the accuracy that `results.json` reports for the method —
   the same count of correct texts, or one fewer / more where the top two logits of a text
   are within 1e-4 (f32 rounding of two implementations).
Exits non-zero if any check fails.
"""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertModel

model_dir, out, test_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
rows = [json.loads(line) for line in test_path.read_text().splitlines() if line.strip()]
with safe_open(str(out / "heads.safetensors"), "pt") as f:
    meta = f.metadata()
    heads = {k: f.get_tensor(k) for k in f.keys()}
classes = json.loads(meta["classes"])
on = json.loads(meta["adapters"])
labels = torch.tensor([classes.index(r["label"]) for r in rows])
results = {r["method"]: r for r in json.loads((out / "results.json").read_text())["results"]}
names = {"head": "Head", "uniform": "Uniform", "learned": "Learned", "soups": "Soups", "lorahub": "Lorahub"}
tok = AutoTokenizer.from_pretrained(model_dir)
batch = tok([r["text"] for r in rows], return_tensors="pt", padding=True)
failures = []
for method, adapter in sorted(on.items()):
    model = BertModel.from_pretrained(model_dir)
    if adapter:
        d = out / adapter
        model = PeftModel.from_pretrained(model, str(d))
        file_sd = load_file(str(d / "adapter_model.safetensors"))
        peft_sd = get_peft_model_state_dict(model)
        if set(peft_sd) != set(file_sd):
            failures.append(f"{method}: PEFT's tensors differ from the file's: {sorted(set(peft_sd) ^ set(file_sd))}")
    model.eval()
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1)
    logits = pooled @ heads[f"{method}.weight"].T + heads[f"{method}.bias"]
    correct = int((logits.argmax(1) == labels).sum())
    top2 = logits.topk(2, dim=1).values
    close = int(((top2[:, 0] - top2[:, 1]).abs() < 1e-4).sum())
    want = round(results[names[method]]["accuracy"] * len(rows))
    ok = abs(correct - want) <= close
    print(f"{method:<8} adapter {adapter or '-':<8} PEFT+head {correct}/{len(rows)}, lora-compose {want}/{len(rows)}"
          f"{'' if ok else '  MISMATCH'}")
    if not ok:
        failures.append(f"{method}: {correct} correct through PEFT, {want} in results.json")
print(f"{len(on)} heads checked; {len(failures)} failures")
for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)
