"""`pipe evaluate`: held-out perplexity, BLiMP and calibration of model folders, as one JSON document.

The results document (``RUN/eval/results.json`` for a run; ``--out`` on the command line)::

    {"format": "logitcache-eval", "version": 1,
     "provenance": {versions, git_commit, command, platform, time},
     "settings":   {data, split, blimp, batch_size, ece_bins, device, ...},
     "models": [{"name", "path", "architecture", "parameters", "seconds",
                 "held_out": {split, windows, tokens, loss, perplexity, ece, reliability{...}} | null,
                 "blimp": {overall, pairs, fields{}, phenomena{}, paradigms{UID: {...}}} | null}, ...],
     "random_twins": [{"name", "twin_of", "init_seed", "architecture", "parameters", "seconds",
                       "held_out", "blimp"}, ...],   (with random_twins only)
     "references": [{"name", "description", "held_out": {...}}, ...]}   (a run's evaluate stage only)

A random twin (``random_twins``) is a randomly initialised model of the same configuration as one
or more of the evaluated models (``AutoModelForCausalLM.from_config`` under ``torch.manual_seed(0)``),
scored exactly like them: one per distinct architecture, named ``random-init/`` + the first model's
name. It is what "the model learned something" is measured against: BLiMP's chance level is 50 %,
but an untrained model of a given architecture need not sit there.

``held_out`` is null without prepared data, ``blimp`` null without a BLiMP directory. Non-finite
numbers are written as null (JSON has no NaN).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitcache.pipeline.config import EVAL_SPLITS, Config, EvalConfig, EvalSplit
from logitcache.pipeline.distributed import resolve_device
from logitcache.pipeline.errors import ConfigError, DataError, StageError
from logitcache.pipeline.evaluation.blimp import BlimpPair, evaluate_blimp, read_blimp, subset_per_paradigm
from logitcache.pipeline.evaluation.compare import headline_lines
from logitcache.pipeline.evaluation.heldout import evaluate_held_out
from logitcache.pipeline.evaluation.loading import check_model_matches_data, load_causal_lm, load_tokenizer
from logitcache.pipeline.models import check_model_dir, count_parameters, has_tokenizer
from logitcache.pipeline.preflight import REPLACED_SUFFIX, check_writable
from logitcache.pipeline.prepare import PreparedData
from logitcache.pipeline.rundir import (
    MODEL_GROUPS,
    RunLayout,
    atomic_write_text,
    git_commit,
    package_versions,
)
from logitcache.pipeline.teacher_signal import check_teacher

RESULTS_FORMAT = "logitcache-eval"
RESULTS_VERSION = 1
_DEFAULTS = EvalConfig()  # the defaults of `pipe evaluate`, of a run's evaluate stage and of EvalOptions


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate on and how (the CLI's options; the library's keyword arguments).

    Defaults: those of the config's ``[evaluate]`` section (:class:`EvalConfig`).
    """

    data_dir: Path | None = None  # a prepared RUN/data folder: held-out perplexity and ECE
    blimp_dir: Path | None = None  # a directory of BLiMP .jsonl files
    blimp_pairs: int = _DEFAULTS.blimp_pairs  # pairs per paradigm (a fixed sample); 0 = all
    split: EvalSplit = _DEFAULTS.split
    batch_size: int = _DEFAULTS.batch_size
    ece_bins: int = _DEFAULTS.ece_bins
    random_twins: bool = _DEFAULTS.random_twins  # also score a random-init twin per architecture
    device: str = "auto"

    @classmethod
    def from_config(cls, config: Config) -> EvalOptions:
        """The options of a run's evaluate stage: ``[evaluate]`` of the config, on ``RUN/data``."""
        section = config.evaluate
        return cls(
            data_dir=RunLayout.of(config).data,
            blimp_dir=Path(section.blimp_dir) if section.blimp_dir else None,
            blimp_pairs=section.blimp_pairs,
            split=section.split,
            batch_size=section.batch_size,
            ece_bins=section.ece_bins,
            random_twins=section.random_twins,
            device=config.run.device,
        )


def find_run_models(run_dir: str | Path) -> list[Path]:
    """Finished model folders of a run: ``RUN/teachers/*`` then ``RUN/students/*`` holding config.json."""
    layout = RunLayout(Path(run_dir))
    found: list[Path] = []
    for root in (layout.teachers, layout.students):
        if root.is_dir():
            found.extend(
                sorted(
                    p
                    for p in root.iterdir()
                    if p.is_dir() and (p / "config.json").is_file() and not p.name.endswith(REPLACED_SUFFIX)
                )
            )  # NAME.replaced: an old model an unfinished --overwrite keeps until the new one is complete
    return found


def model_name(path: Path) -> str:
    """``teachers/llama`` for a run's model folders, the folder name otherwise."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name in MODEL_GROUPS else path.name


def evaluate_models(
    model_dirs: Sequence[str | Path],
    *,
    options: EvalOptions = EvalOptions(),
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every model folder; return the results document (see the module docstring).

    ``names``: one display name per folder (default :func:`model_name`).
    """
    if not model_dirs:
        raise ConfigError("Expected at least one model directory to evaluate. Got none.")
    if names is not None and len(names) != len(model_dirs):
        raise ConfigError(f"Expected one name per model directory ({len(model_dirs)}). Got {len(names)}.")
    if options.data_dir is None and options.blimp_dir is None:
        raise ConfigError(
            "Expected --data (held-out perplexity, ECE) or --blimp (BLiMP), or both. Got neither: pass one."
        )
    if options.batch_size < 1 or options.ece_bins < 1:
        raise ConfigError(
            f"Expected batch_size >= 1 and ece_bins >= 1. Got {options.batch_size} and {options.ece_bins}."
        )
    if options.split not in EVAL_SPLITS:
        raise ConfigError(f"Expected split in {', '.join(map(repr, EVAL_SPLITS))}. Got {options.split!r}.")
    device = resolve_device(options.device)
    # Read the inputs once, and before any model, so a bad input fails fast.
    data = PreparedData.open(options.data_dir) if options.data_dir is not None else None
    windows = None
    if data is not None:
        windows = data.windows(options.split)
        if windows.shape[0] == 0:
            raise DataError(
                f"Expected windows in the {options.split} split of {data.root}. Got none: "
                "use --split dev, or prepare the data with a larger data.test_fraction."
            )
    if options.blimp_pairs < 0:
        raise ConfigError(f"Expected blimp_pairs >= 0 (0 = all). Got {options.blimp_pairs}.")
    pairs: list[BlimpPair] | None = None
    if options.blimp_dir is not None:
        pairs = subset_per_paradigm(read_blimp(options.blimp_dir), options.blimp_pairs)
    # Every model folder is checked before the first is evaluated: safetensors only (pickle files are
    # never opened), intact headers, and, against prepared data, the same tokenizer and vocabulary
    # (the checks the teachers of every other path get).
    for i, model_dir in enumerate(map(Path, model_dirs)):
        label = names[i] if names is not None else model_name(model_dir)
        if data is not None:
            check_teacher(f"Model '{label}'", model_dir, data, tokenizer_required=False)
        else:
            check_model_dir(model_dir)

    inputs = _Inputs(data, windows, pairs, options, device, progress)
    entries = []
    seen: dict[str, int] = {}
    for i, model_dir in enumerate(map(Path, model_dirs)):
        name = names[i] if names is not None else model_name(model_dir)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        entry = _evaluate_one(model_dir, name, inputs)
        entries.append(entry)
        if log is not None:
            log(summary_line(entry))

    twins = (
        _random_twins(list(map(Path, model_dirs)), [e["name"] for e in entries], inputs)
        if options.random_twins
        else None
    )
    if log is not None:
        for twin in twins or []:
            log(summary_line(twin))

    settings: dict[str, Any] = {
        "split": options.split,
        "batch_size": options.batch_size,
        "ece_bins": options.ece_bins,
        "device": str(device),
        "data": str(data.root.resolve()) if data is not None else None,
        "blimp": str(Path(options.blimp_dir).resolve()) if options.blimp_dir is not None else None,
    }
    if data is not None:
        settings["data_windows_sha256"] = data.windows_sha256(options.split)
        settings["data_tokenizer_sha256"] = data.manifest.get("tokenizer_sha256")
    if pairs is not None:
        settings["blimp_pairs"] = len(pairs)
        settings["blimp_pairs_per_paradigm"] = options.blimp_pairs or "all"
        settings["blimp_paradigms"] = len({p.paradigm for p in pairs})
    results = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "provenance": {
            "versions": package_versions(),
            "git_commit": git_commit(),
            "command": sys.argv,
            "platform": platform.platform(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "settings": settings,
        "models": entries,
    }
    if twins is not None:
        results["random_twins"] = twins
    return results


@dataclass(frozen=True)
class _Inputs:
    """What every model (and random twin) of one evaluation is scored on, read once."""

    data: PreparedData | None
    windows: Any  # the split's windows, or None without data
    pairs: list[BlimpPair] | None
    options: EvalOptions
    device: Any
    progress: bool | None

    def tokenizer(self, model_dir: Path) -> Any:
        return load_tokenizer(model_dir, fallback=self.data.root if self.data is not None else None)

    def score(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """The architecture, size, held-out metrics (with windows) and BLiMP (with pairs) of a model."""
        held_out = blimp = None
        options = self.options
        if self.windows is not None:
            held_out = evaluate_held_out(
                model,
                self.windows,
                split=options.split,
                batch_size=options.batch_size,
                num_bins=options.ece_bins,
                progress=self.progress,
            ).to_dict()
        if self.pairs is not None:
            blimp = evaluate_blimp(
                model, tokenizer, self.pairs, batch_size=options.batch_size, progress=self.progress
            ).to_dict()
        architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
        return {
            "architecture": architectures[0],
            "model_type": getattr(model.config, "model_type", ""),
            "parameters": count_parameters(model),
            "held_out": held_out,
            "blimp": blimp,
        }


def _evaluate_one(model_dir: Path, name: str, inputs: _Inputs) -> dict[str, Any]:
    start = time.perf_counter()
    model = load_causal_lm(model_dir, device=inputs.device)
    tokenizer = None
    if inputs.pairs is not None or has_tokenizer(model_dir):
        tokenizer = inputs.tokenizer(model_dir)
    if inputs.data is not None:
        check_model_matches_data(model, model_dir, inputs.data)
    return {
        "name": name,
        "path": str(model_dir.resolve()),
        **inputs.score(model, tokenizer),
        "seconds": time.perf_counter() - start,
    }


RANDOM_TWIN_SEED = 0
# config.json keys that do not change what a model computes at initialisation
_NOT_ARCHITECTURE = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def _random_twins(model_dirs: list[Path], names: list[str], inputs: _Inputs) -> list[dict[str, Any]]:
    """One randomly initialised twin per distinct model configuration, scored like the models."""
    from transformers import AutoConfig, AutoModelForCausalLM

    groups: dict[str, tuple[Path, Any, list[str]]] = {}
    for model_dir, name in zip(model_dirs, names, strict=True):
        config = AutoConfig.from_pretrained(model_dir)
        described = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}
        key = json.dumps(described, sort_keys=True, default=str)
        groups.setdefault(key, (model_dir, config, []))[2].append(name)
    twins = []
    for model_dir, config, twin_of in groups.values():
        start = time.perf_counter()
        torch.manual_seed(RANDOM_TWIN_SEED)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).to(inputs.device).eval()
        tokenizer = inputs.tokenizer(model_dir) if inputs.pairs is not None else None
        twins.append(
            {
                "name": f"random-init/{twin_of[0]}",
                "twin_of": twin_of,
                "init_seed": RANDOM_TWIN_SEED,
                **inputs.score(model, tokenizer),
                "seconds": time.perf_counter() - start,
            }
        )
    return twins


def summary_line(entry: dict[str, Any]) -> str:
    """``teachers/llama: test perplexity 45.21 (loss 3.811), ECE 0.0123, BLiMP 61.3 %`` (what is there)."""
    parts = []
    if entry.get("held_out"):
        h = entry["held_out"]
        parts.append(
            f"{h['split']} perplexity {_num(h['perplexity'], '.2f')} (loss {_num(h['loss'], '.4f')})"
        )
        parts.append(f"ECE {_num(h['ece'], '.4f')}")
    if entry.get("blimp"):
        parts.append(f"BLiMP {100 * entry['blimp']['overall']:.1f} %")
    return f"{entry['name']}: " + ", ".join(parts)


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps_results(results: dict[str, Any]) -> str:
    """The results document as JSON text (indented, keys sorted, non-finite numbers as null)."""
    return json.dumps(_finite(results), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write the results document atomically: a failure (a full disk) leaves any earlier file as it was."""
    path = Path(path)
    text = dumps_results(results)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as exc:
        raise StageError(
            f"Could not write the evaluation results to {path} ({exc.strerror or exc}). Any earlier results "
            "file there is unchanged: free space (or fix the folder) and rerun."
        ) from None
    return path


def check_results_path(path: str | Path) -> None:
    """Refuse, before any model is evaluated, a results path that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"Expected a file path for the results. Got the folder {path}; name a .json file in it."
        )
    check_writable(path.parent, "the evaluation results")


def read_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"Expected an evaluation results JSON at {path}. Got an unreadable file ({exc})."
        ) from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise DataError(
            f"Expected a {RESULTS_FORMAT} results JSON at {path} (from `pipe evaluate`). Got another file."
        )
    return results


def evaluate_run(
    run_dir: str | Path,
    *,
    options: EvalOptions = EvalOptions(),
    out: str | Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    teachers: Mapping[str, str | Path] | None = None,
    config: Config | None = None,
) -> Path:
    """Evaluate every finished model of a run on ``RUN/data``; write ``RUN/eval/results.json`` (or ``out``).

    ``teachers``: the config's teacher folders by name (``teacher_dir``). Those outside the run (a
    configured ``teachers.NAME.path``, e.g. a pretrained model) are evaluated too, as ``teachers/NAME``.
    ``config``: the run's config; with it, the results also hold ``references`` on the held-out
    split: the teachers' ensemble (two or more teachers) and a unigram model (see :mod:`.references`).
    """
    layout = RunLayout(Path(run_dir))
    found = {model_name(p): p for p in find_run_models(layout.root)}
    for name, folder in (teachers or {}).items():
        if f"teachers/{name}" not in found and (Path(folder) / "config.json").is_file():
            found[f"teachers/{name}"] = Path(folder)
    names = sorted(found, key=lambda n: (not n.startswith("teachers/"), n))  # teachers first
    models = [found[n] for n in names]
    if not models:
        raise StageError(
            f"Expected trained models in {layout.root}/teachers or {layout.root}/students. Found none: "
            "train them first (pipe run CONFIG)."
        )
    if options.data_dir is None:
        options = dataclasses.replace(options, data_dir=layout.data)
    target = Path(out) if out is not None else layout.eval_results
    check_results_path(target)
    results = evaluate_models(models, options=options, progress=progress, log=log, names=names)
    if config is not None and options.data_dir is not None:
        from logitcache.pipeline.evaluation.references import reference_entries

        teacher_dirs = {
            name: found[f"teachers/{name}"] for name in config.teachers if f"teachers/{name}" in found
        }
        results["references"] = reference_entries(
            config,
            PreparedData.open(options.data_dir),
            split=options.split,
            batch_size=options.batch_size,
            num_bins=options.ece_bins,
            device=resolve_device(options.device),
            teacher_dirs=teacher_dirs,
            progress=progress,
        )
        if log is not None:
            for entry in results["references"]:
                log(summary_line(entry))
            for line in headline_lines(results):
                log(line)
    return write_results(results, target)


def evaluate_command(
    model_dirs: Sequence[str | Path],
    *,
    options: EvalOptions = EvalOptions(),
    run_dir: str | Path | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Path | str:
    """`pipe evaluate`: MODEL_DIRs, or every model of ``run_dir`` when none are given.

    With ``run_dir``, held-out data defaults to ``RUN/data`` and the results go to
    ``RUN/eval/results.json`` unless ``out`` says otherwise. Returns the path written, or the
    results document as JSON text when there is nowhere to write it (no ``out``, no ``run_dir``).
    """
    if run_dir is not None and not model_dirs:
        return evaluate_run(run_dir, options=options, out=out, log=log)
    if not model_dirs:
        raise ConfigError("Expected MODEL_DIR arguments or --run-dir RUN. Got neither: pass one.")
    layout = RunLayout(Path(run_dir)) if run_dir is not None else None
    if layout is not None and options.data_dir is None:
        options = dataclasses.replace(options, data_dir=layout.data)
    if out is None and layout is not None:
        out = layout.eval_results
    if out is not None:
        check_results_path(out)
    results = evaluate_models(model_dirs, options=options, log=log)
    return dumps_results(results) if out is None else write_results(results, out)
