"""Hugging Face Hub model ids (``org/name``) as merge inputs, resolved to a local snapshot folder.

An input that is not a path on disk but reads as a Hub id is fetched with
:func:`huggingface_hub.snapshot_download`, limited to what a merge reads (safetensors weights, or the
torch ``.bin`` weights of a repository without safetensors, configs, tokenizer files, an adapter's
files) and kept in the Hugging Face cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``).
With ``HF_HUB_OFFLINE=1`` nothing is downloaded: the id comes from the cache, and an id the cache lacks
is one line saying how to fetch it. A path that exists always wins over an id of the same spelling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from magmax.errors import MergeInputError

# owner/name as the Hub spells them: letters, digits, '-', '_', '.'; neither part '.' or '..'.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

# What a merge reads from a model repository (weights first tried as safetensors only).
COMMON_PATTERNS = [
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "tokenizer*",
    "*/*.json",  # sentence-transformers' module folders (1_Pooling/config.json, ...)
]
SAFETENSORS_PATTERNS = ["*.safetensors"]
TORCH_PATTERNS = ["*.bin", "*.pt", "*.pth"]


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hub model id ``owner/name`` (no path of that name is checked)."""
    return _REPO_ID.fullmatch(text) is not None and ".." not in text and not text.endswith((".yaml", ".yml"))


def is_hub_input(value: str | Path) -> bool:
    """An id to fetch from the Hub: shaped like ``owner/name`` and not an existing path."""
    text = str(value)
    return looks_like_repo_id(text) and not Path(text).exists()


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir() -> str:
    """The Hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))


def resolve(value: str | Path) -> Path:
    """The local folder of a Hub id (downloaded, or from the cache offline); any other input unchanged."""
    if not is_hub_input(value):
        return Path(value)
    repo_id = str(value)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise MergeInputError(
            f"{repo_id}: not a path, and huggingface_hub is not installed to fetch it as a Hub id; "
            "pip install huggingface_hub"
        ) from None
    offline = _offline()
    cache = _cache_dir()
    fetch = f"fetch it where the Hub is reachable (hf download {repo_id}, HF_HUB_CACHE={cache}) and run again"

    def download(patterns: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id, cache_dir=cache, local_files_only=offline, allow_patterns=COMMON_PATTERNS + patterns
            )
        )

    try:
        folder = download(SAFETENSORS_PATTERNS)
        if not offline and not _has_weights(folder):
            folder = download(TORCH_PATTERNS)
    except GatedRepoError:
        raise MergeInputError(
            f"{repo_id}: a gated model on the Hugging Face Hub; accept its terms on huggingface.co/{repo_id} and log "
            "in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise MergeInputError(
            f"{repo_id}: neither a path here nor a model on the Hugging Face Hub (or a private one: log in with "
            "hf auth login); check the name"
        ) from None
    except LocalEntryNotFoundError:
        if offline:
            raise MergeInputError(
                f"{repo_id}: not a path, and not (fully) in the Hugging Face cache ({cache}) while HF_HUB_OFFLINE=1; {fetch}"
            ) from None
        raise MergeInputError(
            f"{repo_id}: not a path, and the Hugging Face Hub cannot be reached (nor is it cached in {cache}); "
            f"check the connection, or {fetch}"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MergeInputError(f"{repo_id}: fetching it from the Hugging Face Hub failed ({what}); {fetch}") from None
    return folder
