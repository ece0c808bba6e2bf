"""Data-parallel check on a machine with ≥ 2 GPUs: the tiny CLIP on a generated colour image folder,
trained once in one process and once with `magmax run --nproc 2` (NCCL); prints both accuracy
matrices and the largest weight difference. Usage: python3 bench/ddp_check.py OUT_DIR [DEVICE]"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from safetensors.torch import load_file

out = Path(sys.argv[1])
device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
root = out / "colours"
rng = np.random.default_rng(0)
colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220)]
for split, n in (("train", 64), ("test", 16)):
    for c, colour in enumerate(colours):
        folder = root / split / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def config(grad_accum: int) -> Path:
    cfg = {
        "name": "ddp-check", "seed": 3, "device": device,
        "data": {"name": "imagefolder", "root": str(root)},
        "scenario": {"kind": "class_incremental", "n_tasks": 3, "class_order": "random"},
        "backbone": {"kind": "clip", "tiny": True, "image_size": 32},
        "train": {"lr": 1e-3, "batch_size": 32, "grad_accum": grad_accum, "warmup_steps": 2, "steps": 12,
                  "precision": "fp32", "eval_batch_size": 16},
        "streams": [{"name": "seq", "merges": ["magmax"]}],
        "merges": [{"method": "magmax"}],
        "save_checkpoints": True,
    }
    path = out / f"cfg{grad_accum}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


runs = {"one": (config(2), 1), "two": (config(1), 2)}
for name, (cfg, nproc) in runs.items():
    cmd = [sys.executable, "-m", "magmax", "run", str(cfg), "--out", str(out / name), "--nproc", str(nproc)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
results = {n: json.loads((out / n / "results.json").read_text())["models"] for n in runs}
for model in results["one"]:
    print(model, "one process", results["one"][model]["rows"], "2 ranks", results["two"][model]["rows"])
worst = 0.0
for ckpt in sorted((out / "one" / "checkpoints").iterdir()):
    a, b = load_file(str(ckpt)), load_file(str(out / "two" / "checkpoints" / ckpt.name))
    worst = max(worst, max(float((a[k].float() - b[k].float()).abs().max()) for k in a))
print(f"largest |weight difference| over checkpoints: {worst:.3e}")
