"""Merge throughput on ViT-B/16-sized task vectors: each method against the naive fold and the memory floor.

Run on demand (this is not a test):

    .venv/bin/python bench/merge_bench.py                  # full size: CLIP ViT-B/16 vision tower, T = 2, 10, 50
    .venv/bin/python bench/merge_bench.py --quick          # 1 block of width 256 (1.2M parameters), about a minute
    .venv/bin/python bench/merge_bench.py --device cuda    # the GPU half

Measured in the same run, on the same task vectors:

* **floor**: a plain memory copy of the same bytes — T inputs read once and one output written once,
  (T + 1)·P·4 bytes moved at the copy bandwidth measured here (``dst.copy_(src)`` of P floats).
* **naive**: the reference fold written the plain way — a Python loop over keys and tasks of
  ``best = torch.where(cur.abs() >= best.abs(), cur, best)``.
* **default** / **torch eager** / **compiled**: τ* of every tensor from the task vectors (with the
  method's statistics passes, as the engine runs them; ``merge_tensors`` for methods that merge many
  tensors at once, else ``merge_tensor`` per tensor). *default* is what a merge runs without
  settings: the numba kernels of ``magmax.merging.backends.cpu`` on CPU (where numba imports), the Triton
  multi-tensor kernels of ``magmax.merging.backends.gpu`` on a GPU (one launch for all tensors), the torch
  group kernels eagerly otherwise. *torch eager* forces the torch group kernels (``MAGMAX_NATIVE=0
  MAGMAX_TRITON=0``; in cache-sized chunks on CPU; fused methods only), *compiled* forces them under
  ``torch.compile`` (compile time reported apart).
* **merge()**: ``magmax.merge(method, θ0, [θ_1..θ_T])`` end to end (reading checkpoints in memory,
  NaN/Inf checks, θ0 + λ·τ*) on the default path; its floor is (T + 2)·P·4 bytes (θ0 is read too), so
  compare it with floor·(T + 2)/(T + 1).
* **peak**: the highest resident memory above the inputs during one call (``VmHWM`` after resetting it
  through /proc/self/clear_refs; ``max_memory_allocated`` on CUDA).

T task vectors would need T·P·4 bytes (17 GB at T = 50), so only ``--distinct`` (default 4) different
task vectors are built and task t is vector t mod distinct: every input is a separate read of memory
(each vector is far larger than the caches), so the measurement is of compute and memory traffic.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

import magmax
from magmax.merging.backends import select
from magmax.merging.backends.cpu import native as _native
from magmax.merging.backends.gpu import triton as _gpu
from magmax.merging.base import MergeMethod, TaskSlices, merge_all

FUSED = ("magmax", "average", "task_arithmetic", "random")
DEFAULT_METHODS = ("magmax", "average", "random", "ties", "tsv")


# -- inputs ------------------------------------------------------------------------------------------


def vit_b16_visual_shapes(layers: int = 12, width: int = 768, patch: int = 16, grid: int = 14, out_dim: int = 512) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of CLIP's ViT-B/16 vision tower (open_clip / OpenAI naming)."""
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (width, 3, patch, patch),
        "class_embedding": (width,),
        "positional_embedding": (grid * grid + 1, width),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (width,),
            p + "ln_1.bias": (width,),
            p + "attn.in_proj_weight": (3 * width, width),
            p + "attn.in_proj_bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width),
            p + "attn.out_proj.bias": (width,),
            p + "ln_2.weight": (width,),
            p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (4 * width, width),
            p + "mlp.c_fc.bias": (4 * width,),
            p + "mlp.c_proj.weight": (width, 4 * width),
            p + "mlp.c_proj.bias": (width,),
        })
    shapes.update({"ln_post.weight": (width,), "ln_post.bias": (width,), "proj": (width, out_dim)})
    return shapes


def numel(shapes: Mapping[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def random_state(shapes: Mapping[str, tuple[int, ...]], seed: int, std: float, device: torch.device) -> dict[str, Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return {k: (torch.randn(s, generator=gen) * std).to(device) for k, s in shapes.items()}


@dataclass
class Inputs:
    base: dict[str, Tensor]
    distinct_taus: list[dict[str, Tensor]]
    distinct_finetuned: list[dict[str, Tensor]]

    def taus(self, count: int) -> list[dict[str, Tensor]]:
        return [self.distinct_taus[t % len(self.distinct_taus)] for t in range(count)]

    def finetuned(self, count: int) -> list[dict[str, Tensor]]:
        return [self.distinct_finetuned[t % len(self.distinct_finetuned)] for t in range(count)]


def build_inputs(shapes: Mapping[str, tuple[int, ...]], distinct: int, device: torch.device) -> Inputs:
    base = random_state(shapes, 0, 0.02, device)
    taus = [random_state(shapes, 1 + i, 1e-3, device) for i in range(distinct)]
    finetuned = [{k: base[k] + tau[k] for k in base} for tau in taus]
    return Inputs(base, taus, finetuned)


# -- what is measured ----------------------------------------------------------------------------------


def naive_fold(taus: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The reference MagMax fold written plainly (the yardstick every method is compared with)."""
    out = {}
    for key in taus[0]:
        best = taus[0][key]
        for t in range(1, len(taus)):
            cur = taus[t][key]
            best = torch.where(cur.abs() >= best.abs(), cur, best)
        out[key] = best
    return out


def merge_task_vectors(method: MergeMethod, taus: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """τ* for every key from task vectors, running the method's statistics passes as the engine does."""
    keys = list(taus[0])

    def slices(key: str) -> TaskSlices:
        return TaskSlices.from_list(key, [tau[key] for tau in taus])

    return merge_all(method, keys, slices, len(taus), sum(taus[0][key].numel() for key in keys))


def copy_bandwidth(size: int, device: torch.device, repeats: int) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` of ``size`` floats (median)."""
    src = torch.randn(size, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), repeats, device)
    return 2 * size * 4 / statistics.median(seconds)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        result = fn()
        synchronize(device)
        seconds.append(time.perf_counter() - began)
        del result
    return seconds


class PeakMemory:
    """Highest memory above the level at entry, during the ``with`` block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            _malloc_trim()  # return freed heap pages, so that the call's allocations show up as growth
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
            self._start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.peak_bytes = _status_bytes("VmHWM") - self._start


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


@dataclass
class Row:
    method: str
    tasks: int
    floor_s: float
    naive_s: float | None
    eager_s: float | None = None  # the default path
    torch_eager_s: float | None = None
    compiled_s: float | None = None
    compile_s: float | None = None
    e2e_s: float | None = None
    e2e_compiled_s: float | None = None
    peak_bytes: int = 0
    note: str = ""


class CallTimeout(Exception):
    pass


def _raise_timeout(signum: int, frame: object) -> None:
    raise CallTimeout


def measure(
    fn: Callable[[], object], repeats: int, device: torch.device, budget_s: float
) -> tuple[float | None, int, int]:
    """(median seconds, peak bytes of the first call, calls made): a first call measured for memory,
    then up to ``repeats`` − 1 more while they fit in ``budget_s``. A first call still running after
    ``budget_s`` is stopped (SIGALRM) and gives (None, 0, 0)."""
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    try:
        with PeakMemory(device) as mem:
            first = timed(fn, 1, device)
    except CallTimeout:
        return None, 0, 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = list(first)
    while len(seconds) < repeats and sum(seconds) * (len(seconds) + 1) / len(seconds) <= budget_s:
        seconds += timed(fn, 1, device)
    return statistics.median(seconds), mem.peak_bytes, len(seconds)


# -- table -------------------------------------------------------------------------------------------


def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:.1f}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    return "—" if num is None or den is None else f"{num / den:.1f}×"


def print_table(rows: Sequence[Row]) -> None:
    head = ("method", "T", "floor ms", "naive ms", "default ms", "torch eager ms", "compiled ms", "compile s",
            "merge() ms", "merge() compiled ms", "default/floor", "compiled/floor", "naive/default", "naive/compiled",
            "peak MB")
    lines = [head]
    for r in rows:
        lines.append((
            r.method, str(r.tasks), fmt_ms(r.floor_s), fmt_ms(r.naive_s), fmt_ms(r.eager_s), fmt_ms(r.torch_eager_s),
            fmt_ms(r.compiled_s), "—" if r.compile_s is None else f"{r.compile_s:.1f}", fmt_ms(r.e2e_s),
            fmt_ms(r.e2e_compiled_s),
            fmt_ratio(r.eager_s, r.floor_s), fmt_ratio(r.compiled_s, r.floor_s),
            fmt_ratio(r.naive_s, r.eager_s), fmt_ratio(r.naive_s, r.compiled_s),
            f"{r.peak_bytes / 2**20:,.0f}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines[1:]:
        print("| " + " | ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) + " |")
    notes = [f"{r.method} T={r.tasks}: {r.note}" for r in rows if r.note]
    for note in notes:
        print(f"  note: {note}")


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true",
                   help="a small P (1 block of width 256: 1.2M parameters), 2 repeats, no compiled column")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default 12, or 1 with --quick)")
    p.add_argument("--width", type=int, default=None, help="transformer width (default 768, or 256 with --quick)")
    p.add_argument("--tasks", default="2,10,50", help="comma-separated T values")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated registry names")
    p.add_argument("--distinct", type=int, default=4, help="distinct task vectors, reused cyclically")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell, median (default 5, or 2 with --quick)")
    p.add_argument("--budget-s", type=float, default=60.0, help="stop repeating a cell once it would exceed this")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-compiled", action="store_true", help="skip the torch.compile column")
    p.add_argument("--e2e-compiled", action="store_true", help="also time merge() with torch.compile'd kernels")
    p.add_argument("--no-torch-eager", action="store_true", help="skip the torch eager column (fused methods, with numba or Triton kernels on)")
    p.add_argument("--compiled", action="store_true", help="measure the torch.compile column even with --quick")
    p.add_argument("--no-e2e", action="store_true", help="skip the magmax.merge() column")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    layers = args.layers if args.layers is not None else (1 if args.quick else 12)
    width = args.width if args.width is not None else (256 if args.quick else 768)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.quick and not args.compiled:
        args.no_compiled = True
    shapes = vit_b16_visual_shapes(layers=layers, width=width)
    params = numel(shapes)
    tasks = [int(t) for t in args.tasks.split(",")]
    registry = magmax.registry()
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    missing = [m for m in wanted if m not in registry]
    methods = [m for m in wanted if m in registry]

    cpu = _cpu_model()
    print(f"# merge_bench  {datetime.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}  "
          f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}")
    print(f"# CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} at start; python {platform.python_version()}")
    print(f"# ViT-B/16 vision tower shapes, {layers} block(s) of width {width}: {len(shapes)} tensors, P = {params:,} parameters "
          f"({params * 4 / 2**20:,.0f} MiB per fp32 task vector)")
    print(f"# {args.distinct} distinct task vectors reused cyclically (task t = vector t mod {args.distinct}); "
          f"times are medians of up to {args.repeats} calls (fewer when a cell exceeds {args.budget_s:.0f} s)")
    for m in missing:
        print(f"# skipped '{m}': not in the registry ({', '.join(registry)})")

    inputs = build_inputs(shapes, args.distinct, device)
    bandwidth = copy_bandwidth(max(shapes_max(shapes), params), device, max(args.repeats, 5))
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"# WARNING: load average {os.getloadavg()[0]:.1f} exceeds the {os.cpu_count()} cores: other processes "
              "compete for the CPU and OpenMP-parallel ops stall; --threads 1 is steadier")
    print(f"# copy bandwidth {bandwidth / 1e9:.1f} GB/s (bytes read + written); floor(T) = (T+1)·P·4 B / bandwidth")
    sys.stdout.flush()

    warm_up(methods, tasks, device, e2e=not args.no_e2e)
    rows: list[Row] = []
    last_eager: dict[str, tuple[int, float]] = {}  # method -> (T, seconds of one eager call)
    for count in tasks:
        floor_s = (count + 1) * params * 4 / bandwidth
        taus = inputs.taus(count)
        naive_s, _, _ = measure(lambda: naive_fold(taus), args.repeats, device, args.budget_s)
        if naive_s is None:
            print(f"# T={count}: the naive fold took more than --budget-s {args.budget_s:.0f} s; its column is empty")
        for name in methods:
            row = Row(name, count, floor_s, naive_s)
            notes = []
            if name in last_eager:
                projected = last_eager[name][1] * count / last_eager[name][0]
                if projected > args.budget_s:
                    row.note = f"skipped: one call projected at {projected:.0f} s (> --budget-s {args.budget_s:.0f})"
                    rows.append(row)
                    continue
            run = lambda: merge_task_vectors(magmax.create_method(name), taus)
            select.set_compile_mode("never")
            row.eager_s, row.peak_bytes, calls = measure(run, args.repeats, device, args.budget_s)
            if row.eager_s is None:
                row.note = f"stopped: one call took more than --budget-s {args.budget_s:.0f} s"
                last_eager[name] = (count, float("inf"))
                rows.append(row)
                continue
            last_eager[name] = (count, row.eager_s)
            if calls < args.repeats:
                notes.append(f"default {calls} call(s)")
            own_kernels = _native.enabled() if device.type == "cpu" else _gpu.enabled()
            if name in FUSED and own_kernels and not args.no_torch_eager:
                with torch_kernels():
                    row.torch_eager_s, _, _ = measure(run, args.repeats, device, args.budget_s)
            if name in FUSED and not args.no_compiled:
                with torch_kernels():
                    select.set_compile_mode("always")
                    began = time.perf_counter()
                    run()
                    warm = time.perf_counter() - began
                    row.compiled_s, _, calls = measure(run, args.repeats, device, args.budget_s)
                    row.compile_s = max(warm - row.compiled_s, 0.0)
                    if select._compile_failed:
                        notes.append("torch.compile failed: the compiled column ran eagerly")
            if not args.no_e2e:
                select.set_compile_mode("never")
                finetuned = inputs.finetuned(count)
                merge = lambda: magmax.merge(name, inputs.base, finetuned, device=device)
                row.e2e_s, _, _ = measure(merge, args.repeats, device, args.budget_s)
                if row.e2e_s is None:
                    notes.append(f"merge() stopped after {args.budget_s:.0f} s")
                if args.e2e_compiled and name in FUSED:
                    with torch_kernels():
                        select.set_compile_mode("always")
                        merge()  # compiles
                        row.e2e_compiled_s, _, _ = measure(merge, args.repeats, device, args.budget_s)
                        select.set_compile_mode("never")
            row.note = "; ".join(notes)
            rows.append(row)
            print(f"  done {name} T={count}", file=sys.stderr, flush=True)
    print()
    print_table(rows)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


def warm_up(methods: Sequence[str], tasks: Sequence[int], device: torch.device, e2e: bool) -> None:
    """One untimed call of every method at every T on a small model (1.2M parameters), so that the
    measured cells do not include one-time costs: loading numba's cached machine code (or compiling it,
    the first time on a machine), Triton's compiles on a GPU, starting thread pools. Those landed in the
    first cell's time and peak memory (+117 MB at magmax T = 2 in session 4's tables)."""
    small = build_inputs(vit_b16_visual_shapes(layers=1, width=256), min(max(tasks), 4), device)
    select.set_compile_mode("never")
    for count in tasks:
        for name in methods:
            merge_task_vectors(magmax.create_method(name), small.taus(count))
            if e2e:
                magmax.merge(name, small.base, small.finetuned(count), device=device)
    synchronize(device)


@contextmanager
def torch_kernels() -> Iterator[None]:
    """The torch group kernels forced: neither the numba (CPU) nor the Triton (GPU) kernels."""
    saved = {name: os.environ.get(name) for name in ("MAGMAX_NATIVE", "MAGMAX_TRITON")}
    os.environ.update(MAGMAX_NATIVE="0", MAGMAX_TRITON="0")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def shapes_max(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return max(numel({"x": s}) for s in shapes.values())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
