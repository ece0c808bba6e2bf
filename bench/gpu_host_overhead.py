"""Host-side cost of one multi-tensor GPU fold call, measurable without a GPU.

Runs ``method.merge_tensors`` over ViT-B/16-shaped task vectors (in memory, all T in one group) with the
Triton launch replaced by a no-op, in Triton's interpreter mode on CPU tensors: what remains is the
host's work per call (each input's address, dtype, device, contiguity and length looked up, tables built).
On a GPU this overlaps with the kernels chunk by chunk; it bounds how close a call can get to the floor.

    .venv/bin/python bench/gpu_host_overhead.py [--tasks 10] [--methods magmax,average,random] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["MAGMAX_TRITON_INTERPRET"] = "1"
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import merge_bench  # noqa: E402

from magmax.merging import create_method  # noqa: E402
from magmax.merging.backends.gpu import triton as _gpu  # noqa: E402
from magmax.merging.base import TaskSlices  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid: object) -> object:
        return lambda *args, **kwargs: None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--methods", default="magmax,average,random")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    shapes = merge_bench.vit_b16_visual_shapes()
    inputs = merge_bench.build_inputs(shapes, 2, torch.device("cpu"))
    taus = inputs.taus(args.tasks)
    keys = list(taus[0])
    _gpu._kernels().fold_segments = _NoLaunch()
    print(f"# {len(keys)} tensors × {args.tasks} task vectors = {len(keys) * args.tasks} inputs; "
          f"median of {args.repeats} calls, Triton launch replaced by a no-op")
    for name in args.methods.split(","):
        method = create_method(name)
        seconds = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            method.merge_tensors(keys, [TaskSlices.from_list(key, [tau[key] for tau in taus]) for key in keys])
            seconds.append(time.perf_counter() - began)
        assert _gpu.enabled()
        print(f"{name:10s} {statistics.median(seconds) * 1e3:6.2f} ms per call")


if __name__ == "__main__":
    main()
