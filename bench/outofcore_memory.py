"""Peak memory of `magmax merge` out of core: it follows the largest tensor, not the models' number or size.

Builds synthetic safetensors checkpoints (a base and T fine-tuned models, each SIZE GB of float32
tensors of --tensor-mb MB) and merges them with `magmax merge` in a child process whose virtual
memory is capped (RLIMIT_AS, i.e. `ulimit -v`) below the size of ONE model for the larger sizes, let
alone the T+1 models read. The child's own peak RSS (wait4, through a small launcher) is reported.

The cap: torch reserves address space it never touches, so the cap is not "RAM in use". By default
the bench finds the smallest cap (in 64 MB steps) under which the smallest configuration merges, adds
25% headroom, and runs EVERY configuration under that one cap. `--limit 3GB` sets it instead;
`--limit none` runs without one.

    .venv/bin/python bench/outofcore_memory.py                       # sizes 0.5 and 2 GB, T = 2 and 8
    .venv/bin/python bench/outofcore_memory.py --sizes 0.1 --tasks 2,4 --tensor-mb 4   # a quick look
    .venv/bin/python bench/outofcore_memory.py --method consensus --sizes 0.5 --tasks 2,8,16

Needs (max T + 1) × SIZE of free disk per size (22.5 GB for the defaults) under --workdir; the files
are deleted at the end unless --keep. Not a test: minutes of CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from magmax.checkpoints import SafetensorsReader, ShardedSafetensorsWriter
from magmax.engine import TensorMeta
from magmax.memory import ChildRun, format_bytes, run_measured
from magmax.merge_config import parse_byte_size

CHILD_TIMEOUT_S = 300.0
CHILD = "import sys; from magmax.cli import main; sys.exit(main(sys.argv[1:]))"


def write_model(path: Path, tensors: int, numel: int, model: int) -> None:
    """Model 0 is the base; model m > 0 is the base plus small noise. Streamed, one tensor in memory."""
    entries = [(f"block{i}.weight", TensorMeta((numel,), torch.float32)) for i in range(tensors)]
    if path.exists():
        with SafetensorsReader(path) as kept:  # from an earlier --keep run: reuse if it has this layout
            if [(k, kept.meta(k)) for k in kept.keys()] == entries:
                return
    part = path.with_name(path.name + ".part")
    part.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(part, entries)
    for i, (key, _) in enumerate(entries):
        tensor = torch.randn(numel, generator=torch.Generator().manual_seed(i))
        if model:
            noise = torch.rand(numel, generator=torch.Generator().manual_seed(model * 100_003 + i))
            tensor.add_(noise.sub_(0.5), alpha=0.02)
        writer.write(key, tensor)
    writer.close()
    (part / "model.safetensors").rename(path)
    part.rmdir()


def merge(method: str, base: Path, finetuned: list[Path], out: Path, limit: int | None) -> ChildRun:
    argv = [
        sys.executable,
        "-c",
        CHILD,
        "merge",
        "--method",
        method,
        "--base",
        str(base),
        *map(str, finetuned),
        "-o",
        str(out),
        "--force",
    ]
    # RLIMIT_AS counts address space reserved, not used: each thread's glibc malloc arena reserves 64 MB,
    # so the kernels' threads would "use" hundreds of MB they never touch. Two arenas keep the cap honest.
    # OpenBLAS (scipy's, which numba imports) can spin at start-up instead of failing when a cap leaves it
    # too little room for its thread buffers: one thread keeps them small, and a run that has not
    # finished after CHILD_TIMEOUT_S counts as failed.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OPENBLAS_NUM_THREADS": "1"}
    result = run_measured(argv, address_space_limit=limit, env=env, timeout=CHILD_TIMEOUT_S)
    shutil.rmtree(out, ignore_errors=True)
    return result


def smallest_limit(method: str, base: Path, finetuned: list[Path], out: Path, low: int = 512 << 20,
                   high: int = 4 << 30) -> int:
    """Bisect the smallest RLIMIT_AS (64 MB steps) under which this merge succeeds."""
    step = 64 << 20
    if merge(method, base, finetuned, out, high).returncode != 0:
        raise SystemExit(f"the merge fails even under a {format_bytes(high)} address-space limit")
    while high - low > step:
        mid = (low + high) // 2 // step * step
        ok = merge(method, base, finetuned, out, mid).returncode == 0
        print(f"  limit {format_bytes(mid)}: {'ok' if ok else 'fails'}", file=sys.stderr)
        low, high = (low, mid) if ok else (mid, high)
    return high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5,2", help="model sizes in GB, comma-separated")
    parser.add_argument("--tasks", default="2,8", help="numbers of fine-tuned models, comma-separated")
    parser.add_argument("--tensor-mb", type=float, default=16.0, help="size of each tensor (the largest tensor)")
    parser.add_argument("--limit", default="auto", help="address-space limit: auto, none, or a size such as 3GB")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "magmax-outofcore-bench")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints for a later run")
    parser.add_argument("--method", default="magmax", help="the merging method (a registry name)")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    tasks = sorted(int(t) for t in args.tasks.split(","))
    numel = int(args.tensor_mb * 1e6 / 4)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    # The fixed cost: the same command on a model of one 4 kB tensor (interpreter, torch, CLI machinery).
    tiny = [work / "tiny" / f"model{m}.safetensors" for m in range(2)]
    for m, path in enumerate(tiny):
        path.parent.mkdir(exist_ok=True)
        write_model(path, 1, 1000, m)
    baseline = merge(args.method, tiny[0], tiny[1:], work / "tiny" / "out", None).peak_rss_bytes
    print(f"method {args.method}; fixed cost: the same merge of a model of one 4 kB tensor: peak RSS {format_bytes(baseline)}")

    rows = []
    limit: int | None = None
    try:
        for size in sizes:
            tensors = max(1, round(size * 1e9 / (numel * 4)))
            folder = work / f"{size:g}GB"
            start = time.perf_counter()
            paths = [folder / f"model{m}.safetensors" for m in range(max(tasks) + 1)]
            for m, path in enumerate(paths):
                write_model(path, tensors, numel, m)
            print(
                f"{size:g} GB models: {tensors} tensors of {format_bytes(numel * 4)}, "
                f"{len(paths)} files ready in {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
            )
            if limit is None and args.limit == "auto":
                limit = smallest_limit(args.method, paths[0], paths[1 : 1 + tasks[0]], folder / "out")
                limit = int(limit * 1.25)
                print(f"address-space limit for every run: {format_bytes(limit)} (smallest that works × 1.25)")
            elif limit is None and args.limit != "none":
                limit = parse_byte_size(args.limit)
            for t in tasks:
                result = merge(args.method, paths[0], paths[1 : 1 + t], folder / "out", limit)
                status = (
                    "ok" if result.returncode == 0 else "FAILED: " + (result.stderr.strip().splitlines() or ["?"])[-1]
                )
                model_bytes = tensors * numel * 4
                rows.append(
                    (size, t, (t + 1) * model_bytes, numel * 4, limit, result.peak_rss_bytes, result.seconds, status)
                )
                peak, seconds = format_bytes(result.peak_rss_bytes), result.seconds
                print(f"  {size:g} GB, T={t}: peak RSS {peak}, {seconds:.0f} s, {status}", file=sys.stderr)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    columns = ["model size", "T", "read from disk", "largest tensor", "RLIMIT_AS", "peak RSS", "peak − fixed cost"]
    print("| " + " | ".join([*columns, "time", "status"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, t, read, largest, cap, peak, seconds, status in rows:
        print(
            f"| {size:g} GB | {t} | {format_bytes(read)} | {format_bytes(largest)} | "
            f"{'none' if cap is None else format_bytes(cap)} | {format_bytes(peak)} | "
            f"{format_bytes(peak - baseline)} | {seconds:.0f} s | {status} |"
        )


if __name__ == "__main__":
    main()
