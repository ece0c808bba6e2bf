"""Data-parallel runs (gloo, 2 processes on CPU) against the one-process run on the tiny CLIP.

Tolerance, derived: 2 tasks of 24 training images, batch_size 10, so each epoch is 10, 10, 4 rows. A
2-rank run with train.grad_accum = 1 hands each rank 5 rows of a full batch, and of the 4-row batch
rank 0 all 4 and rank 1 none — exactly the micro-batches the one-process run cuts with grad_accum = 2
(rows 0-4, 5-9; 0-3). Every forward pass therefore sees the same rows with the same crops, and each
weight's gradient is g_a + g_b (or g_a + 0) in both runs: one float32 addition, which is commutative,
so the reduced gradient has the same bits whatever order gloo adds in. Clipping, AdamW,
the merges (rank 0's, broadcast), the EWC Fisher (rank 0's) and the evaluation (the same batches, split
by rank) are then the same computations on the same bits: the tolerance is ZERO, and the test asserts
bit equality of the accuracy matrices and of the final weights. (With more than two addends per weight
— more ranks, or grad_accum > 1 per rank — the order of the sum differs and only closeness holds.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from magmax.config import validate_config
from magmax.continual import ContinualRun

from test_continual import image_root, raw_config  # noqa: F401  (the fixture, and the config it fits)

TRAIN = {"lr": 1e-3, "batch_size": 10, "warmup_steps": 2, "steps": 3, "eval_batch_size": 8}


SEQ = [{"name": "seq", "merges": ["magmax"]}]
BASELINES = [{"name": "ewc", "regularizer": "ewc", "ewc": {"fisher": "reference"}, "merges": ["ties"]},
             {"name": "lwf", "regularizer": "lwf", "merges": []}]


def ddp_config(root: Path, streams: list[dict] = SEQ, **train) -> dict:
    return raw_config(
        root,
        train={**TRAIN, **train},
        scenario={"kind": "class_incremental", "n_tasks": 2, "class_order": "random"},
        streams=streams,
        merges=[{"method": "magmax"}, {"method": "ties"}],
        save_checkpoints=True,
        keep_state=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from magmax import distributed

    run = ContinualRun(validate_config(cfg), out)
    run.run()
    # Every rank ends with the same weights (rank 0's are in the run directory).
    save_file(run.encoder_state(), str(Path(out) / f"rank{rank}.safetensors"))
    distributed.destroy()


def single_process(cfg: dict, out: Path) -> dict:
    torch.set_num_threads(1)
    return ContinualRun(validate_config(cfg), out).run()


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((d / "results.json").read_text())["models"] for d in (a, b))
    assert ra.keys() == rb.keys()
    for name in ra:
        assert ra[name]["rows"] == rb[name]["rows"], name
        assert ra[name]["task_aware"] == rb[name]["task_aware"], name
    names = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (b / "checkpoints").iterdir()) and names
    for name in names:
        wa, wb = load_file(str(a / "checkpoints" / name)), load_file(str(b / "checkpoints" / name))
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (name, key)


def two_ranks_against_one_process(root: Path, tmp_path: Path, streams: list[dict]) -> Path:
    reference = tmp_path / "one"
    single_process(ddp_config(root, streams, grad_accum=2), reference)
    out = tmp_path / "two"
    mp.spawn(_rank_main, args=(2, free_port(), ddp_config(root, streams), str(out)), nprocs=2, join=True)
    assert_same_run(reference, out)
    return out


def test_two_ranks_equal_one_process_bit_for_bit(image_root, tmp_path):  # noqa: F811
    out = two_ranks_against_one_process(image_root, tmp_path, SEQ)
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # Written once: rank 1 left no log line, and the log holds each task heading once.
    log = (out / "log.txt").read_text()
    assert log.count("[seq] task 2/2") == 1
    assert json.loads((out / "status.json").read_text())["status"] == "complete"


def test_shares_and_micro_batches():
    """Rank r is handed ceil(B / W) consecutive rows of each batch (fewer or none in a short batch), split
    into ceil(share / grad_accum)-row micro-batches."""
    from magmax.distributed import micro_batch, share

    assert [share(6, 6, r, 2) for r in range(2)] == [slice(0, 3), slice(3, 6)]
    assert [share(4, 6, r, 2) for r in range(2)] == [slice(0, 3), slice(3, 4)]
    assert [share(2, 6, r, 4) for r in range(4)] == [slice(0, 2), slice(2, 2), slice(2, 2), slice(2, 2)]
    assert micro_batch(128, 1, 3) == 43 and micro_batch(128, 2, 4) == 16 and micro_batch(6, 2, 1) == 3


@pytest.mark.slow
def test_lwf_teacher_and_reference_fisher_agree_with_one_process(image_root, tmp_path):  # noqa: F811
    """EWC with the reference Fisher (rank 0's, from the reduced last gradient) and LwF's teacher."""
    two_ranks_against_one_process(image_root, tmp_path, BASELINES)


def test_rank_killed_mid_task_then_resumed_ends_with_the_same_numbers(image_root, tmp_path):  # noqa: F811
    """torchrun with 2 ranks; rank 1 is SIGKILLed during the last task; `magmax run --nproc 2 --resume`
    ends with the numbers of the uninterrupted one-process run."""
    reference = tmp_path / "one"
    single_process(ddp_config(image_root, grad_accum=2, steps=8), reference)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(ddp_config(image_root, steps=8)))
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "magmax", "run", str(cfg), "--out", str(out)]
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = out / "state" / "progress.json"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if progress.exists() and json.loads(progress.read_text()).get("streams", {}).get("seq", {}).get("completed", 0) >= 1:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before a rank could be killed: " + proc.stderr.read()[-2000:])
            time.sleep(0.05)
        else:
            pytest.fail("no task completed in time")
        time.sleep(0.3)  # inside the next task
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        rank1 = next(pid for pid in workers if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        os.kill(int(rank1), 9)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert json.loads((out / "status.json").read_text())["status"] != "complete"
    assert not (out / "results.json").exists()
    # Resumed with the launcher shortcut (`--nproc 2` runs torchrun itself).
    again = [sys.executable, "-m", "magmax", "run", str(cfg), "--out", str(out), "--nproc", "2", "--resume"]
    resumed = subprocess.run(again, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(reference, out)


@pytest.mark.parametrize("kind", ["array", "list", "files"])
def test_a_rank_gets_the_crops_its_rows_get_in_the_whole_batch(kind, tmp_path):
    """skip_crops + preprocessing the share = the share's rows of preprocessing the whole batch."""
    import numpy as np
    from PIL import Image

    from magmax.models.preprocess import ImageTransform, preprocess_images, skip_crops

    rng = np.random.default_rng(1)
    if kind == "array":
        items = rng.integers(0, 256, (7, 20, 24, 3), dtype=np.uint8)
    else:
        items = [rng.integers(0, 256, (10 + 3 * i, 30 - 2 * i, 3), dtype=np.uint8) for i in range(7)]
        if kind == "files":
            for i, a in enumerate(items):
                Image.fromarray(a).save(tmp_path / f"{i}.png")
            items = [str(tmp_path / f"{i}.png") for i in range(7)]
    transform = ImageTransform(size=12, scale=(0.3, 1.0))
    whole = preprocess_images(items, transform, True, torch.Generator().manual_seed(5))
    for lo, hi in ((0, 3), (3, 6), (6, 7), (2, 7)):
        g = torch.Generator().manual_seed(5)
        skip_crops(items[:lo], transform, g)
        assert torch.equal(preprocess_images(items[lo:hi], transform, True, g), whole[lo:hi]), (lo, hi)
