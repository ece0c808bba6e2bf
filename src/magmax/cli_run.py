"""`magmax run` and `magmax demo` (work in progress)."""
