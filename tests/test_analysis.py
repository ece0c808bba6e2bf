"""magmax.analysis against plain oracles on small hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import helpers
from magmax import merge
from magmax.analysis import analyse, analyse_checkpoints, layer_of, magmax_winner


def test_layer_of():
    assert layer_of("encoder.layers.3.mlp.fc1.weight") == "encoder.layers.3"
    assert layer_of("visual.transformer.resblocks.11.attn.in_proj_weight") == "visual.transformer.resblocks.11"
    assert layer_of("visual.conv1.weight") == "visual.conv1"
    assert layer_of("logit_scale") == "logit_scale"


def test_hand_made_stream():
    theta0 = {"a.0.w": torch.zeros(4), "b.weight": torch.zeros(2), "steps": torch.tensor([7])}
    # τ_1, τ_2, τ_3 written out by hand.
    t1 = {"a.0.w": torch.tensor([1.0, -2.0, 0.0, 3.0]), "b.weight": torch.tensor([1.0, 0.0])}
    t2 = {"a.0.w": torch.tensor([-1.0, 1.0, 0.0, -4.0]), "b.weight": torch.tensor([0.5, 0.0])}
    t3 = {"a.0.w": torch.tensor([0.5, 2.0, 0.0, 1.0]), "b.weight": torch.tensor([-2.0, 0.0])}
    thetas = [{**t, "steps": torch.tensor([9])} for t in (t1, t2, t3)]
    out = analyse(theta0, thetas)
    # Largest |τ|: a: [1 = |−1| tied, 2 = 2 tied, all zero tied, |−4| → task 2]; b: [|−2| → task 3, all zero tied].
    # Tied entries are counted apart (the tie rule, not the tasks, would choose them).
    assert out["selection"]["counts"] == [0, 1, 1]
    assert out["selection"]["tied"] == 4 and out["selection"]["tied_share"] == pytest.approx(4 / 6)
    assert out["selection"]["share"] == pytest.approx([0, 1 / 2, 1 / 2])
    assert out["selection"]["layer_share"] == {"a.0": pytest.approx([0, 1, 0]), "b": pytest.approx([0, 0, 1])}
    # Pairwise sign conflicts among entries where both are non-zero.
    # (1,2): a: [+,-] [-,+] [.] [+,-] b: [+,+] → 3 of 4; (1,3): a: [+,+] [-,+] [+,+] b: [+,-] → 2 of 4;
    # (2,3): a: [-,+] [+,+] [-,+] b: [+,-] → 3 of 4.
    pw = out["sign_conflicts"]["pairwise"]
    assert pw[0][1] == pw[1][0] == pytest.approx(3 / 4)
    assert pw[0][2] == pytest.approx(2 / 4)
    assert pw[1][2] == pytest.approx(3 / 4)
    assert pw[0][0] == 0
    # Overall: entries with ≥ 2 non-zero: a0, a1, a3, b0 (4); mixed signs in all four.
    assert out["sign_conflicts"]["overall"] == pytest.approx(1.0)
    norms = [math.sqrt(1 + 4 + 9 + 1), math.sqrt(1 + 1 + 16 + 0.25), math.sqrt(0.25 + 4 + 1 + 4)]
    assert out["norms"] == pytest.approx(norms)
    dot12 = -1 - 2 - 12 + 0.5
    assert out["cosine"][0][1] == pytest.approx(dot12 / (norms[0] * norms[1]))
    assert out["cosine"][2][2] == pytest.approx(1.0)


def test_no_conflict_when_signs_agree_and_zero_norm():
    theta0 = {"w": torch.zeros(3)}
    out = analyse(theta0, [{"w": torch.tensor([1.0, 2.0, 0.0])}, {"w": torch.tensor([3.0, 0.0, 0.0])}, {"w": torch.zeros(3)}])
    assert out["sign_conflicts"]["overall"] == 0.0
    assert out["sign_conflicts"]["pairwise"][0][1] == 0.0
    assert out["norms"][2] == 0.0 and out["cosine"][0][2] == 0.0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000))
def test_winner_replays_the_magmax_merge(n_tasks, seed):
    """The replayed selection gives exactly the merged τ of magmax.merge (ties frequent: quantised τ)."""
    base = helpers.make_state_dict(seed, buffers=False)
    fts = helpers.make_finetuned(base, n_tasks, seed + 1, quantum=0.25)
    merged = merge("magmax", base, fts, scale=1.0)
    taus = helpers.task_vectors(base, fts)
    for key, b in base.items():
        winner = magmax_winner([tau[key].reshape(-1) for tau in taus])
        stacked = torch.stack([tau[key].reshape(-1) for tau in taus])
        picked = stacked.gather(0, winner[None])[0] if stacked.numel() else stacked.sum(0)
        assert torch.equal(helpers.bits(picked + b.reshape(-1)), helpers.bits(merged[key].reshape(-1))), key


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(0, 10_000))
def test_statistics_against_entrywise_oracles(n_tasks, seed):
    base = helpers.make_state_dict(seed, buffers=True)
    fts = helpers.make_finetuned(base, n_tasks, seed + 1, quantum=0.5)
    out = analyse(base, fts)
    taus = helpers.task_vectors(base, fts)
    vecs = [torch.cat([tau[k].reshape(-1) for k in sorted(tau)]).tolist() for tau in taus]
    n = len(vecs[0])
    # Winner by a plain loop.
    counts = [0] * n_tasks
    tied = 0
    for p in range(n):
        top = max(abs(vec[p]) for vec in vecs)
        if sum(abs(vec[p]) == top for vec in vecs) >= 2:
            tied += 1
            continue
        best = 0
        for t in range(1, n_tasks):
            if abs(vecs[t][p]) >= abs(vecs[best][p]):
                best = t
        counts[best] += 1
    assert out["selection"]["counts"] == counts
    assert out["selection"]["tied"] == tied
    assert sum(out["selection"]["share"]) == pytest.approx(1.0 if tied < n else 0.0)
    for i in range(n_tasks):
        assert out["norms"][i] == pytest.approx(math.sqrt(sum(v * v for v in vecs[i])))
        for j in range(n_tasks):
            both = [(a, b) for a, b in zip(vecs[i], vecs[j]) if a != 0 and b != 0]
            opp = sum(1 for a, b in both if (a > 0) != (b > 0))
            assert out["sign_conflicts"]["pairwise"][i][j] == pytest.approx(opp / len(both) if both else 0.0)
    multi = conflict = 0
    for p in range(n):
        signs = {v[p] > 0 for v in vecs if v[p] != 0}
        if sum(1 for v in vecs if v[p] != 0) >= 2:
            multi += 1
            conflict += len(signs) == 2
    assert out["sign_conflicts"]["overall"] == pytest.approx(conflict / multi)


def test_checkpoints_give_the_same_result(tmp_path):
    base = helpers.make_state_dict(1)
    fts = helpers.make_finetuned(base, 3, 2)
    save_file(base, str(tmp_path / "theta0.safetensors"))
    paths = []
    for t, ft in enumerate(fts):
        paths.append(tmp_path / f"t{t}.safetensors")
        save_file(ft, str(paths[-1]))
    assert analyse_checkpoints(tmp_path / "theta0.safetensors", paths) == analyse(base, fts)
