"""How models and protocols are named in every output: tables, results files, plots, the report page and
the evaluation lines of a running run all call :func:`model_label`, so they all say the same thing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from magmax.config import StreamConfig

METHOD_NAMES = {
    "average": "Average",
    "breadcrumbs": "Breadcrumbs",
    "consensus": "Consensus",
    "dare": "DARE",
    "iso_c": "Iso-C",
    "iso_cts": "Iso-CTS",
    "magmax": "MagMax",
    "opcm": "OPCM",
    "random": "Random",
    "task_arithmetic": "Task Arithmetic",
    "ties": "TIES",
    "tsv": "TSV",
}
REGULARIZER_NAMES = {"lwf": "LwF", "ewc": "EWC"}


def protocol_name(stream: StreamConfig) -> str:
    """The fine-tuning protocol as the paper names it: Seq-FT, Ind-FT, LwF, EWC."""
    base = "Seq-FT" if stream.start == "previous" else "Ind-FT"
    if stream.regularizer == "none":
        return base
    reg = REGULARIZER_NAMES[stream.regularizer]
    return reg if stream.start == "previous" else f"{base} + {reg}"


def protocol_names(streams: Sequence[StreamConfig]) -> dict[str, str]:
    """Stream name → protocol name; streams that share a protocol are told apart by their names."""
    names = {s.name: protocol_name(s) for s in streams}
    counts = {p: list(names.values()).count(p) for p in names.values()}
    return {s: (p if counts[p] == 1 else f"{p} ({s})") for s, p in names.items()}


def model_label(name: str, model: dict[str, Any], n_tasks: int, after_task: int | None = None) -> str:
    """``zero-shot (θ0)``, ``Seq-FT final (θ_5)``, ``MagMax on Seq-FT τ``, ``joint (upper bound)``.

    ``model`` is a results.json model entry (kind, protocol or stream, method); ``after_task`` names θ_t
    while the run is under way instead of the final θ_T.
    """
    kind = model.get("kind")
    if kind == "zero-shot":
        return "zero-shot (θ0)"
    if kind == "joint":
        return "joint (upper bound)"
    stream, _, what = name.partition(":")
    protocol = model.get("protocol") or stream
    if kind == "finetune":
        return f"{protocol} (θ_{after_task})" if after_task is not None else f"{protocol} final (θ_{n_tasks})"
    method = model.get("method")
    # A merge's own label (set in the config) wins over the method's name: it is what tells two apart.
    shown = METHOD_NAMES.get(method, method) if what == method else what
    return f"{shown} on {protocol} τ"


def label_of(name: str, model: dict[str, Any], results: dict[str, Any]) -> str:
    return model.get("label") or model_label(name, model, len(results.get("tasks", [])))
