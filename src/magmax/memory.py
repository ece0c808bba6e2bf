"""Memory accounting for out-of-core merges: peak RSS of this process or of a child, page release.

Peak RSS is the kernel's high-water mark of resident memory (``ru_maxrss``): it includes the Python +
torch baseline (~300 MB) and any file-backed pages a process touched through ``mmap``. The latter is
why :func:`release_pages` exists: a memory-mapped checkpoint whose pages are read once and never
released keeps them counted as resident until the mapping closes, so RSS would grow with model size.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

_MADV_DONTNEED = 4  # same value in every Linux ABI


def _maxrss_to_bytes(maxrss: int) -> int:
    # getrusage reports kilobytes on Linux and bytes on macOS.
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def peak_rss_bytes() -> int:
    """The highest resident set size this process has had since it started, in bytes.

    On Linux this is ``VmHWM`` of /proc/self/status: ``ru_maxrss`` would also count the resident size
    of the parent that forked us (see :func:`run_measured`).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _maxrss_to_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss_bytes() -> int:
    """The resident set size of this process now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def format_bytes(n: float) -> str:
    """Decimal units, as `du -h --si` and the Hugging Face shard sizes use them: 1.5 GB = 1.5e9 bytes."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


_libc: ctypes.CDLL | None = None


def _c_library() -> ctypes.CDLL | None:
    """The process's C library (Linux only), loaded once."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc


def _madvise() -> Callable[[int, int, int], int] | None:
    libc = _c_library()
    return None if libc is None else libc.madvise


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_large_buffers_to_the_os(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more by its own memory map (glibc only).

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), after which
    tensor-sized buffers come from the heap, where freed blocks stay resident unless they lie at its
    top: an out-of-core merge, which allocates and frees tensors of the same sizes again and again,
    then keeps more and more of them resident (peak RSS grew with the number of models read). A fixed
    threshold keeps the resident set to the tensors alive. Returns whether it could be set.
    """
    libc = _c_library()
    mallopt = getattr(libc, "mallopt", None)  # glibc's; absent from e.g. musl: nothing to tune there
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold))) if mallopt is not None else False


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages under ``tensor`` when it is a read-only view of a private file mapping.

    Only for tensors that nobody has written to and that live in a file mapping (e.g. from
    ``torch.load(mmap=True)``, which maps the file copy-on-write): for such pages ``MADV_DONTNEED``
    just forgets them and a later access reads the file again, so the data is unchanged. On ordinary
    (anonymous) memory it would ZERO the data: never call it on anything else. The range is the
    tensor's whole storage widened to whole pages; pages shared with neighbouring tensors of the same
    mapping are equally clean. Linux only; elsewhere a no-op.
    """
    madvise = _madvise()
    nbytes = tensor.untyped_storage().nbytes()
    if madvise is None or nbytes == 0 or tensor.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = tensor.untyped_storage().data_ptr()
    begin = start // page * page
    end = -(-(start + nbytes) // page) * page
    # Failure (e.g. memory that is not a mapping) only means the pages stay resident: not an error.
    madvise(begin, end - begin, _MADV_DONTNEED)


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    peak_rss_bytes: int
    seconds: float
    stdout: str
    stderr: str


# Why a launcher: a child's ru_maxrss starts at the resident size of the process that forked it (the
# kernel carries the old memory's high-water mark across exec), so a child of a 400 MB pytest or
# torch process would report at least 400 MB. A small Python launcher forks the command instead, and
# its wait4() sees the command's own peak. It also applies RLIMIT_AS (inherited by the command).
_LAUNCHER = """
import os, resource, sys
report, limit, command = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
pid = os.posix_spawnp(command[0], command, os.environ)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_measured(
    command: Sequence[str],
    *,
    address_space_limit: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> ChildRun:
    """Run ``command``; return its exit code (negative: killed by that signal), output and own peak RSS.

    ``address_space_limit`` caps its virtual memory (``RLIMIT_AS``, like ``ulimit -v``), so a run that
    needs more memory than allowed fails instead of being measured generously. On ``timeout`` the
    command is killed (exit code -9).
    """
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "usage"
        argv = [sys.executable, "-c", _LAUNCHER, str(report), str(address_space_limit or 0), *command]
        start = time.perf_counter()
        with open(Path(scratch) / "out", "w+b") as out, open(Path(scratch) / "err", "w+b") as err:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=err, env=None if env is None else dict(env), start_new_session=True
            )
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the command: the group we started
                proc.wait()
            seconds = time.perf_counter() - start
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if not report.exists():
            return ChildRun(proc.returncode if proc.returncode else -9, 0, seconds, stdout, stderr)
        maxrss, code = (int(x) for x in report.read_text().split())
        return ChildRun(code, _maxrss_to_bytes(maxrss), seconds, stdout, stderr)
