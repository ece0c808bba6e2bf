"""Reading the official CIFAR pickles without running code from them.

A pickle may name any importable callable (``os.system``...), which ``pickle.load`` calls. The CIFAR
``cifar-100-python`` files hold only dicts of strings, ints, lists and numpy arrays, so this unpickler
resolves exactly the globals numpy's array pickling uses and refuses every other one. Those globals
only allocate arrays and dtypes from the bytes that follow (``_reconstruct`` is ``ndarray.__new__``;
``_frombuffer`` is ``numpy.frombuffer(...).reshape``; ``scalar`` builds one number from its bytes),
plus ``_codecs.encode``, with which Python 3 writes ``bytes`` at protocol 2.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

# (module, name) pairs as they appear in pickles written by numpy 1.x ("numpy.core") and 2.x ("numpy._core").
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class UnsafePickleError(Exception):
    """The pickle names a global outside the numpy-array allow-list."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(f"{module}.{name}")
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        if module == "_codecs":
            # Python 3 writes bytes at protocol 2 as encode(text, "latin1"): a pure conversion.
            import _codecs

            return _codecs.encode
        # Import from whichever numpy layout this interpreter has: the objects are the same.
        core = getattr(np, "_core", None) or np.core
        if name == "_reconstruct" or name == "scalar":
            return getattr(core.multiarray, name)
        return core.numeric._frombuffer


def load_numpy_pickle(data: bytes) -> Any:
    """Unpickle ``data`` allowing only numpy array reconstruction. Python 2 strings decode as latin-1,
    which is how numpy recovers array bytes pickled by Python 2 (the official CIFAR files)."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
