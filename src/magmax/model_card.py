"""A merged model folder that describes itself: config.json, tokenizer, model card and recipe.

After the tensors are written, :func:`describe_output` makes the folder say what it is:

* ``config.json`` (the base's, or the one :class:`magmax.hf_quirks.Alignment` names): ``dtype`` and
  ``torch_dtype`` set to the merged tensors' dtype when ``--dtype`` is given (so
  ``AutoModel.from_pretrained(out, dtype="auto")`` loads that dtype), ``vocab_size`` to the output's rows;
* the tokenizer files of the model whose vocabulary the output has (``--vocab N``);
* ``README.md``: a model card saying it is a merge, of which inputs (paths and the sha256 of their weight
  files), with which method, λ, options, weights and magmax version, and what was mapped; it replaces the
  base's README (which describes the base model);
* ``magmax_recipe.yaml``: the merge as a config file; ``magmax merge magmax_recipe.yaml -o NEW`` makes the
  same tensors, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import magmax
from magmax.checkpoints import find_weights
from magmax.errors import MergeInputError
from magmax.hf_quirks import TOKENIZER_FILES, Alignment

RECIPE_NAME = "magmax_recipe.yaml"
CARD_NAME = "README.md"


def weight_files(path: Path) -> list[Path]:
    """The files holding an input's weights: the file, a folder's weight file, or an index and its shards."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_model.safetensors").is_file():  # a PEFT LoRA adapter folder
        return [path / "adapter_model.safetensors"]
    target = find_weights(path) if path.is_dir() else path
    if not target.name.endswith(".index.json"):
        return [target]
    weight_map = json.loads(target.read_text()).get("weight_map", {})
    return [target, *(target.parent / name for name in sorted(set(weight_map.values())))]


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def input_digests(path: Path) -> dict[str, str]:
    """{weight file name: sha256} of one input (read once more, in chunks: memory stays flat)."""
    return {file.name: sha256(file) for file in weight_files(path)}


def _recipe_path(value: Any) -> str:
    """An input as the recipe names it: a Hub id as given, a path made absolute."""
    from magmax.hub import is_hub_input

    return str(value) if is_hub_input(value) else str(Path(value).absolute())


def recipe(config: Any, scale: float, options: dict[str, Any]) -> dict[str, Any]:
    """The merge as the keys of a YAML config (absolute paths; λ and every option resolved; no output)."""
    data: dict[str, Any] = {
        "method": config.method,
        "base": _recipe_path(config.base),
        "models": [_recipe_path(p) for p in config.models],
        "scale": scale,
        "options": {k: v for k, v in options.items() if k != "weights"},
    }
    if options.get("weights") is not None:
        data["weights"] = list(options["weights"])
    for key in ("dtype", "vocab"):
        if getattr(config, key) is not None:
            data[key] = getattr(config, key)
    if config.keep_extra:
        data["keep_extra"] = True
    data["device"] = config.device
    data["shard_size"] = config.shard_size
    return data


def write_recipe(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / RECIPE_NAME
    header = (
        f"# How this model was made (magmax {magmax.__version__}). The same tensors, bit for bit:\n"
        f"#   magmax merge {RECIPE_NAME} -o NEW_OUTPUT\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def update_config(folder: Path, dtype: str | None, vocab_size: int | None, source: Path | None) -> None:
    """config.json of the output: taken from ``source`` if given, then dtype and vocab_size set."""
    path = folder / "config.json"
    if source is not None and (source / "config.json").is_file():
        shutil.copy2(source / "config.json", path)
    if not path.is_file() or (dtype is None and vocab_size is None):
        return
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MergeInputError(f"{path}: config.json of the base is not JSON; fix it in the base folder") from None
    if not isinstance(config, dict):
        return
    if dtype is not None:
        # transformers 5 reads "dtype"; older versions "torch_dtype": both say the same.
        config["dtype"] = dtype
        config["torch_dtype"] = dtype
    if vocab_size is not None and "vocab_size" in config:
        config["vocab_size"] = vocab_size
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(folder: Path, source: Path) -> list[str]:
    """Replace the output's tokenizer files with ``source``'s (the model whose vocabulary it has)."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    return copied


def _library(folder: Path) -> str:
    return "sentence-transformers" if (folder / "modules.json").is_file() else "transformers"


def model_card(
    folder: Path,
    config: Any,
    *,
    method: Any,
    alignment: Alignment,
    digests: Sequence[dict[str, str]],
    tensors: int,
) -> str:
    """The README.md text of a merged model."""
    options = method.options.model_dump(mode="json", exclude={"scale"})
    weights = options.pop("weights", None)
    inputs = [("base", config.base), *((f"model {i}", p) for i, p in enumerate(config.models, 1))]
    lines = [
        "---",
        f"library_name: {_library(folder)}",
        "tags:",
        "- merge",
        "- magmax",
        f"- {config.method}",
        "---",
        "",
        f"# {Path(config.output).name}",
        "",
        f"A merge of {len(config.models)} fine-tuned model(s) onto their base, made with "
        f"magmax {magmax.__version__} (`magmax merge`): θ = θ0 + λ·τ*, τ* = {config.method}(τ_1..τ_T), "
        "τ_t = θ_t − θ0.",
        "",
        "## Method",
        "",
        f"- method: `{config.method}` ({type(method).reference})",
        f"- λ (scale): {method.scale:g}",
        f"- options: `{json.dumps(options, sort_keys=True)}`",
    ]
    if weights is not None:
        lines.append(f"- per-model weights: {', '.join(f'{w:g}' for w in weights)} (models 1..{len(weights)})")
    lines += [
        f"- dtype of the merged tensors: {config.dtype or 'as in the base'}",
        f"- tensors written: {tensors}",
        "",
        "## Inputs",
        "",
        "| role | path | weight files (sha256) |",
        "| --- | --- | --- |",
    ]
    for (role, path), files in zip(inputs, digests):
        shown = "<br>".join(f"`{name}` {digest}" for name, digest in files.items())
        lines.append(f"| {role} | `{Path(path).absolute()}` | {shown} |")
    if alignment.notes:
        lines += ["", "## What was mapped", ""] + [f"- {note}" for note in alignment.notes]
    lines += [
        "",
        "## Reproduce",
        "",
        f"`{RECIPE_NAME}` in this folder is the recipe; this makes the same tensors, bit for bit:",
        "",
        "```",
        f"magmax merge {RECIPE_NAME} -o NEW_OUTPUT",
        "```",
        "",
    ]
    return "\n".join(lines)


def describe_output(
    folder: Path,
    config: Any,
    *,
    method: Any,
    alignment: Alignment,
    tensors: int,
    inputs: list[Path] | None = None,
) -> None:
    """config.json, tokenizer files, README.md and magmax_recipe.yaml of a merged model folder.

    ``inputs``: the local folders or files of base and models (Hub ids resolved), for their digests."""
    update_config(folder, config.dtype, alignment.vocab_size, alignment.config_source)
    if alignment.tokenizer_source is not None:
        copy_tokenizer(folder, alignment.tokenizer_source)
    digests = [input_digests(Path(p)) for p in (inputs or [config.base, *config.models])]
    options = method.options.model_dump(mode="json", exclude={"scale"})
    write_recipe(folder, recipe(config, method.scale, options))
    card = model_card(folder, config, method=method, alignment=alignment, digests=digests, tensors=tensors)
    (folder / CARD_NAME).write_text(card)
