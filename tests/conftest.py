"""Shared test setup. Tiny models come from ``tests/helpers.py`` (``import helpers``)."""

from __future__ import annotations

import os

# Merge kernels may switch to torch.compile after enough eager time (magmax.merging.backends.select, mode "auto");
# a test run must never pay a compile by accident. Tests that exercise compiling set the mode themselves.
os.environ.setdefault("MAGMAX_COMPILE", "never")
# The numba kernels run in every test that does not turn them off, compiled or not (as they did before
# magmax.merging.backends.cpu.numba_policy weighed the compile): the tests compare them with the torch kernels.
os.environ.setdefault("MAGMAX_NATIVE", "1")

import torch  # noqa: E402

# Without a GPU, the Triton kernels are tested in Triton's interpreter (tests/merging/backends/test_gpu.py), which
# triton must know of before it is first imported (its library functions are decorated then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from magmax.merging.backends import select  # noqa: E402


@pytest.fixture(autouse=True)
def _compile_mode_from_env():
    """Every test starts in the session's compile mode, whatever an earlier test set."""
    select.set_compile_mode(os.environ["MAGMAX_COMPILE"])  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _native_kernels_must_not_fail():
    """A native (numba) kernel that fails falls back to torch silently in production; in tests it is a bug."""
    from magmax.merging.backends.cpu import native as _native

    yield
    assert not _native._disabled_after_error, "a numba kernel failed and was disabled (see the log)"


@pytest.fixture
def cli(capsys):
    """``magmax merge ARGS`` in process: (exit code, stdout, stderr)."""
    from magmax.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["merge", *map(str, args)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
