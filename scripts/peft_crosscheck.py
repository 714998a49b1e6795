"""Cross-check `lora-compose merge` against PEFT itself (not run in CI).

Usage: python scripts/peft_crosscheck.py /path/to/lora-compose WORKDIR

1. PEFT creates and saves three adapters on a tiny torch model: mixed ranks (2, 5, 3 with a
   rank_pattern giving the `value` layers rank 4), different alphas (with an alpha_pattern),
   one rsLoRA adapter; B is random (init_lora_weights=False) so every ΔW is non-zero.
2. `lora-compose merge --mode cat` with weights (0.7, -1.3, 0.4); the merged adapter is loaded
   back into PEFT and its per-layer ΔW is compared with PEFT's own
   `add_weighted_adapter(..., combination_type="cat")` and with Σ w_i ΔW_i from PEFT's
   per-adapter `get_delta_weight`: max |Δ| ≤ 1e-5 · max |ref| per layer.
3. The same for `--mode linear` on three equal-rank adapters against PEFT's "linear".
4. `--base` folding against base W + PEFT's ΔW.
5. PEFT loads the crate's `demo-adapters` output (rank_pattern, alpha_pattern, rsLoRA) and
   its ΔW agrees with what the crate folds into the demo base model.
6. Records what PEFT's "cat" gives when the first adapter uses rsLoRA: PEFT copies
   use_rslora into the merged config, so its ΔW is √R times the product sum; ours is not.

Exits non-zero if any check fails.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

RTOL = 1e-5
failures = []


def check(name, got, want):
    peak = want.abs().max().item()
    err = (got - want).abs().max().item()
    ok = peak > 0 and err <= RTOL * peak
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max|Δ| {err:.3e}, max|ref| {peak:.3e}, rel {err / max(peak, 1e-30):.2e}")
    if not ok:
        failures.append(name)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)
        self.dense = nn.Linear(16, 24)

    def forward(self, x):
        return self.dense(self.query(x) + self.value(x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        return self.layers[1].dense(self.layers[0].query(x))


def lora_modules(model):
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def save_peft_adapters(base, configs, root, seed):
    dirs = []
    for i, cfg in enumerate(configs):
        torch.manual_seed(seed + i)
        peft_model = get_peft_model(copy.deepcopy(base), cfg)
        d = root / f"peft_{seed}_{i}"
        peft_model.save_pretrained(d)
        dirs.append(d)
    return dirs


def load_all(base, dirs):
    model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    return model


def run(binary, *args):
    res = subprocess.run([binary, *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"lora-compose {' '.join(map(str, args))} failed:\n{res.stderr}")
    print("  $ lora-compose " + " ".join(map(str, args)).replace(str(Path.cwd()) + "/", ""))


def merge_args(dirs, weights, mode, out):
    args = ["merge", "--mode", mode, "--weights", ",".join(map(str, weights)), "--out", out]
    for d in dirs:
        args += ["--adapter", d]
    return args


def compare_merge(binary, base, dirs, weights, mode, work):
    print(f"== {mode}: {len(dirs)} adapters, weights {weights}")
    ours = work / f"ours_{mode}"
    run(binary, *merge_args(dirs, weights, mode, ours))
    model = load_all(base, dirs)
    names = [f"a{i}" for i in range(len(dirs))]
    model.add_weighted_adapter(names, weights, "peft_merged", combination_type=mode)
    model.load_adapter(ours, adapter_name="ours")
    ours_cfg = json.loads((ours / "adapter_config.json").read_text())
    print(f"  ours: r={ours_cfg['r']} lora_alpha={ours_cfg['lora_alpha']}; "
          f"PEFT: r={model.peft_config['peft_merged'].r} lora_alpha={model.peft_config['peft_merged'].lora_alpha}")
    for path, m in sorted(lora_modules(model).items()):
        with torch.no_grad():
            peft_dw = m.get_delta_weight("peft_merged")
            ours_dw = m.get_delta_weight("ours")
            check(f"{mode} {path} vs PEFT add_weighted_adapter", ours_dw, peft_dw)
            if mode == "cat":
                product_sum = sum(w * m.get_delta_weight(n) for n, w in zip(names, weights))
                check(f"{mode} {path} vs Σ w_i ΔW_i", ours_dw, product_sum)
    return model


def main():
    binary, work = sys.argv[1], Path(sys.argv[2]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = Tiny()
    targets = ["query", "value", "dense"]

    mixed = [
        LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False),
        LoraConfig(r=5, lora_alpha=3, target_modules=targets, use_rslora=True, init_lora_weights=False),
        LoraConfig(r=3, lora_alpha=7, target_modules=targets, rank_pattern={"value": 4},
                   alpha_pattern={"value": 2}, init_lora_weights=False),
    ]
    dirs = save_peft_adapters(base, mixed, work, seed=1)
    weights = [0.7, -1.3, 0.4]
    model = compare_merge(binary, base, dirs, weights, "cat", work)

    print("== fold into base (--base)")
    base_file = work / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_file)
    folded_file = work / "folded.safetensors"
    run(binary, *merge_args(dirs, weights, "cat", folded_file), "--base", base_file)
    folded = load_file(folded_file)
    base_sd = base.state_dict()
    for path, m in sorted(lora_modules(model).items()):
        with torch.no_grad():
            want = base_sd[f"{path}.weight"] + m.get_delta_weight("peft_merged")
        check(f"fold {path}.weight", folded[f"{path}.weight"], want)
        assert torch.equal(folded[f"{path}.bias"], base_sd[f"{path}.bias"])

    equal_rank = [
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        LoraConfig(r=4, lora_alpha=3, target_modules=targets, use_rslora=True, init_lora_weights=False),
        LoraConfig(r=4, lora_alpha=1, target_modules=targets, init_lora_weights=False),
    ]
    lin_dirs = save_peft_adapters(base, equal_rank, work, seed=10)
    compare_merge(binary, base, lin_dirs, [0.6, -0.9, 0.3], "linear", work)

    print("== PEFT reads demo-adapters output (rank_pattern, alpha_pattern, rsLoRA)")
    demo = work / "demo"
    run(binary, "demo-adapters", demo, "--n", "4", "--seed", "3")
    demo_base = load_file(demo / "base_model.safetensors")
    demo_model = DemoModel(demo_base)
    demo_dirs = [demo / f"adapter_{i}" for i in range(4)]
    demo_weights = [0.5, -0.25, 1.0, 0.125]
    folded_demo = work / "demo_folded.safetensors"
    run(binary, *merge_args(demo_dirs, demo_weights, "cat", folded_demo), "--base", demo / "base_model.safetensors")
    folded = load_file(folded_demo)
    peft_demo = load_all(demo_model, demo_dirs)
    for path, m in sorted(lora_modules(peft_demo).items()):
        with torch.no_grad():
            dw = sum(w * m.get_delta_weight(f"a{i}") for i, w in enumerate(demo_weights))
        check(f"demo fold {path}", folded[f"{path}.weight"], demo_base[f"{path}.weight"] + dw)

    print("== PEFT cat with an rsLoRA adapter first (reported, not a failure)")
    rs_first = [mixed[1], mixed[0]]
    rs_dirs = save_peft_adapters(base, rs_first, work, seed=20)
    rs_model = load_all(base, rs_dirs)
    rs_model.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "peft_cat", combination_type="cat")
    cfg = rs_model.peft_config["peft_cat"]
    ours = work / "ours_rs_first"
    run(binary, *merge_args(rs_dirs, [1.0, 1.0], "cat", ours))
    rs_model.load_adapter(ours, adapter_name="ours")
    m = lora_modules(rs_model)["layers.0.query"]
    with torch.no_grad():
        ratio = (m.get_delta_weight("peft_cat").norm() / m.get_delta_weight("ours").norm()).item()
        ours_vs_sum = (m.get_delta_weight("ours") - m.get_delta_weight("a0") - m.get_delta_weight("a1")).abs().max().item()
    print(f"  PEFT merged config: r={cfg.r} lora_alpha={cfg.lora_alpha} use_rslora={cfg.use_rslora}; "
          f"|ΔW_PEFT| / |ΔW_ours| = {ratio:.4f} (√R = {cfg.r ** 0.5:.4f}); ours − Σ ΔW_i: {ours_vs_sum:.2e}")

    if failures:
        print(f"FAILED: {len(failures)} checks: {failures}")
        sys.exit(1)
    print("all checks passed")


class DemoModel(nn.Module):
    """Module tree with the demo adapters' paths (encoder.layer.N.attention.self.query, …)."""

    def __init__(self, state):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([nn.Module(), nn.Module()])
        for name, w in state.items():
            if not name.endswith(".weight"):
                continue
            parts = name.split(".")[:-1]
            parent = self
            for p in parts[:-1]:
                if p.isdigit():
                    parent = parent[int(p)]
                else:
                    if not hasattr(parent, p):
                        setattr(parent, p, nn.Module())
                    parent = getattr(parent, p)
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(state[name.removesuffix("weight") + "bias"])
            setattr(parent, parts[-1], lin)


if __name__ == "__main__":
    main()
