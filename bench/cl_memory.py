"""Peak memory of a continual run against the number of tasks (run on demand, not a test).

The runner keeps θ0, θ_t and each merge method's running state, whatever the stream length, so peak
RSS must not grow with the number of tasks. This runs the demo's text stream (MiniLM, 22.7M parameters,
four merge methods: magmax, average, random, ties; Seq-FT) with 5 and with 20 tasks (20 WordNet
classes: 4 classes per task vs 1), one optimizer step per task and a few samples per class so the runs
are short, each in a fresh subprocess, and prints peak RSS (VmHWM) side by side. Keeping every task
vector instead would add 20 × 91 MB.

    .venv/bin/python bench/cl_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys
from magmax.config import load_config
from magmax.continual import ContinualRun
from magmax.memory import peak_rss_bytes
cfg = load_config(sys.argv[1], sys.argv[3:])
ContinualRun(cfg, sys.argv[2]).run()
print(json.dumps({"peak_rss": peak_rss_bytes()}))
"""


def main() -> None:
    from magmax.cli_run import demo_config_path

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_tasks in (5, 20):
            overrides = [
                f"scenario.n_tasks={n_tasks}", "train.steps=1", "train.warmup_steps=1",
                "data.options.max_train_per_class=8", "data.options.max_test_per_class=4",
                "streams=[{name: seq}]",
            ]
            start = time.time()
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(demo_config_path("text")), f"{tmp}/run{n_tasks}", *overrides],
                capture_output=True, text=True, check=True,
            )
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]
            rows.append((n_tasks, peak / 2**20, time.time() - start))
    print("| tasks | peak RSS (MiB) | seconds |\n|---:|---:|---:|")
    for n, mib, sec in rows:
        print(f"| {n} | {mib:,.0f} | {sec:.0f} |")
    print(f"\n20 tasks / 5 tasks peak RSS: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
