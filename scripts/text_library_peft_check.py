"""Loads every module of the text library into PEFT on all-MiniLM-L6-v2's `BertModel`.

Usage: python scripts/text_library_peft_check.py assets/minilm data/text-library

Runs in the venv of scripts/peft-crosscheck.sh (torch, peft, transformers; no GPU, no
network: the model comes from assets/minilm, see scripts/fetch-minilm.sh). For each adapter
directory: `PeftModel.from_pretrained` on a fresh `BertModel`, then
1. PEFT's own state dict of the adapter has exactly the file's tensor names (nothing
   ignored, nothing missing), and it adapted exactly the layers the file names;
2. each adapted layer's `get_delta_weight` equals (alpha / r) · B · A from the file:
   max |Δ| ≤ 1e-6 · max |ref|;
3. the adapted model's mean-pooled embedding of a sentence differs from the base model's
   (the adapter is live, not silently dropped).
Exits non-zero if any check fails.
"""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertModel

model_dir, lib = sys.argv[1], Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(model_dir)
batch = tok(["the flight was late again and nobody told us why"], return_tensors="pt")
failures = []


def embed(model):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


base_emb = embed(BertModel.from_pretrained(model_dir).eval())
dirs = sorted(p for p in lib.iterdir() if (p / "adapter_config.json").exists())
for d in dirs:
    cfg = json.loads((d / "adapter_config.json").read_text())
    file_sd = load_file(str(d / "adapter_model.safetensors"))
    pm = PeftModel.from_pretrained(BertModel.from_pretrained(model_dir), str(d)).eval()
    peft_sd = get_peft_model_state_dict(pm)
    if set(peft_sd) != set(file_sd):
        failures.append(f"{d.name}: PEFT's tensors {sorted(set(peft_sd) ^ set(file_sd))} differ from the file's")
    scale = cfg["lora_alpha"] / cfg["r"]
    adapted = 0
    worst = 0.0
    for name, mod in pm.named_modules():
        if not (hasattr(mod, "lora_A") and "default" in mod.lora_A):
            continue
        adapted += 1
        key = name.removeprefix("base_model.model.")
        if f"base_model.model.{key}.lora_A.weight" not in file_sd:
            failures.append(f"{d.name}: PEFT adapted {key}, which the file has no tensors for")
            continue
        a = file_sd[f"base_model.model.{key}.lora_A.weight"].float()
        b = file_sd[f"base_model.model.{key}.lora_B.weight"].float()
        want = scale * (b @ a)
        got = mod.get_delta_weight("default").float()
        err = (got - want).abs().max().item()
        worst = max(worst, err / max(want.abs().max().item(), 1e-30))
        if err > 1e-6 * want.abs().max().item():
            failures.append(f"{d.name}: {key}: ΔW differs by {err:.3e}")
    if adapted * 2 != len(file_sd):
        failures.append(f"{d.name}: PEFT adapted {adapted} layers, the file has {len(file_sd) // 2}")
    moved = (embed(pm) - base_emb).abs().max().item()
    if moved == 0.0:
        failures.append(f"{d.name}: the adapter does not change the embedding")
    acc = cfg.get("lora_compose", {}).get("test_accuracy")
    print(f"{d.name:<20} layers {adapted}  max rel ΔW error {worst:.1e}  embedding moved {moved:.3e}  own-task acc {acc}")

print(f"{len(dirs)} adapters checked; {len(failures)} failures")
for f in failures:
    print("FAIL", f)
sys.exit(1 if failures or not dirs else 0)
