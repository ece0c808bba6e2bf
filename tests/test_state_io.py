import torch

from magmax import Merger
from magmax.state_io import load_state, save_state


def test_nested_state_round_trip_is_exact(tmp_path):
    state = {"a": (torch.randn(3, 2), torch.arange(4)), "n": 3, "f": 0.1 + 0.2, "l": [None, "x", {"b": torch.ones(1, dtype=torch.bfloat16)}]}
    save_state(state, tmp_path / "s")
    back = load_state(tmp_path / "s")
    assert torch.equal(back["a"][0], state["a"][0]) and isinstance(back["a"], tuple)
    assert torch.equal(back["a"][1], state["a"][1])
    assert back["n"] == 3 and back["f"] == 0.1 + 0.2 and back["l"][:2] == [None, "x"]
    assert back["l"][2]["b"].dtype == torch.bfloat16


def test_merger_resumes_from_saved_state_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    base = {"w": torch.randn(8, 4), "b": torch.randn(4), "steps": torch.tensor(3)}
    fts = [{k: (v + torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v) for k, v in base.items()} for _ in range(4)]
    for method in ("magmax", "average", "random", "ties"):
        full = Merger(method, base)
        for ft in fts:
            full.add(ft)
        first = Merger(method, base)
        for ft in fts[:2]:
            first.add(ft)
        save_state(first.state_dict(), tmp_path / method)
        resumed = Merger(method, base)
        resumed.load_state_dict(load_state(tmp_path / method))
        for ft in fts[2:]:
            resumed.add(ft)
        a, b = full.merged(), resumed.merged()
        assert all(torch.equal(a[k], b[k]) for k in a), method
