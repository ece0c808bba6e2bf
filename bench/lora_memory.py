"""Peak memory of `magmax merge` with LoRA adapters as inputs: it follows the largest tensor, not the model.

Builds a synthetic base (LAYERS float32 matrices of DIM×DIM, saved with safetensors) and T LoRA adapters
of it (rank 8 on every matrix, PEFT's file layout: adapter_config.json + adapter_model.safetensors),
then runs `magmax merge --base BASE ADAPTER… -o OUT` in a child process and reports its own peak RSS
(wait4, through magmax.memory.run_measured) for each number of layers.

    .venv/bin/python bench/lora_memory.py                      # 32 and 256 layers of 1024² (128 MB, 1 GB)
    .venv/bin/python bench/lora_memory.py --layers 16,64 --dim 512

Not a test: a minute of CPU and (2 × the largest size) of disk under a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import safetensors.torch as st
import torch

from magmax.memory import format_bytes, run_measured

CHILD = "import sys; from magmax.cli import main; sys.exit(main(sys.argv[1:]))"


def build(folder: Path, layers: int, dim: int, tasks: int, rank: int = 8) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    base = folder / "base.safetensors"
    st.save_file({f"layers.{i}.weight": torch.randn(dim, dim, generator=g) for i in range(layers)}, base)
    adapters = []
    for t in range(tasks):
        adapter = folder / f"adapter{t}"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["layers"]})
        )
        factors = {}
        for i in range(layers):
            factors[f"base_model.model.layers.{i}.lora_A.weight"] = torch.randn(rank, dim, generator=g)
            factors[f"base_model.model.layers.{i}.lora_B.weight"] = torch.randn(dim, rank, generator=g)
        st.save_file(factors, adapter / "adapter_model.safetensors")
        adapters.append(adapter)
    return base, adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="32,256", help="comma-separated numbers of layers")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tasks", type=int, default=2)
    args = parser.parse_args()
    for layers in (int(x) for x in args.layers.split(",")):
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            base, adapters = build(folder, layers, args.dim, args.tasks)
            run = run_measured([sys.executable, "-c", CHILD, "merge", "--base", str(base), *map(str, adapters),
                                "-o", str(folder / "out")])
            if run.returncode != 0:
                raise SystemExit(run.stderr)
            size = layers * args.dim * args.dim * 4
            print(f"{layers} layers of {args.dim}² ({format_bytes(size)} per model), T={args.tasks}: "
                  f"peak RSS {format_bytes(run.peak_rss_bytes)}")


if __name__ == "__main__":
    main()
