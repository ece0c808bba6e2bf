"""Mutation check of tests/test_protocol_parity.py: change each protocol point by hand, one at a time, in a
scratch worktree, and confirm that the test pinning it fails.

    git worktree add /tmp/mut HEAD
    python tools/protocol_mutations.py /tmp/mut [NAME ...]      # NAME: only these mutations

Each line says CAUGHT (the test failed, as it must) or MISSED. The worktree's files are restored after
each mutation; remove it with `git worktree remove /tmp/mut`.
"""

import os
import pathlib
import subprocess
import sys

root = pathlib.Path(sys.argv[1]).resolve()
M = [
 ("betas", "src/magmax/training/loop.py", "betas=cfg.betas,", "betas=(0.9, 0.98),", "optimiser"),
 ("clip", "src/magmax/training/loop.py", "clip_grad_norm_(params, cfg.grad_clip)", "clip_grad_norm_(params, 2.0)", "optimiser"),
 ("warmup", "src/magmax/training/schedule.py", "base_lr * (step + 1) / warmup_steps", "base_lr * step / warmup_steps", "optimiser"),
 ("steps", "src/magmax/training/batches.py", "math.ceil(epochs * math.ceil(num_samples / batch_size))", "math.ceil(epochs * (num_samples // batch_size))", "optimiser"),
 ("weight_decay", "src/magmax/training/loop.py", "weight_decay=cfg.weight_decay,", "weight_decay=0.01,", "optimiser"),
 ("eval_precision", "src/magmax/evaluation.py", "autocast = autocast_for(device, precision)", "autocast = autocast_for(device, 'fp32')", "precision"),
 ("fisher_precision", "src/magmax/training/baselines.py", "with ctx.autocast():", "with torch.autocast(device_type='cpu', enabled=False):", "precision"),
 ("ties_population", "src/magmax/continual.py", 'options["zero_entries"] = backbone.reference_frozen_numel()', 'options["zero_entries"] = 0', "ties_ranks"),
 ("fisher_zeroing", "src/magmax/training/baselines.py", "    for size, batch in _fisher_batches(ctx, n_batches):\n        _self_labelled_loss", "    for size, batch in _fisher_batches(ctx, n_batches):\n        encoder.zero_grad(set_to_none=True)\n        _self_labelled_loss", "ewc_reference"),
 ("fisher_divisor", "src/magmax/training/baselines.py", "divisor = named_batches * cfg.batch_size", "divisor = len(task.train)", "ewc_reference"),
 ("fisher_targets", "src/magmax/training/baselines.py", 'if targets == "embedding"', 'if targets == "embeddingX"', "ewc_reference"),
 ("lwf_teacher", "src/magmax/training/baselines.py", "self.old_encoder = copy.deepcopy(ctx.backbone.encoder).eval()", "self.old_encoder = copy.deepcopy(ctx.backbone.encoder).eval(); [p.data.add_(0.01) for p in self.old_encoder.parameters()]", "lwf"),
 ("lwf_heads", "src/magmax/training/baselines.py", "self.old_head = torch.cat(ctx.previous_heads)", "self.old_head = torch.cat(ctx.previous_heads[-1:])", "lwf"),
 ("tau_base", "src/magmax/continual.py", "merger.add(theta_t)", "merger.add({k: v + 0.01 if v.is_floating_point() else v for k, v in theta_t.items()})", "tau_against"),
 ("dil_average", "configs/paper/imagenet_r-domains.yaml", "    scale: 0.5", "    scale: 1.0", "average_is_half"),
 ("cifar_names", "src/magmax/data/cifar100.py", "natural_name(n) if options.natural_names else n", "natural_name(n)", "cifar100_head"),
 ("preset_fp32", "configs/paper/cub200-10.yaml", "  precision: fp32\n", "  precision: auto\n", "presets_run_fp32"),
 ("preset_fisher", "configs/paper/cars-5.yaml", "    fisher: reference\n", "    fisher: empirical\n", "presets_use_the_reference_fisher"),
 ("preset_population", "configs/paper/domainnet.yaml", "  population: whole_model\n", "  population: trained\n", "presets_rank_ties"),
]
only = sys.argv[2:]
for name, f, old, new, k in M:
    if only and name not in only: continue
    p = root / f; s = p.read_text()
    if old not in s:
        print(f"{name}: PATTERN NOT FOUND"); continue
    p.write_text(s.replace(old, new, 1))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                            "tests/test_protocol_parity.py", "-k", k], cwd=root, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1"})
        last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
        print(f"{name}: {'CAUGHT' if r.returncode else 'MISSED'}  ({last})", flush=True)
    finally:
        p.write_text(s)
