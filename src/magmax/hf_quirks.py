"""Hugging Face checkpoints as people have them: aligning a base and its fine-tunes before a merge.

Checkpoints of one model rarely have identical key sets and shapes. :func:`align_inputs` wraps the
readers of a merge in views that agree, and says in one line each what it did:

* **buffers** (tensors that are not parameters: non-floating ones such as ``position_ids`` or
  ``num_batches_tracked``, or known buffer names such as ``running_mean``) that some inputs lack are taken
  from the base (transformers saves ``position_ids`` in some versions and not in others); buffers only
  fine-tuned models have are left out (the base's architecture does not have them);
* **key prefixes**: a fine-tune saved with a task head (``BertForSequenceClassification``: ``bert.`` +
  ``classifier.*``) over a bare base (``BertModel``), or the other way round, is matched by the longest
  consistent prefix; the tensors the base lacks (the head) are reported and left out, or, with
  ``keep_extra``, copied unmerged from the first fine-tuned model (in the order given) that has them; the
  output then takes that model's key names and config.json, so it loads as the fine-tunes' architecture;
* **vocabularies** of different sizes (embedding rows 30,530 against 30,522): the rows every input has are
  merged; the output has the rows of ``vocab`` (``"base"`` or a fine-tuned model's 1-based index), the rows
  beyond the shared ones copied from it, and its tokenizer files and ``vocab_size``.

Anything else that does not match is left to the engine, which refuses it in one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from magmax.engine import TensorMeta, TensorReader
from magmax.errors import ConfigError, MergeInputError

KNOWN_BUFFER_NAMES = frozenset(
    {"position_ids", "token_type_ids", "num_batches_tracked", "running_mean", "running_var", "inv_freq", "masked_bias"}
)
"""Last name components of float or integer buffers that transformers / torch modules register."""

# Without a config.json to compare rows with vocab_size, a tensor whose rows differ is a vocabulary
# tensor only if its name says so.
_VOCAB_NAME = re.compile(r"embed|lm_head|wte|decoder|predictions|shared")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def is_buffer(key: str, meta: TensorMeta) -> bool:
    """Whether a tensor is a buffer rather than a trained parameter (non-floating, or a known buffer name)."""
    return not meta.dtype.is_floating_point or key.rsplit(".", 1)[-1] in KNOWN_BUFFER_NAMES


def read_config(folder: Path | None) -> dict[str, Any] | None:
    """A model folder's config.json as a dict (None without one, or when it is not a JSON object)."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class KeyMap:
    """base key ``base_prefix + rest`` ↔ fine-tuned key ``ft_prefix + rest`` (both empty: the identity)."""

    base_prefix: str = ""
    ft_prefix: str = ""

    def to_ft(self, key: str) -> str | None:
        if not key.startswith(self.base_prefix):
            return None
        return self.ft_prefix + key[len(self.base_prefix) :]

    @property
    def identity(self) -> bool:
        return self.base_prefix == self.ft_prefix


def _prefix_counts(keys: Sequence[str], other: set[str]) -> dict[str, int]:
    """For every prefix p (ending in '.') of a key k with k[len(p):] in ``other``: how many keys it maps."""
    counts: dict[str, int] = {}
    for key in keys:
        for match in re.finditer(r"\.", key):
            prefix = key[: match.end()]
            if key[match.end() :] in other:
                counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def find_key_map(base_keys: Sequence[str], ft_keys: Sequence[str]) -> KeyMap:
    """The prefix mapping that matches the most keys (the identity unless a prefix matches more)."""
    base_set, ft_set = set(base_keys), set(ft_keys)
    best, best_count = KeyMap(), len(base_set & ft_set)
    for prefix, count in sorted(_prefix_counts(ft_keys, base_set).items()):
        if count > best_count:
            best, best_count = KeyMap("", prefix), count
    for prefix, count in sorted(_prefix_counts(base_keys, ft_set).items()):
        if count > best_count:
            best, best_count = KeyMap(prefix, ""), count
    return best


class AlignedReader:
    """A view of one checkpoint under the base's key names: each key read from ``sources[key]`` (this
    model's own tensor, or the base's for a buffer it lacks), vocabulary tensors cut to ``rows[key]``."""

    def __init__(self, reader: TensorReader, sources: dict[str, tuple[TensorReader, str]], rows: dict[str, int]):
        self.reader = reader
        self.name = reader.name
        self.model_folder = getattr(reader, "model_folder", None)
        self._sources = sources
        self._rows = rows

    def keys(self) -> list[str]:
        return list(self._sources)

    def meta(self, key: str) -> TensorMeta:
        reader, src = self._sources[key]
        meta = reader.meta(src)
        if key in self._rows:
            return TensorMeta((self._rows[key], *meta.shape[1:]), meta.dtype)
        return meta

    def get(self, key: str) -> Tensor:
        reader, src = self._sources[key]
        tensor = reader.get(src)
        if key in self._rows and tensor.shape[0] != self._rows[key]:
            tensor = tensor[: self._rows[key]]
        return tensor


@dataclass(frozen=True)
class VocabTail:
    """Rows ``start:stop`` of the output tensor, copied from ``reader``'s ``key``."""

    reader: TensorReader
    key: str
    start: int
    stop: int


@dataclass
class Alignment:
    """The aligned readers of a merge and what the output is made of besides the merged tensors."""

    base: TensorReader
    finetuned: list[TensorReader]
    notes: list[str] = field(default_factory=list)
    """One line per adjustment made, for the user."""
    out_names: dict[str, str] = field(default_factory=dict)
    """Output name of a base key where it differs (``keep_extra`` with a prefix)."""
    tails: dict[str, VocabTail] = field(default_factory=dict)
    extras: list[tuple[str, TensorReader, str]] = field(default_factory=list)
    """(output key, reader, its key) of tensors the base lacks that are kept (``keep_extra``)."""
    config_source: Path | None = None
    """Model folder whose config.json the output takes (None: the base's)."""
    tokenizer_source: Path | None = None
    """Model folder whose tokenizer files the output takes (None: the base's)."""
    vocab_size: int | None = None
    """vocab_size to write into the output's config.json (None: unchanged)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """What was mapped, for the model card."""

    def out_name(self, key: str) -> str:
        return self.out_names.get(key, key)

    def out_meta(self, key: str, meta: TensorMeta) -> TensorMeta:
        tail = self.tails.get(key)
        return meta if tail is None else TensorMeta((tail.stop, *meta.shape[1:]), meta.dtype)


def _short(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _vocab_like(key: str, rows: int, vocab_size: Any) -> bool:
    if isinstance(vocab_size, int):
        return rows == vocab_size
    return _VOCAB_NAME.search(key) is not None


def _vocab_rows_differ(key: str, bm: TensorMeta, fm: TensorMeta, base_vocab: Any, ft_vocab: Any, src: str) -> bool:
    return (
        bm.shape != fm.shape
        and len(bm.shape) == len(fm.shape) >= 1
        and bm.shape[1:] == fm.shape[1:]
        and bm.dtype == fm.dtype
        and bm.dtype.is_floating_point
        and _vocab_like(key, bm.shape[0], base_vocab)
        and _vocab_like(src, fm.shape[0], ft_vocab)
    )


def align_inputs(
    base: TensorReader,
    finetuned: Sequence[TensorReader],
    *,
    vocab: str | None = None,
    keep_extra: bool = False,
) -> Alignment:
    """Views of ``base`` and ``finetuned`` with the same keys and shapes, and what the output needs besides
    (see the module docstring). Raises a one-line error for what stays ambiguous."""
    base_keys = base.keys()
    base_metas = {key: base.meta(key) for key in base_keys}
    base_folder = getattr(base, "model_folder", None)
    base_vocab = (read_config(base_folder) or {}).get("vocab_size")
    plans: list[dict[str, tuple[TensorReader, str]]] = []
    maps: list[KeyMap] = []
    filled: dict[str, list[str]] = {}  # buffer key → models that lacked it
    dropped_buffers: set[str] = set()
    extras_of: list[list[str]] = []
    rows: dict[str, list[int]] = {}  # vocab key → rows of the base, then of each fine-tune

    for index, reader in enumerate(finetuned):
        ft_keys = reader.keys()
        key_map = find_key_map(base_keys, ft_keys)
        ft_set = set(ft_keys)
        ft_vocab = (read_config(getattr(reader, "model_folder", None)) or {}).get("vocab_size")
        sources: dict[str, tuple[TensorReader, str]] = {}
        used: set[str] = set()
        for key in base_keys:
            src = key_map.to_ft(key)
            if src is not None and src in ft_set:
                sources[key] = (reader, src)
                used.add(src)
                fm, bm = reader.meta(src), base_metas[key]
                if _vocab_rows_differ(key, bm, fm, base_vocab, ft_vocab, src):
                    rows.setdefault(key, [bm.shape[0]] + [0] * len(finetuned))[index + 1] = fm.shape[0]
            elif is_buffer(key, base_metas[key]):
                sources[key] = (base, key)
                filled.setdefault(key, []).append(reader.name)
            # else: missing parameter, left out so that the engine names it
        extra = [k for k in ft_keys if k not in used]
        dropped_buffers.update(k for k in extra if is_buffer(k, reader.meta(k)))
        extra = [k for k in extra if not is_buffer(k, reader.meta(k))]
        if extra and key_map.identity and not keep_extra:
            raise MergeInputError(
                f"{reader.name}: tensor '{sorted(extra)[0]}' is not in the base ({base.name}) ({len(extra)} extra in "
                "all); merge only checkpoints of the same architecture, or pass --keep-extra to copy such tensors "
                "from the first model that has them"
            )
        plans.append(sources)
        maps.append(key_map)
        extras_of.append(extra)

    alignment = Alignment(base, [])
    notes = alignment.notes
    summary = alignment.summary

    # -- vocabulary --------------------------------------------------------------------------------------
    for key, counts in rows.items():  # fine-tunes whose rows equal the base's were not recorded
        for i, sources in enumerate(plans):
            if counts[i + 1] == 0:  # equal to the base's, or missing (which the engine reports)
                counts[i + 1] = sources[key][0].meta(sources[key][1]).shape[0] if key in sources else counts[0]
    differing = {key: counts for key, counts in rows.items() if len(set(counts)) > 1}
    source_index = 0
    if vocab is not None and vocab != "base":
        source_index = int(vocab)
        if not 1 <= source_index <= len(finetuned):
            raise ConfigError(
                f"--vocab {vocab}: there are {len(finetuned)} fine-tuned models; give base or 1..{len(finetuned)}"
            )
    if differing:
        key, counts = next(iter(differing.items()))
        if vocab is None:
            first = next(i for i, n in enumerate(counts) if n != counts[0])
            raise ConfigError(
                f"{finetuned[first - 1].name}: vocabulary of {counts[first]} rows ('{key}'), the base's has "
                f"{counts[0]}; pass --vocab base (the base's rows and tokenizer) or --vocab N (model N's, "
                f"1..{len(finetuned)})"
            )
        base_rows: dict[str, int] = {}
        for key, counts in differing.items():
            shared, out_rows = min(counts), counts[source_index]
            base_rows[key] = shared
            if out_rows > shared:
                reader = base if source_index == 0 else finetuned[source_index - 1]
                src = key if source_index == 0 else plans[source_index - 1][key][1]
                alignment.tails[key] = VocabTail(reader, src, shared, out_rows)
        alignment.base = AlignedReader(base, {k: (base, k) for k in base_keys}, base_rows)
        shared, out_rows = min(counts), counts[source_index]
        who = "the base" if source_index == 0 else finetuned[source_index - 1].name
        notes.append(
            f"vocabulary: rows 0..{shared - 1} of {_short(list(differing))} merged over every input; the output "
            f"has {out_rows} rows{f' (rows {shared}..{out_rows - 1} copied)' if out_rows > shared else ''} and "
            f"the tokenizer of {who} (--vocab {vocab})"
        )
        alignment.vocab_size = out_rows
        summary["vocab"] = {"source": vocab, "shared_rows": shared, "rows": out_rows, "tensors": list(differing)}
    else:
        base_rows = {}
    if vocab is not None and source_index > 0:
        alignment.tokenizer_source = getattr(finetuned[source_index - 1], "model_folder", None)
        if alignment.tokenizer_source is None:
            raise ConfigError(
                f"--vocab {vocab}: {finetuned[source_index - 1].name} is not a model folder, so it has no tokenizer "
                "files to take; pass --vocab base or give that model's folder"
            )
    alignment.finetuned = [AlignedReader(r, s, {k: n for k, n in base_rows.items() if k in s}) for r, s in
                           zip(finetuned, plans)]

    # -- buffers -----------------------------------------------------------------------------------------
    if filled or dropped_buffers:
        parts = []
        if filled:
            lacking = sorted({name for names in filled.values() for name in names})
            parts.append(f"{_short(sorted(filled))} taken from the base (absent from {_short(lacking, 2)})")
        if dropped_buffers:
            parts.append(f"{_short(sorted(dropped_buffers))} left out (the base has none)")
        notes.append("buffers: " + "; ".join(parts))
        summary["buffers_from_base"] = sorted(filled)
        summary["buffers_left_out"] = sorted(dropped_buffers)

    # -- prefixes and extra tensors ------------------------------------------------------------------------
    mapped = [(reader.name, m) for reader, m in zip(finetuned, maps) if not m.identity]
    if mapped:
        how = sorted({f"'{m.base_prefix}…' ↔ '{m.ft_prefix}…'" for _, m in mapped})
        notes.append(
            f"key names: the base's tensors found under another prefix ({', '.join(how)}) in "
            f"{_short([name for name, _ in mapped], 2)}"
        )
        summary["prefix_maps"] = {name: [m.base_prefix, m.ft_prefix] for name, m in mapped}
    all_extra = sorted({k for extra in extras_of for k in extra})
    if all_extra and not keep_extra:
        notes.append(f"left out {len(all_extra)} tensor(s) the base lacks ({_short(all_extra)}); --keep-extra copies "
                     "them from the first model that has them")
        summary["left_out"] = all_extra
    elif all_extra:
        head = next(i for i, extra in enumerate(extras_of) if extra)
        head_map = maps[head]
        taken: set[str] = set()
        for i, extra in enumerate(extras_of):
            for key in extra:
                if key not in taken:
                    alignment.extras.append((key, finetuned[i], key))
                    taken.add(key)
        if not head_map.identity:
            for key in base_keys:
                name = head_map.to_ft(key)
                if name is not None and name != key:
                    alignment.out_names[key] = name
        alignment.config_source = getattr(finetuned[head], "model_folder", None)
        named = f"; merged tensors named as in {finetuned[head].name}" if alignment.out_names else ""
        config = f", config.json from {finetuned[head].name}" if alignment.config_source is not None else ""
        notes.append(f"kept {len(all_extra)} tensor(s) the base lacks, unmerged, from the first model that has them "
                     f"({_short(all_extra)}){named}{config}")
        summary["kept_extra"] = {key: reader.name for key, reader, _ in alignment.extras}
    return alignment
