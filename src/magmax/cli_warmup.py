"""`magmax warmup`: compile the numba CPU merge kernels once, into numba's on-disk cache."""

from __future__ import annotations

from magmax.console import make_console, print_line
from magmax.errors import ConfigError


def warmup_command() -> None:
    """Compile the numba CPU merge kernels into numba's cache, so that every later merge uses them at once.

    Without it, a merge uses the torch kernels (the same results) until the kernels are compiled, or
    compiles them when the merge is big enough to repay it. Run it again after upgrading magmax or numba."""
    from magmax.merging.backends.cpu.kernel_warmup import warm_up

    console = make_console(stderr=True)
    report = warm_up(progress=lambda name: print_line(console, f"compiling the {name} kernels"))
    if report.folder is None:
        raise ConfigError("numba is not installed, so there is nothing to compile: pip install numba")
    print_line(make_console(), f"compiled the numba merge kernels in {report.seconds:.0f} s "
                               f"({report.merges} test merges; {report.files} cache files in {report.folder})")
