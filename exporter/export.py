"""Export the federation's model of one round: Hugging Face directory, peft adapter, GGUF.

Layout of an export directory (written whole or not at all, :mod:`exporter.output`)::

    hf/                 the full model (for the lora scope: the adapters merged into the
                        base), safetensors + config + tokenizer, float32:
                        AutoModelForCausalLM.from_pretrained("hf")
    adapter/            lora scope only: the peft adapter, float32:
                        PeftModel.from_pretrained(base, "adapter")
    model-f16.gguf      the full model as GGUF (or model-f32.gguf), with the source GGUF's
                        metadata and tokenizer: llama.cpp, Ollama, or transformers'
                        from_pretrained(export_dir, gguf_file="model-f16.gguf")
    export.json         what was exported: federation, round, fingerprints, base model

The model is rebuilt from the ledger and checked against the clients' fingerprints
first (:mod:`exporter.replay`); nothing is written when the check fails.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_client.model import source_gguf
from exporter.gguf_file import GGUF_DTYPES, write_gguf
from exporter.output import OutputExists, atomic_directory
from exporter.online import is_coordinator_url, rebuild_online
from exporter.replay import ExportError, LedgerFacts, read_ledger, rebuild

__all__ = ["FORMATS", "ExportResult", "default_formats", "export_model"]

logger = logging.getLogger(__name__)

FORMATS = ("hf", "adapter", "gguf")

Progress = Callable[[str, int, int], None]


@dataclass
class ExportResult:
    """What :func:`export_model` wrote.

    Attributes:
        directory: the export directory.
        round: the round exported.
        fingerprint: the rebuilt model's fingerprint.
        fingerprint_match: whether the clients' most reported fingerprint for the round is
            the rebuilt one (False only with ``verify=False``).
        files: format -> its path ("hf", "adapter", "gguf").
        seconds: wall time of the whole export.
        manifest: the contents of ``export.json``.
    """

    directory: Path
    round: int
    fingerprint: str
    fingerprint_match: bool
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)


def default_formats(facts: LedgerFacts, model_source: str) -> tuple[str, ...]:
    """Every format that applies: the adapter for the lora scope, the GGUF when the base
    model came from a GGUF file."""
    formats = ["hf"]
    if facts.scope.kind == "lora":
        formats.append("adapter")
    if source_gguf(model_source) is not None:
        formats.append("gguf")
    return tuple(formats)


def _check_names(formats: Sequence[str]) -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"unknown export format(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(FORMATS)}")


def _check_formats(formats: Sequence[str], facts: LedgerFacts, model_source: str) -> tuple[str, ...]:
    _check_names(formats)
    if "adapter" in formats and facts.scope.kind != "lora":
        raise ExportError("an adapter exists only for a lora-scope federation; this one trains the full model "
                          "(export hf or gguf)")
    if "gguf" in formats and source_gguf(model_source) is None:
        raise ExportError(f"GGUF export keeps the source GGUF's metadata and tokenizer, and the base model "
                          f"{model_source!r} is not a GGUF file; export hf (and convert it with llama.cpp's "
                          f"convert_hf_to_gguf.py)")
    return tuple(f for f in FORMATS if f in formats)


def export_model(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 model_source: str = "smollm2-135m", round_number: int | None = None,
                 formats: Sequence[str] | None = None, gguf_dtype: str = "f16",
                 cache_dir: str | os.PathLike[str] | None = None, replace: bool = False, verify: bool = True,
                 progress: Progress | None = None, key_path: str | None = None,
                 ca_file: str | None = None) -> ExportResult:
    """Rebuild the model of a round from the ledger, check it, and write it out.

    Args:
        source: the coordinator's ledger file, or a running coordinator's ``ws://`` /
            ``wss://`` URL (its latest round, synced as an observer: :mod:`exporter.online`).
        out: the export directory to create.
        model_source: the federation's base model (builtin name, .gguf, HF directory).
        round_number: the round (default: the last committed).
        formats: any of "hf", "adapter", "gguf" (default: :func:`default_formats`).
        gguf_dtype: "f16" or "f32".
        cache_dir: the model conversion cache.
        replace: replace an existing ``out``.
        verify: refuse unless the clients' reported fingerprint matches (see
            :func:`exporter.replay.check_fingerprint`).
        progress: ``progress(stage, done, total)``; stages "replay", "hf", "adapter", "gguf".
        key_path, ca_file: for a coordinator URL: the observer's key (allow-list mode) and
            the federation's CA (wss://).

    Raises:
        ExportError: anything the user can fix, in one message.
    """
    started = time.perf_counter()
    if gguf_dtype not in GGUF_DTYPES:
        raise ExportError(f"--gguf-dtype must be one of {', '.join(GGUF_DTYPES)}, got {gguf_dtype!r}")
    target = Path(out)
    if target.exists() and not replace:  # before minutes of replay, not after
        raise ExportError(f"{target} already exists; choose another output or pass --force to replace it")
    if is_coordinator_url(source):
        if formats is not None:
            _check_names(formats)
        rebuilt = rebuild_online(str(source), model_source, round_number=round_number, cache_dir=cache_dir,
                                 key_path=key_path, ca_file=ca_file, verify=verify, progress=progress)
        facts = rebuilt.facts
        chosen = (default_formats(facts, model_source) if formats is None
                  else _check_formats(formats, facts, model_source))
    else:
        facts = read_ledger(source)
        chosen = (default_formats(facts, model_source) if formats is None
                  else _check_formats(formats, facts, model_source))
        rebuilt = rebuild(source, model_source, round_number=round_number, cache_dir=cache_dir, verify=verify,
                          progress=progress)
    lora = facts.scope.kind == "lora"
    files: dict[str, Path] = {}
    manifest: dict[str, Any] = {
        "federation_id": facts.federation_id,
        "round": rebuilt.round,
        "fingerprint": rebuilt.fingerprint,
        "fingerprint_reports": rebuilt.reported,
        "fingerprint_match": bool(rebuilt.reported) and rebuilt.fingerprint in rebuilt.reported.values(),
        "base_model": str(model_source),
        "base_model_hash": facts.model_hash,
        "scope": facts.scope.kind if not lora else
        {"kind": "lora", "rank": facts.scope.lora_rank, "alpha": facts.scope.lora_alpha,
         "targets": list(facts.scope.lora_targets), "init_seed": facts.scope.lora_init_seed},
        "source": facts.source,
        "edgefed_version": _version(),
        "exported_at": time.time(),
        "files": {},
    }
    try:
        with atomic_directory(target, replace=replace) as partial:
            if "adapter" in chosen:
                _report(progress, "adapter", 0, 1)
                rebuilt.model.save_pretrained(partial / "adapter", safe_serialization=True)
                files["adapter"] = target / "adapter"
                _report(progress, "adapter", 1, 1)
            # The full model: the adapters merged into the base for the lora scope.
            full = rebuilt.model.merge_and_unload() if lora else rebuilt.model
            if "hf" in chosen:
                _report(progress, "hf", 0, 1)
                full.save_pretrained(partial / "hf", safe_serialization=True)
                rebuilt.tokenizer.save_pretrained(partial / "hf")
                files["hf"] = target / "hf"
                _report(progress, "hf", 1, 1)
            if "gguf" in chosen:
                source = source_gguf(model_source)
                assert source is not None  # _check_formats / default_formats
                name = f"model-{gguf_dtype}.gguf"
                try:
                    write_gguf(partial / name, full, source, dtype=gguf_dtype, progress=progress,
                               metadata={"edgefed.federation_id": facts.federation_id,
                                         "edgefed.round": str(rebuilt.round),
                                         "edgefed.fingerprint": rebuilt.fingerprint})
                except ValueError as error:
                    raise ExportError(str(error)) from None
                files["gguf"] = target / name
            manifest["files"] = {key: str(path.relative_to(target)) for key, path in files.items()}
            manifest["gguf_dtype"] = gguf_dtype if "gguf" in chosen else None
            (partial / "export.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except OutputExists as error:
        raise ExportError(str(error)) from None
    except OSError as error:
        raise ExportError(f"cannot write the export to {target}: {error}") from None
    return ExportResult(directory=target, round=rebuilt.round, fingerprint=rebuilt.fingerprint,
                        fingerprint_match=manifest["fingerprint_match"], files=files,
                        seconds=time.perf_counter() - started, manifest=manifest)


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _version() -> str:
    try:
        return importlib.metadata.version("edgefed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
