"""`magmax merge`: merge fine-tuned checkpoints on disk, out of core, into a new checkpoint.

    magmax merge --method magmax --base BASE FT1 FT2 … -o OUT [--scale 0.5] [--device cpu|cuda]
                 [--dtype float32|bfloat16|float16] [--option key=value …] [--shard-size 2GB] [--force]
                 [--vocab base|N] [--keep-extra] [--output-format safetensors|lora --rank R]
    magmax merge config.yaml [flags that override the file]

BASE and FT may be Hugging Face Hub ids (magmax.hub); an FT may be a PEFT LoRA adapter folder
(magmax.lora); ``--output-format lora`` writes the merged update as a LoRA adapter (magmax.lora_export).

The merge streams tensor by tensor (:class:`magmax.engine.MergeRun` over lazy readers, a sharded writer
writing as it goes), so memory stays a few copies of the largest tensor whatever the number and size
of the models. The result equals ``magmax.merge`` on the same state dicts, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import magmax
from magmax.checkpoints import (
    AtomicOutput,
    CheckpointReader,
    ShardedSafetensorsWriter,
    copy_model_files,
    open_checkpoint,
    recycled_read_buffers,
    tensor_nbytes,
)
from magmax import hub, lora, lora_export
from magmax.engine import MergeRun, MergeStats, TensorMeta, TensorWriter
from magmax.hf_quirks import Alignment, align_inputs
from magmax.errors import ConfigError, MergeInputError
from magmax.memory import format_bytes, peak_rss_bytes, return_large_buffers_to_the_os
from magmax.merge_config import MergeConfig, build_merge_config, parse_option, read_merge_yaml
from magmax.merging.backends import select
from magmax.merging.backends.fold import GROUP
from magmax.model_card import describe_output
from magmax.taskvector import check_finite
from magmax.termination import sigterm_unwinds

ProgressCallback = Callable[[str, int], None]


def resolve_device(name: str) -> torch.device:
    """The torch device for ``cpu`` / ``cuda`` / ``cuda:N``; CUDA that is not there is a one-line error."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {name}: CUDA is not available to this torch ({torch.__version__}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; pick another index"
            )
    return device


class FiniteOutputWriter:
    """Refuses a merged tensor holding NaN/Inf before it is written (the inputs were checked finite, so
    θ0 + λ·τ* overflowed: a huge λ, or the output dtype's range, e.g. float16's 65504)."""

    def __init__(self, writer: TensorWriter, merged_keys: Iterable[str], scale: float):
        self.writer = writer
        self.merged_keys = set(merged_keys)
        self.scale = scale

    def _check(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self.merged_keys:
            return
        try:
            check_finite(key, tensor, "merged")
        except MergeInputError:
            bad = int((~torch.isfinite(tensor.float())).sum())
            wider = "" if tensor.dtype in (torch.float32, torch.float64) else " or --dtype float32"
            raise MergeInputError(
                f"merged tensor '{key}' has {bad} NaN/Inf value(s) in {tensor.dtype}: θ0 + λ·τ* overflows "
                f"(λ={self.scale:g}); choose a smaller --scale{wider}"
            ) from None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._check(key, tensor)
        self.writer.write(key, tensor)

    def replace(self, key: str, tensor: torch.Tensor) -> None:
        self._check(key, tensor)
        self.writer.replace(key, tensor)


class AlignedOutputWriter:
    """Writes the engine's tensors under the output's names, with the vocabulary rows beyond the merged
    ones appended (:class:`magmax.hf_quirks.Alignment`)."""

    def __init__(self, writer: TensorWriter, alignment: Alignment):
        self.writer = writer
        self.alignment = alignment

    def _out(self, key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        tail = self.alignment.tails.get(key)
        if tail is not None:
            rows = tail.reader.get(tail.key)[tail.start : tail.stop].to(tensor.device, tensor.dtype)
            tensor = torch.cat([tensor, rows])
        return self.alignment.out_name(key), tensor

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.writer.write(*self._out(key, tensor))

    def replace(self, key: str, tensor: torch.Tensor) -> None:
        self.writer.replace(*self._out(key, tensor))


class CheckpointMerge:
    """One configured merge of checkpoint files: opens everything on ``with``, :meth:`run` writes OUT.

    Leaving the ``with`` block closes the readers and, unless :meth:`run` finished, removes every
    partial output (nothing appears at OUT); SIGTERM inside the block does the same before the process
    ends (:func:`magmax.termination.sigterm_unwinds`).
    """

    def __init__(self, config: MergeConfig):
        self.config = config
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> CheckpointMerge:
        config = self.config
        try:
            method = config.create_method()
            device = resolve_device(config.device)
            # Entered first, so left last: a SIGTERM unwinds through the removal of the partial output.
            self._stack.enter_context(sigterm_unwinds())
            # Hub ids become their snapshot folders (downloaded, or from the cache offline): magmax.hub.
            base_path, model_paths = hub.resolve(config.base), [hub.resolve(path) for path in config.models]
            self.input_paths = [base_path, *model_paths]
            self.output = self._stack.enter_context(
                AtomicOutput(config.output, force=config.force, inputs=[base_path, *model_paths])
            )
            self.base = self._open(lora.check_base(base_path))
            # A PEFT LoRA adapter folder reads as θ0 + ΔW over its own reader of the base: magmax.lora.
            finetuned = [self._stack.enter_context(lora.open_input(path, base_path)) for path in model_paths]
            self.alignment = align_inputs(self.base, finetuned, vocab=config.vocab, keep_extra=config.keep_extra)
            # A LoRA output factors Δ = θ − θ0, taken from a float32 θ (the output dtype is the factors').
            out_dtype = torch.float32 if config.output_format == "lora" else config.torch_dtype
            self.engine = MergeRun(method, self.alignment.base, self.alignment.finetuned, device=device,
                                   out_dtype=out_dtype)
        except BaseException as exc:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _open(self, path: Path) -> CheckpointReader:
        return self._stack.enter_context(open_checkpoint(path))

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)  # the exception too: the SIGTERM guard acts on it

    @property
    def tensor_count(self) -> int:
        return len(self.engine.keys) + len(self.alignment.extras)

    def _planned_outputs(self) -> list[tuple[str, TensorMeta]]:
        # The engine casts merged (floating-point) tensors to out_dtype and copies the rest from the base.
        out_dtype = self.config.torch_dtype
        merged = set(self.engine.float_keys)
        entries = []
        alignment = self.alignment
        for key in self.engine.keys:
            meta = alignment.out_meta(key, self.engine.base.meta(key))
            if out_dtype is not None and key in merged:
                meta = TensorMeta(meta.shape, out_dtype)
            entries.append((alignment.out_name(key), meta))
        for name, reader, key in alignment.extras:
            meta = reader.meta(key)
            if out_dtype is not None and meta.dtype.is_floating_point:
                meta = TensorMeta(meta.shape, out_dtype)
            entries.append((name, meta))
        return entries

    def _provenance(self) -> str:
        # Stored in every shard's safetensors metadata (string values only), so the file says how it was made.
        return json.dumps(
            {
                "magmax_version": magmax.__version__,
                "method": self.config.method,
                "scale": self.engine.method.scale,
                "options": self.engine.method.options.model_dump(mode="json", exclude={"scale"}),
                "base": str(self.config.base),
                "models": [str(p) for p in self.config.models],
                "dtype": self.config.dtype,
                "weights": getattr(self.engine.method.options, "weights", None),
                "vocab": self.config.vocab,
                "keep_extra": self.config.keep_extra,
                "mapped": self.alignment.summary,
            }
        )

    def run(self, progress: ProgressCallback | None = None) -> MergeStats:
        config = self.config
        if config.output_format == "lora":
            return self._run_lora(progress)
        return_large_buffers_to_the_os()  # keeps peak RSS to the tensors alive (see its docstring)
        writer = ShardedSafetensorsWriter(
            self.output.folder,
            self._planned_outputs(),
            max_shard_bytes=None if config.single_file else config.shard_size,
            metadata={"magmax_merge": self._provenance()},
        )
        largest = max((tensor_nbytes(self.engine.base.meta(key)) for key in self.engine.keys), default=0)
        try:
            # Reads reuse the buffers of tensors the merge is done with: at most a group of inputs, θ0
            # and a little slack are alive at once (fresh pages cost as much as the reads themselves).
            named = AlignedOutputWriter(writer, self.alignment)
            checked = FiniteOutputWriter(named, self.engine.float_keys, self.engine.method.scale)
            with recycled_read_buffers(largest, GROUP + 2):
                stats = self.engine.run(checked, progress)
                self._write_extras(writer, stats, progress)
            writer.close()
        finally:
            writer.abort()
        if not config.single_file:
            if self.base.model_folder is not None:
                copy_model_files(self.base.model_folder, self.output.folder)
            describe_output(self.output.folder, config, method=self.engine.method, alignment=self.alignment,
                            tensors=stats.tensors, inputs=self.input_paths)
        self.output.commit()
        return stats


    def _write_extras(self, writer: TensorWriter, stats: MergeStats, progress: ProgressCallback | None) -> None:
        """Tensors the base lacks, copied unmerged (``keep_extra``), floating ones cast to ``--dtype``."""
        out_dtype = self.config.torch_dtype
        for name, reader, key in self.alignment.extras:
            tensor = reader.get(key)
            if out_dtype is not None and tensor.dtype.is_floating_point:
                tensor = tensor.to(out_dtype)
            writer.write(name, tensor)
            stats.tensors += 1
            stats.parameters += tensor.numel()
            if progress is not None:
                progress(name, tensor.numel())

    def _run_lora(self, progress: ProgressCallback | None) -> MergeStats:
        """The merged update as a PEFT LoRA adapter of rank ``config.rank`` (magmax.lora_export)."""
        config = self.config
        assert config.rank is not None
        targets, _ = lora_export.plan_targets(self.base, self.engine.float_keys)
        self.lora_writer = lora_export.LoraExportWriter(self.base, targets, config.rank, config.torch_dtype)
        checked = FiniteOutputWriter(self.lora_writer, self.engine.float_keys, self.engine.method.scale)
        stats = self.engine.run(checked, progress)
        self.lora_writer.save(self.output.folder, str(config.base), self._provenance())
        self.output.commit()
        return stats


def merge_checkpoints(config: MergeConfig, progress: ProgressCallback | None = None) -> MergeStats:
    """Run the merge ``config`` describes (Python entry point of `magmax merge`)."""
    with CheckpointMerge(config) as merge:
        return merge.run(progress)


def _config_from_cli(inputs: list[str], flags: dict[str, Any], options: list[str]) -> MergeConfig:
    values: dict[str, Any] = {}
    source = "magmax merge"
    if inputs and Path(inputs[0]).suffix.lower() in (".yaml", ".yml"):
        source = inputs[0]
        if len(inputs) > 1:
            raise ConfigError(
                f"{inputs[0]}: give the fine-tuned models in the config file (models:), not also on the command line"
            )
        values = read_merge_yaml(Path(inputs[0]))
    elif inputs:
        values["models"] = inputs
    # Flags given on the command line override the file.
    values.update({key: value for key, value in flags.items() if value is not None})
    if options:
        file_options = values.get("options") or {}
        if not isinstance(file_options, dict):
            raise ConfigError(f"{source}: 'options' must be a mapping of option names to values")
        values["options"] = {**file_options, **dict(parse_option(text) for text in options)}
    return build_merge_config(values, source)


def _help(field: str) -> str:
    return MergeConfig.model_fields[field].description or ""


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def merge_command(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="fine-tuned checkpoints FT1 FT2 …, or one YAML config file",
            metavar="FT… | CONFIG.yaml",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", "-m", help=_help("method"), metavar="NAME", show_default=False)
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", "-b", help=_help("base"), metavar="PATH", show_default=False)
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help=_help("output"), metavar="OUT", show_default=False)
    ] = None,
    scale: Annotated[
        str | None, typer.Option("--scale", help=_help("scale"), metavar="FLOAT", show_default=False)
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help=_help("device"), metavar="DEVICE", show_default=False)
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help=_help("dtype"), metavar="DTYPE", show_default=False)
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            help="method option key=value (value read as YAML), repeatable",
            metavar="KEY=VALUE",
            show_default=False,
        ),
    ] = None,
    shard_size: Annotated[
        str | None, typer.Option("--shard-size", help=_help("shard_size"), metavar="SIZE", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help=_help("force"))] = False,
    vocab: Annotated[
        str | None, typer.Option("--vocab", help=_help("vocab"), metavar="base|N", show_default=False)
    ] = None,
    keep_extra: Annotated[bool, typer.Option("--keep-extra", help=_help("keep_extra"))] = False,
    output_format: Annotated[
        str | None,
        typer.Option("--output-format", help=_help("output_format"), metavar="FORMAT", show_default=False),
    ] = None,
    rank: Annotated[
        str | None, typer.Option("--rank", help=_help("rank"), metavar="R", show_default=False)
    ] = None,
) -> None:
    """Merge fine-tuned checkpoints onto their base, tensor by tensor, into OUT."""
    # Values stay strings here: the one pydantic model parses and validates them, for YAML and CLI alike.
    flags = {
        "method": method,
        "base": base,
        "output": output,
        "scale": scale,
        "device": device,
        "dtype": dtype,
        "shard_size": shard_size,
        "force": True if force else None,
        "vocab": vocab,
        "keep_extra": True if keep_extra else None,
        "output_format": output_format,
        "rank": rank,
    }
    config = _config_from_cli(inputs or [], flags, option or [])
    console = Console(stderr=True)
    start = time.perf_counter()
    with CheckpointMerge(config) as merge:
        for note in merge.alignment.notes:  # what was adjusted to fit the inputs together, one line each
            typer.echo(note, err=True)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        # In a pipe or a log the bar would only add noise: it shows on terminals only.
        with Progress(*columns, console=console, disable=not console.is_terminal, transient=True) as bar:
            task = bar.add_task(f"merging with {config.method}", total=merge.tensor_count)
            stats = merge.run(lambda key, numel: bar.advance(task))
        method = merge.engine.method
        lora_report = merge.lora_writer.report if config.output_format == "lora" else None
    seconds = time.perf_counter() - start
    typer.echo(
        f"merged {stats.tensors} tensors ({_count(stats.parameters)} parameters, "
        f"{_count(stats.merged_parameters)} merged) "
        f"of {len(config.models)} fine-tuned model(s) with {config.method} (λ={method.scale:g}) in {seconds:.1f} s, "
        f"peak RSS {format_bytes(peak_rss_bytes())} → {config.output}"
    )
    if lora_report is not None:
        typer.echo(lora_report.line())
    # First-run cost: a hint where the numba kernels were skipped only because they are not compiled.
    if merge.engine.device.type == "cpu" and select.numba_declined():
        typer.echo("note: merged on the torch kernels, as the numba CPU kernels are not compiled yet; "
                   "`magmax warmup` compiles them once (minutes), for faster merges after", err=True)
