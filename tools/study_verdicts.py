"""The verdicts of docs/study.md, computed from a finished multi-seed run of configs/study/wordnet-10.yaml.

    python tools/study_verdicts.py RUN_DIR

Each claim is a paired comparison of two models' final accuracy, seed by seed (both models of one seed
share its class order and test set), summarised as the mean difference and its 95% Student-t interval
(magmax.stats.paired_differences). The rule, fixed before the run: "holds" when the interval lies on the
claimed side of the margin, "does not hold" when it lies on the other side, "inconclusive" when it
contains the margin. For "comes close to MagMax" the margin is 2 points either way: the difference is
close when its interval lies inside [-2, +2], not close when it lies outside, inconclusive otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from magmax.multiseed import seed_dir
from magmax.stats import paired_differences

# (claim, model, reference, kind): "better" means model > reference; "close" means |model - reference| < 2.
CLAIMS = [
    ("a", "seq:magmax", "ind:magmax", "better"),
    ("a", "seq:average", "ind:average", "better"),
    ("b", "seq:average", "seq:magmax", "close"),
    ("b", "seq:random", "seq:magmax", "close"),
    ("c", "seq:magmax", "seq:finetune", "better"),
]
CLOSE = 2.0


def verdict(diff: dict, kind: str) -> str:
    low, high = diff["ci_low"], diff["ci_high"]
    if low is None:
        return "inconclusive (one seed: no interval)"
    if kind == "better":
        return "holds" if low > 0 else "does not hold" if high < 0 else "inconclusive"
    return "holds" if -CLOSE < low and high < CLOSE else "does not hold" if high < -CLOSE or low > CLOSE else "inconclusive"


def interval(diff: dict) -> str:
    return "(no interval)" if diff["ci_low"] is None else f"[{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}]"


def main(run_dir: str) -> None:
    seeds = json.loads((Path(run_dir) / "aggregate.json").read_text())["seeds"]
    results = [json.loads((seed_dir(run_dir, s) / "results.json").read_text()) for s in seeds]
    labels = results[0]["models"]
    print(f"{len(seeds)} seeds: " + ", ".join(map(str, seeds)))
    print("| claim | model | against | per seed (pt) | mean difference [95% interval] | verdict |")
    print("|---|---|---|---|---|---|")
    for claim, model, ref, kind in CLAIMS:
        values = [r["models"][model]["metrics"]["final_accuracy"] for r in results]
        base = [r["models"][ref]["metrics"]["final_accuracy"] for r in results]
        diff = paired_differences(values, base)
        per_seed = ", ".join(f"{v - b:+.1f}" for v, b in zip(values, base))
        print(f"| ({claim}) | {labels[model]['label']} | {labels[ref]['label']} | {per_seed} | "
              f"{diff['mean_diff']:+.2f} {interval(diff)} | {verdict(diff, kind)} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/study_verdicts.py RUN_DIR")
    main(sys.argv[1])
