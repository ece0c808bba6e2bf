"""`magmax merge` (work in progress)."""
