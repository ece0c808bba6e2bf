"""Memory helpers: a child's peak resident set, the address-space limit, releasing mapped pages."""

from __future__ import annotations

import sys

import torch

from magmax.memory import format_bytes, peak_rss_bytes, release_pages, run_measured


def test_run_measured_sees_a_childs_peak(tmp_path):
    code = "x = b'1' * 200_000_000"
    result = run_measured([sys.executable, "-c", code])
    assert result.returncode == 0
    # its own peak, not the resident size of this (torch-importing) test process that spawned it
    assert 200e6 <= result.peak_rss_bytes < 260e6
    assert peak_rss_bytes() > 0


def test_run_measured_applies_the_address_space_limit():
    code = "x = bytearray(500_000_000)"
    result = run_measured([sys.executable, "-c", code], address_space_limit=300_000_000)
    assert result.returncode != 0 and "MemoryError" in result.stderr


def test_release_pages_keeps_the_data_of_a_mapping(tmp_path):
    path = tmp_path / "t.pt"
    value = torch.randn(100_000)
    torch.save({"v": value}, path)
    mapped = torch.load(path, mmap=True, weights_only=True)["v"]
    assert torch.equal(mapped, value)
    release_pages(mapped)
    assert torch.equal(mapped, value)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1_500_000) == "1.5 MB"
    assert format_bytes(2_000_000_000) == "2.0 GB"
    assert format_bytes(3e12) == "3000.0 GB"
