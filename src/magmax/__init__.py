"""magmax: continual learning by model merging (MagMax and its family), streaming and out of core."""

from magmax.api import Merger, merge
from magmax.merging import create_method, registry
from magmax.taskvector import apply_task_vector, task_vector

__version__ = "0.1.0"
__all__ = ["Merger", "merge", "create_method", "registry", "task_vector", "apply_task_vector", "__version__"]
