"""Typed configuration of a logitcache run, loaded from TOML.

One frozen dataclass per section; the defaults live here and nowhere else. A config file is a
TOML document whose tables mirror these dataclasses; unknown keys and values of the wrong type
are rejected with a :class:`ConfigError` that names the key (and the closest valid one).

Relative paths written inside a config file are resolved against the directory of that file,
so ``pipe run /elsewhere/configs/demo.toml`` works from any working directory. Paths given on
the command line (``--run-dir``, ``--set run.dir=...``) are relative to the working directory.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from logitcache.cache.metadata import HYBRID_VALUE_CODES
from logitcache.pipeline.errors import ConfigError

# A model's architecture: "llama" and "gpt2" are built from the size keys of ModelConfig exactly as
# before; any other value is the model_type of a transformers causal LM (e.g. "qwen2", "mistral"),
# built with AutoConfig.for_model from the same keys, or use ModelConfig.path for any config.
Family = str
ModelInit = Literal["random", "pretrained"]
# The dtype a teacher is loaded in: "auto" = the dtype its weights are stored in.
TeacherDtype = Literal["auto", "bfloat16", "float16", "float32"]
# How a student gets its teacher signal: "cache" (RUN/cache), "online" (the teachers run at every
# step) or "ce" (none: cross-entropy only). The one list of student modes.
StudentMode = Literal["cache", "online", "ce"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]
STUDENT_MODES: Final = typing.get_args(StudentMode)
EvalSplit = Literal["test", "dev"]
EVAL_SPLITS: Final = typing.get_args(EvalSplit)
Device = Literal["auto", "cpu", "cuda"]
DEVICES: Final = typing.get_args(Device)


@dataclass(frozen=True)
class RunConfig:
    """Where a run's outputs go and its global seed."""

    dir: str = ""  # "" means runs/<config file stem> under the working directory
    seed: int = 1234
    device: Device = "auto"
    # The students `pipe run` trains, one per mode, into RUN/students/<mode>: the distilled student
    # and its CE-only twin by default; add "online" for live-teacher distillation (the baseline).
    students: list[StudentMode] = field(default_factory=lambda: ["cache", "ce"])
    # Experiment trackers beside metrics.jsonl (always written), off by default: "tensorboard"
    # (event folders under RUN/tensorboard/), "wandb" (Weights & Biases; credentials and mode from
    # its environment, e.g. WANDB_API_KEY or WANDB_MODE=offline), "mlflow" (the server or store of
    # $MLFLOW_TRACKING_URI). Each needs its package: pipeline/tracking.py.
    report_to: list[Tracker] = field(default_factory=list)


DEFAULT_INCLUDE: Final = tuple(
    f"*{suffix}{gz}" for suffix in (".txt", ".train", ".dev", ".test") for gz in ("", ".gz")
)
DEFAULT_EXCLUDE: Final = (
    "LICENSE*",
    "LICENCE*",
    "COPYING*",
    "NOTICE*",
    "AUTHORS*",
    "ATTRIBUTION*",
    "README*",
    "SOURCES*",
)


@dataclass(frozen=True)
class DataConfig:
    """`pipe prepare-data`: corpus → BPE tokenizer → train/dev/test token windows."""

    corpus: str = ""  # a directory of .txt/.train/.dev/.test(.gz) files, or a .jsonl(.gz) file
    # In a corpus directory, the files read are those whose name matches an `include` pattern and
    # none of whose path parts (folders or file name) matches an `exclude` pattern (shell-style,
    # case-insensitive). The default `exclude` keeps license, attribution and readme files out of
    # the training text.
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    jsonl_field: str = "text"
    max_chars_per_file: int = 0  # 0 = whole files; >0 keeps only the first N characters of each
    on_decode_error: Literal["error", "skip"] = "error"
    document_words: int = 256  # consecutive paragraphs are grouped into documents of >= N words
    dev_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    seq_len: int = 128
    vocab_size: int = 16000
    min_frequency: int = 2
    # A Hugging Face tokenizer folder (e.g. the pretrained teachers'): the corpus is encoded with it
    # instead of a newly trained BPE tokenizer, and the vocabulary is its own (vocab_size and
    # min_frequency are then unused). "" = train a byte-level BPE tokenizer.
    tokenizer: str = ""


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM built with transformers: from the size keys below, or from an HF folder (`path`)."""

    family: Family = "llama"  # "llama", "gpt2" or another transformers model_type (e.g. "qwen2")
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = same as num_heads (Llama only)
    intermediate_size: int = 1024  # FFN width (Llama: SwiGLU width; GPT-2: n_inner)
    max_position_embeddings: int = 0  # 0 = data.seq_len
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    dropout: float = 0.0
    # A Hugging Face model folder (config.json; weights and tokenizer optional): its architecture
    # replaces family and the size keys above (the vocabulary and special tokens are the data's).
    path: str = ""
    # "random": a fresh initialisation; "pretrained": start from the folder's weights (needs `path`).
    init: ModelInit = "random"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by teachers and students."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    batch_size: int = 32  # windows per optimizer step (the global batch, over all ranks)
    grad_accum_steps: int = 1
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs decide; >0 stops after this many optimizer steps
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    eval_batch_size: int = 64
    checkpoint_every: int = 200  # optimizer steps between checkpoints (and at each epoch end)
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = False


@dataclass(frozen=True)
class TeacherConfig:
    """One teacher: trained from `model` + `train`, or an existing HF model directory (`path`)."""

    path: str = ""  # an existing Hugging Face model directory: skip training, use it as is
    dtype: TeacherDtype = "auto"  # loaded in this dtype; "auto" = as its weights are stored
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class CacheConfig:
    """What `pipe cache-logits` stores per position (used from the cache stage on)."""

    k: int = 64  # top-k entries per position (`topk`), or the exact head of `hybrid`
    # "topk": exact top-k + tail mass; "sampled": `samples` draws from the whole distribution;
    # "hybrid": exact top-k head + `tail_samples` draws from the rest (docs/cache-format.md).
    # The library default stays "topk" (exact, and the one mode every divergence accepts); the
    # shipped demo and small configs use hybrid k = 16 + 48 draws, which came within 1 % of online
    # distillation on the demo where top-64 at about the same bytes per position did not
    # (docs/results.md).
    mode: Literal["topk", "sampled", "hybrid"] = "topk"
    samples: int = 64  # draws per position in `sampled` mode
    tail_samples: int = 32  # draws per position from the tail (outside the head) in `hybrid` mode
    ensemble: Literal["mean_logits", "mean_probs"] = "mean_logits"
    weights: list[float] = field(default_factory=list)  # per-teacher weights; [] = equal
    temperature: float = 1.0
    batch_size: int = 32  # windows per teacher forward pass
    # Storage (docs/cache-format.md): ids sorted per position and stored as gaps; probabilities as
    # p / p_max on 10 bits (the default measured in docs/benchmarks.md).
    id_code: Literal["sorted_gaps", "rank"] = "sorted_gaps"
    value_code: Literal[
        "ratio_q8", "ratio_q10", "ratio_q12", "ratio_q16",
        "logp_q8", "logp_q10", "logp_q12", "logp_q16", "logp_fp16", "logp_bf16", "logp_fp32",
    ] = "ratio_q10"  # fmt: skip
    windows_per_shard: int = 0  # 0 = sized by the cache library for shards of tens of MB
    # Where the cache's Zarr store lives: "" = RUN/cache/logits.zarr; or a URL such as
    # "s3://bucket/prefix/logits.zarr", "gs://..." (zarr's FsspecStore; credentials come from the
    # environment, never from here: docs/object-stores.md). RUN/cache keeps the stage's markers.
    store: str = ""

    @property
    def width(self) -> int:
        """Stored entries per position: ``samples`` (sampled), ``k + tail_samples`` (hybrid) or ``k``."""
        if self.mode == "sampled":
            return self.samples
        return self.k + self.tail_samples if self.mode == "hybrid" else self.k


@dataclass(frozen=True)
class DistillConfig:
    """The student's loss: ce_weight * CE + kl_weight * T^2 * D(teacher, student), D = `divergence`."""

    # kl_weight = alpha, ce_weight = 1 - alpha. BabyLlama's code puts alpha on the CE term
    # instead; at the papers' alpha = 0.5 the two conventions coincide.
    alpha: float = 0.5
    temperature: float = 1.0
    # "ghost": the teacher's mass outside the cached top-k is one extra bucket matched against the
    # student's mass outside them; "renormalize": the top-k weights are scaled to sum to 1, which
    # overstates the cached tokens when the top-k hold little mass. Default ghost: on the demo
    # (top-64 hold ~52 % of the mass) it gave test perplexity 378.7 vs 399.5 and ECE 0.016 vs 0.035
    # (docs/results.md).
    tail: Literal["renormalize", "ghost"] = "ghost"
    reduction: Literal["mean", "sum", "batchmean-compat"] = "mean"
    # D over the cached support (+ the tail bucket): "forward_kl" KL(teacher || student),
    # "reverse_kl" KL(student || teacher), "jsd" beta KL(t || m) + (1 - beta) KL(s || m) with
    # m = beta t + (1 - beta) s, "tv" total variation (formulas: docs/kernels.md). Only forward_kl
    # with sampled / hybrid caches (the others are biased on importance-weighted draws).
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tv"] = "forward_kl"
    # JSD's beta in (0, 1), the teacher's share of m: JSD / beta -> forward KL as beta -> 0, and
    # JSD / (1 - beta) -> reverse KL as beta -> 1 (with the ghost tail)
    jsd_beta: float = 0.5


@dataclass(frozen=True)
class LoaderConfig:
    """How the student's micro-batches are ordered and read (pipeline/data_order.py, student_data.py)."""

    # DataLoader worker processes; 0 = read in the training process. "auto": 0 when training on
    # the CPU (the fastest for the demo on a 2-core machine), on a GPU min(4, CPU cores per local
    # process - 1): a GPU step is short enough that reading in the training process halves its
    # speed (docs/benchmarks.md, GPU). See data_order.loader_workers.
    workers: int | Literal["auto"] = "auto"
    prefetch_factor: int = 2  # micro-batches read ahead per worker
    # Shuffle order: windows are permuted in blocks of `shuffle_block` consecutive windows, then
    # within buffers of `shuffle_buffer_blocks` blocks (cheap cache reads). 0 = one cache chunk.
    shuffle_block: int = 0
    shuffle_buffer_blocks: int = 8


@dataclass(frozen=True)
class StudentConfig:
    """The distilled student (trained by `pipe train-student`, from the student stage on)."""

    # "cache": KD from RUN/cache; "online": the teachers run at every step (full vocabulary);
    # "ce": no teacher (cross-entropy only). Output: RUN/students/NAME, NAME = `name` or the mode.
    mode: StudentMode = "cache"
    name: str = ""
    seed: int = 0  # the student's init and data-order seed; 0 = run.seed (vary it for seed spreads)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)


@dataclass(frozen=True)
class EvalConfig:
    """`pipe evaluate` as a stage of `pipe run`: held-out perplexity/ECE on RUN/data, BLiMP if given.

    These defaults are also those of `pipe evaluate` and of ``EvalOptions`` (one place).
    """

    blimp_dir: str = ""  # a directory of BLiMP .jsonl files (native format); "" = no BLiMP
    blimp_pairs: int = 0  # pairs per paradigm, a fixed sample (0 = all, e.g. 300 in BLiMP's files)
    split: EvalSplit = "test"
    batch_size: int = 32
    ece_bins: int = 15
    # also score a randomly initialised twin of each architecture (same config, seed 0), the
    # baseline that says whether a model learned anything BLiMP measures
    random_twins: bool = False


@dataclass(frozen=True)
class Config:
    """A whole run: one section per stage."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    source: str = ""  # the config file this was loaded from (informational)
    # each input path that the config file gave relative to itself: resolved path -> as written there
    # (fingerprints use the written form, so a moved checkout keeps its runs: see fingerprint_dict)
    written_paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def as_written(self) -> dict[str, Any]:
        """:meth:`to_dict` with the input paths (corpus, tokenizer, model folders, BLiMP) as the config
        file wrote them (relative to itself where it did), not resolved: the same in every clone or
        moved checkout. ``run.dir`` stays resolved; ``written_paths`` is left out."""
        data = self.to_dict()
        del data["written_paths"]
        for section, key in _PATH_KEYS:
            if section != "run":
                _map_key(data[section], key, lambda value: self.written_paths.get(value, value))
        return data

    def fingerprint_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` as fingerprints see it: :meth:`as_written` (so a checkout that moves, or a
        clone elsewhere, finds its runs complete; an absolute path counts as it is); keys added to
        the config later are left out while at their default, so that the stages of runs made
        before those keys existed stay complete."""
        if _INPUTS_BY_PATH.get():
            data = self.to_dict()
            del data["written_paths"]
        else:
            data = self.as_written()
        _drop_default(data["data"], "tokenizer", "")
        models = [data["student"]["model"]]
        for teacher in data["teachers"].values():
            _drop_default(teacher, "dtype", "auto")
            models.append(teacher["model"])
        for model in models:
            _drop_default(model, "path", "")
            _drop_default(model, "init", "random")
        if data["cache"]["mode"] != "hybrid":  # tail_samples matters only there
            data["cache"].pop("tail_samples")
        if data["cache"]["mode"] == "sampled":  # k is unused there (the draws are `samples`)
            data["cache"].pop("k")
        # (`samples` outside sampled mode still counts, as it always has: dropping it would change the
        # fingerprint of every existing topk and hybrid cache)
        distill = data["student"]["distill"]
        if distill["divergence"] != "jsd":  # jsd_beta matters only there
            distill.pop("jsd_beta")
        _drop_default(distill, "divergence", "forward_kl")
        _drop_default(data["evaluate"], "random_twins", False)
        return data

    def fingerprint(self, *sections: str) -> str:
        """SHA-256 of the named sections (all but `run`/`source` if none): what a stage depends on."""
        data = self.fingerprint_dict()
        names = sections or tuple(k for k in data if k not in ("run", "source"))
        return digest({name: data[name] for name in names})

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir)


def _map_key(table: Any, key: str, function: typing.Callable[[Any], Any]) -> None:
    """Replace every value of ``key`` anywhere under ``table`` (nested dicts) by ``function(value)``."""
    if isinstance(table, dict):
        for name, value in table.items():
            if name == key:
                table[name] = function(value)
            else:
                _map_key(value, key, function)


# Fingerprints as runs made before they named inputs as written (logitcache 0.1.0 up to December
# 2026) recorded them: every input path resolved to an absolute one (Fingerprint.legacy)
_INPUTS_BY_PATH: contextvars.ContextVar[bool] = contextvars.ContextVar("inputs_by_path", default=False)


def _drop_default(table: dict[str, Any], key: str, default: Any) -> None:
    if table.get(key) == default:
        del table[key]


# ----------------------------------------------------------------------------------------------
# Fingerprints: what each stage's output depends on (stored in its COMPLETE.json, see rundir.py).
# A stage is skipped when its fingerprint is unchanged; each builds on the ones before it.


class Fingerprint(str):
    """A stage's fingerprint (the string, recorded in its COMPLETE.json) and the fingerprint the same
    config had before fingerprints took input paths as written (``legacy``: absolute paths), which a
    run made then, where it was made, still matches (:meth:`matches`)."""

    legacy: str

    def __new__(cls, current: str, legacy: str) -> Fingerprint:
        fingerprint = super().__new__(cls, current)
        fingerprint.legacy = legacy
        return fingerprint

    def matches(self, recorded: object) -> bool:
        return isinstance(recorded, str) and recorded in (str(self), self.legacy)


# set while a stage fingerprint is computed: the stage fingerprints nested in it are plain strings
_IN_FINGERPRINT: contextvars.ContextVar[bool] = contextvars.ContextVar("in_fingerprint", default=False)


def _stage_fingerprint(function: typing.Callable[..., str]) -> typing.Callable[..., Fingerprint]:
    """Make ``function`` return a :class:`Fingerprint`: its value, and its value with inputs named by
    path (nested stage fingerprints inside either are plain strings of the same kind)."""

    @functools.wraps(function)
    def fingerprint(*args: Any, **kwargs: Any) -> Any:
        if _IN_FINGERPRINT.get():
            return function(*args, **kwargs)
        inner = _IN_FINGERPRINT.set(True)
        try:
            current = function(*args, **kwargs)
            by_path = _INPUTS_BY_PATH.set(True)
            try:
                legacy = function(*args, **kwargs)
            finally:
                _INPUTS_BY_PATH.reset(by_path)
        finally:
            _IN_FINGERPRINT.reset(inner)
        return Fingerprint(current, legacy)

    return fingerprint


def digest(parts: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON document with sorted keys: the one way a fingerprint is computed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@_stage_fingerprint
def data_fingerprint(config: Config) -> str:
    """`pipe prepare-data`: the ``[data]`` section."""
    return config.fingerprint("data")


@_stage_fingerprint
def teacher_fingerprint(config: Config, name: str) -> str:
    """`pipe train-teacher NAME`: the data, the teacher's own table and the run's seed."""
    teacher = config.fingerprint_dict()["teachers"][name]
    return digest({"data": data_fingerprint(config), "teacher": teacher, "seed": config.run.seed})


def _teachers_fingerprints(config: Config) -> dict[str, str]:
    return {name: teacher_fingerprint(config, name) for name in config.teachers}


def cache_settings(config: Config) -> dict[str, Any]:
    """The ``[cache]`` section without ``store``: what decides the cache's bytes, not where they are."""
    settings = config.fingerprint_dict()["cache"]
    settings.pop("store")
    return settings


@_stage_fingerprint
def cache_fingerprint(config: Config) -> str:
    """`pipe cache-logits`: the data, every teacher, the ``[cache]`` section and the seed.

    ``cache.store`` counts only when set (a cache in another place is another output; caches
    made before the key existed keep their fingerprint).
    """
    parts = {
        "data": data_fingerprint(config),
        "teachers": _teachers_fingerprints(config),
        "cache": cache_settings(config),
        "seed": config.run.seed,
    }
    if config.cache.store:
        parts["store"] = config.cache.store
    return digest(parts)


@_stage_fingerprint
def student_fingerprint(config: Config) -> str:
    """`pipe train-student`: the data, the ``[student]`` section and, unless mode "ce", the teachers.

    Left out: the student's name (only the folder) and the loader settings that do not change the
    data order (workers, prefetch); without a teacher (mode "ce") the distillation settings.
    """
    student = config.fingerprint_dict()["student"]
    student.pop("name")
    student["loader"] = {k: v for k, v in student["loader"].items() if k.startswith("shuffle")}
    parts: dict[str, Any] = {"data": data_fingerprint(config), "student": student, "seed": config.run.seed}
    if config.student.mode == "ce":
        parts["student"]["distill"] = {}  # no teacher: the distillation settings do not matter
    else:
        parts["teachers"] = _teachers_fingerprints(config)
        parts["cache"] = cache_settings(
            config if config.student.mode == "cache" else _without_storage(config)
        )
    return digest(parts)


# [cache] keys that say how a cache stores the ensemble; an online student (live teachers) reads no
# cache, so only the ensemble rule, weights and temperature count for it
_CACHE_STORAGE_KEYS = ("k", "mode", "samples", "tail_samples", "id_code", "value_code", "windows_per_shard")


def _without_storage(config: Config) -> Config:
    """``config`` with the cache's storage settings at their defaults (not dropped: online students
    made before this rule, with default storage settings, keep their fingerprint)."""
    defaults = CacheConfig()
    storage = {key: getattr(defaults, key) for key in _CACHE_STORAGE_KEYS}
    return dataclasses.replace(config, cache=dataclasses.replace(config.cache, **storage))


def run_students(config: Config) -> list[Config]:
    """One config per student mode that `pipe run` trains (``run.students``, into RUN/students/<mode>)."""
    return [
        dataclasses.replace(config, student=dataclasses.replace(config.student, mode=mode, name=""))
        for mode in config.run.students
    ]


@_stage_fingerprint
def eval_fingerprint(config: Config) -> str:
    """`pipe run`'s evaluate stage: its settings and every model it evaluates."""
    parts = {
        "evaluate": config.fingerprint_dict()["evaluate"],
        "data": data_fingerprint(config),
        "teachers": _teachers_fingerprints(config),
        "students": [student_fingerprint(c) for c in run_students(config)],
    }
    return digest(parts)


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | Path, overrides: typing.Sequence[str] = (), run_dir: str | Path | None = None
) -> Config:
    """Load a TOML config, apply ``section.key=value`` overrides, resolve paths, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Expected a TOML config file. Got {str(path)!r}, which does not exist: pass the path of one "
            "(e.g. configs/demo.toml)."
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}).") from None
    written: dict[str, str] = {}
    raw = _resolve_file_paths(raw, path.parent, written)
    for item in overrides:
        _apply_override(raw, item)
    if run_dir is not None:
        raw.setdefault("run", {})["dir"] = str(run_dir)
    try:
        config = from_dict(Config, raw, where="")
        if not config.run.dir:
            config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=f"runs/{path.stem}"))
        config = dataclasses.replace(config, source=str(path), written_paths=written)
        validate(config)
    except ConfigError as exc:  # every config error says where it is fixed
        message = str(exc)
        if "Fix it in" in message or "Did you mean" in message:
            raise
        raise ConfigError(f"{message.rstrip('.')}. Fix it in {path.name} or with --set.") from None
    return config


def with_student(config: Config, *, mode: str | None = None, name: str | None = None) -> Config:
    """``config`` with ``student.mode`` and/or ``student.name`` replaced (`pipe train-student --mode/--name`)."""
    if mode is not None and mode not in STUDENT_MODES:
        raise ConfigError(f"Expected student.mode in {', '.join(map(repr, STUDENT_MODES))}. Got {mode!r}.")
    student = config.student
    student = dataclasses.replace(
        student, mode=student.mode if mode is None else mode, name=student.name if name is None else name
    )
    return dataclasses.replace(config, student=student)


# Keys whose values are filesystem paths written relative to the config file (section, key): the
# key anywhere under the section (``student.model.path``, ``teachers.NAME.path``,
# ``teachers.NAME.model.path``).
_PATH_KEYS = {
    ("run", "dir"),
    ("data", "corpus"),
    ("data", "tokenizer"),
    ("evaluate", "blimp_dir"),
    ("teachers", "path"),
    ("student", "path"),
}


def _resolve_file_paths(raw: dict[str, Any], base: Path, written: dict[str, str]) -> dict[str, Any]:
    """``raw`` with every relative path of :data:`_PATH_KEYS` resolved against ``base``; each such
    resolved path -> its written form is added to ``written``."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            resolved = str((base / value).resolve())
            written[resolved] = value
            return resolved
        return value

    for section, key in _PATH_KEYS:
        _map_key(raw.get(section), key, fix)
    return raw


def _parse_override_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: treat as a string


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"Expected --set section.key=value. Got {item!r}.")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"Expected --set section.key=value. Got {item!r}.")
    _check_key_path(keys)
    table = raw
    for key in keys[:-1]:
        table = table.setdefault(key, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a table.")
    value = _parse_override_value(text.strip())
    if (keys[0], keys[-1]) in _PATH_KEYS and isinstance(value, str) and value:  # "" stays "" (unset)
        value = str(Path(value).resolve())  # command-line paths are relative to the working dir
    table[keys[-1]] = value


def _check_key_path(keys: list[str]) -> None:
    """Reject an override whose key does not exist, naming the closest valid key."""
    cls: Any = Config
    prefix: list[str] = []
    for key in keys:
        origin = typing.get_origin(cls)
        if origin is dict:  # a named table such as teachers.<name>
            cls = typing.get_args(cls)[1]
            prefix.append(key)
            continue
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"Unknown config key {'.'.join(keys)!r}: {'.'.join(prefix)!r} has no sub-keys.")
        hints = typing.get_type_hints(cls)
        if key not in hints or key in _NOT_IN_TOML:
            raise ConfigError(_unknown_key_message(".".join(prefix + [key]), key, list(hints)))
        cls = hints[key]
        prefix.append(key)


_NOT_IN_TOML = ("source", "written_paths")  # Config fields that load_config fills in itself


def _unknown_key_message(dotted: str, key: str, valid: list[str]) -> str:
    valid = [name for name in valid if name not in _NOT_IN_TOML]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(valid)}."
    return f"Unknown config key {dotted!r}.{hint}"


T = typing.TypeVar("T")


def from_dict(cls: type[T], raw: Any, *, where: str) -> T:
    """Build dataclass ``cls`` from a TOML table, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"Expected a table at {where or 'the top level'!r}. Got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else key
        if key not in hints or key in _NOT_IN_TOML:
            raise ConfigError(_unknown_key_message(dotted, key, list(hints)))
        kwargs[key] = _convert(hints[key], value, dotted)
    return cls(**kwargs)


_TYPE_WORDS: Final = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe_type(tp: Any) -> str:
    """How a config error names type ``tp`` ("an integer", "'auto'")."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return _TYPE_WORDS.get(tp, str(tp))


def _convert(tp: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=dotted)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"Expected {dotted!r} to be a table of named entries. Got {value!r}.")
        item_type = typing.get_args(tp)[1]
        return {name: _convert(item_type, item, f"{dotted}.{name}") for name, item in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"Expected {dotted!r} to be a list. Got {value!r}.")
        item_type = typing.get_args(tp)[0]
        return [_convert(item_type, item, f"{dotted}[{i}]") for i, item in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"Expected {dotted!r} to be one of {', '.join(map(repr, choices))}. Got {value!r}."
            )
        return value
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if type(None) in members:
            raise TypeError(f"unsupported config type {tp}")  # keep configs free of Optional
        for member in members:  # e.g. int | Literal["auto"]: the first member that takes the value
            try:
                return _convert(member, value, dotted)
            except ConfigError:
                continue
        expected = " or ".join(_describe_type(member) for member in members)
        raise ConfigError(f"Expected {dotted!r} to be {expected}. Got {value!r}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"Expected {dotted!r} to be {_describe_type(float)}. Got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"Expected {dotted!r} to be {_describe_type(int)}. Got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"Expected {dotted!r} to be {_describe_type(bool)}. Got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"Expected {dotted!r} to be {_describe_type(str)}. Got {value!r}.")
        return value
    raise TypeError(f"unsupported config type {tp}")


def _require(ok: bool, dotted: str, expected: str, got: object) -> None:
    """Refuse ``dotted`` unless ``ok``: "Expected <dotted> <expected>. Got <got>." (one line)."""
    if not ok:
        raise ConfigError(f"Expected {dotted} {expected}. Got {got!r}. Fix it in the config or with --set.")


def _at_least(value: float, minimum: float, dotted: str, note: str = "") -> None:
    _require(value >= minimum, dotted, f">= {minimum:g}{note}", value)


def _positive(value: float, dotted: str) -> None:
    _require(value > 0, dotted, "> 0", value)


def _check_trackers(report_to: list[str]) -> None:
    """Each tracker of ``run.report_to`` needs its package and, for MLflow, where to send the runs."""
    if len(set(report_to)) != len(report_to):
        raise ConfigError(f"Expected each tracker once in run.report_to. Got {report_to}.")
    for name in report_to:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"Expected the {name} package for run.report_to = [{name!r}]. It is not installed: "
                f"pip install 'logitcache[{name}]' (or {name}), or remove it from run.report_to."
            )
    if "mlflow" in report_to and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(
            "Expected MLFLOW_TRACKING_URI in the environment for run.report_to = ['mlflow']. Got none: set it "
            "to your MLflow server (http://...) or store (sqlite:///mlflow.db), or remove 'mlflow'."
        )
    if "wandb" in report_to and os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun"):
        has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has("api.wandb.ai")
        if not has_key:
            raise ConfigError(
                "Expected W&B credentials for run.report_to = ['wandb']. Got none: run `wandb login` or set "
                "WANDB_API_KEY, or WANDB_MODE=offline to log locally and `wandb sync` later."
            )


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def validate(config: Config) -> None:
    """Every range and cross-field rule a single type cannot express, for the whole config.

    Every command loads configs through here, so a value that would crash (a zero divisor, an
    empty range) or silently misbehave later is refused before any command touches anything.
    """
    _at_least(config.run.seed, 0, "run.seed")
    _at_least(config.evaluate.blimp_pairs, 0, "evaluate.blimp_pairs", " (0 = all pairs)")
    _check_trackers(config.run.report_to)
    data = config.data
    if data.seq_len < 2:
        raise ConfigError(f"Expected data.seq_len >= 2. Got {data.seq_len}.")
    if not 3 < data.vocab_size <= 2**31 - 1:
        raise ConfigError(f"Expected data.vocab_size > 3 (room for <pad>, <s>, </s>). Got {data.vocab_size}.")
    if data.dev_fraction <= 0 or data.test_fraction < 0 or data.dev_fraction + data.test_fraction >= 1:
        raise ConfigError(
            "Expected 0 < data.dev_fraction, 0 <= data.test_fraction and their sum < 1. "
            f"Got {data.dev_fraction} and {data.test_fraction}."
        )
    _at_least(data.max_chars_per_file, 0, "data.max_chars_per_file", " (0 = whole files)")
    _require(
        bool(data.include),
        "data.include",
        "to hold at least one file-name pattern such as '*.txt'",
        data.include,
    )
    for key, patterns in (("data.include", data.include), ("data.exclude", data.exclude)):
        for pattern in patterns:
            _require(
                bool(pattern) and "/" not in pattern,
                key,
                "to hold file or folder name patterns (no '/', not empty)",
                pattern,
            )
    _at_least(data.document_words, 1, "data.document_words")
    _at_least(data.min_frequency, 0, "data.min_frequency")
    for name, teacher in config.teachers.items():
        _validate_model(teacher.model, f"teachers.{name}.model", data.seq_len)
        _validate_train(teacher.train, f"teachers.{name}.train")
    _validate_cache(config.cache, len(config.teachers))
    student = config.student
    _at_least(student.seed, 0, "student.seed", " (0 = run.seed)")
    _validate_model(student.model, "student.model", data.seq_len)
    _validate_train(student.train, "student.train")
    if not 0.0 <= student.distill.alpha <= 1.0:
        raise ConfigError(f"Expected student.distill.alpha in [0, 1]. Got {student.distill.alpha}.")
    _positive(student.distill.temperature, "student.distill.temperature")
    _validate_divergence(config)
    loader = student.loader
    if loader.workers != "auto":
        _at_least(
            loader.workers, 0, "student.loader.workers", ' (0 = read in the training process, or "auto")'
        )
    _at_least(loader.prefetch_factor, 1, "student.loader.prefetch_factor")
    _at_least(loader.shuffle_block, 0, "student.loader.shuffle_block", " (0 = one cache chunk)")
    _at_least(loader.shuffle_buffer_blocks, 1, "student.loader.shuffle_buffer_blocks")
    _at_least(config.evaluate.batch_size, 1, "evaluate.batch_size")
    _at_least(config.evaluate.ece_bins, 1, "evaluate.ece_bins")


def _validate_divergence(config: Config) -> None:
    distill = config.student.distill
    _require(
        0.0 < distill.jsd_beta < 1.0,
        "student.distill.jsd_beta",
        "in (0, 1) (JSD vanishes at 0 and 1: use divergence forward_kl or reverse_kl for those limits)",
        distill.jsd_beta,
    )
    uses_cache = config.student.mode == "cache" or "cache" in config.run.students
    if distill.divergence != "forward_kl" and uses_cache and config.cache.mode in ("sampled", "hybrid"):
        raise ConfigError(
            f"Expected student.distill.divergence = 'forward_kl' with cache.mode = {config.cache.mode!r}. "
            f"Got {distill.divergence!r}: a nonlinear divergence of importance-weighted draws is biased. "
            "Use forward_kl, or a topk cache (cache.mode = 'topk') for this divergence."
        )


def _validate_cache(cache: CacheConfig, num_teachers: int) -> None:
    _at_least(cache.k, 1, "cache.k")
    _require(
        1 <= cache.samples <= 65535,
        "cache.samples",
        "in [1, 65535] (counts are stored as uint16)",
        cache.samples,
    )
    _require(
        1 <= cache.tail_samples <= 65535,
        "cache.tail_samples",
        "in [1, 65535] (counts are stored as uint16)",
        cache.tail_samples,
    )
    if cache.mode == "hybrid":
        _require(
            cache.id_code == "sorted_gaps", "cache.id_code", "'sorted_gaps' in hybrid mode", cache.id_code
        )
        _require(
            cache.value_code in HYBRID_VALUE_CODES,
            "cache.value_code",
            f"one of {list(HYBRID_VALUE_CODES)} in hybrid mode (a 16-bit code)",
            cache.value_code,
        )
    _positive(cache.temperature, "cache.temperature")
    _at_least(cache.batch_size, 1, "cache.batch_size")
    _at_least(cache.windows_per_shard, 0, "cache.windows_per_shard", " (0 = sized by the cache library)")
    for i, weight in enumerate(cache.weights):
        _positive(weight, f"cache.weights[{i}]")
    if cache.store:
        _validate_store(cache.store)
    if cache.weights and len(cache.weights) != num_teachers:
        raise ConfigError(
            f"Expected cache.weights to have one weight per teacher ({num_teachers}). Got {len(cache.weights)}."
        )


BUILT_IN_FAMILIES: Final = ("llama", "gpt2")  # built from the size keys by pipeline/models.py


def causal_lm_families() -> list[str]:
    """Every ``family`` a model can have: the transformers model types that have a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _validate_store(store: str) -> None:
    parts = urlsplit(store)
    _require(
        bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://.", store)) and parts.scheme.lower() != "file",
        "cache.store",
        "to be a URL such as 's3://bucket/prefix/logits.zarr' or 'gs://bucket/prefix' (or \"\" for RUN/cache/logits.zarr)",
        store,
    )
    missing = _missing_filesystem_package(parts.scheme.lower())
    if missing:
        raise ConfigError(
            f"Expected the {missing} package for cache.store = {store!r}. It is not installed: "
            + (
                "pip install 'logitcache[s3]'."
                if parts.scheme.lower() in ("s3", "s3a")
                else f"pip install {missing}."
            )
        )
    if parts.username or parts.password:
        raise ConfigError(
            "Expected cache.store without credentials. Got a URL with user/password: credentials are read "
            "from the environment only (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws, ...); remove them from the config."
        )


def _missing_filesystem_package(protocol: str) -> str:
    """The package a URL of ``protocol`` needs that is not installed ("" when all are)."""
    if importlib.util.find_spec("fsspec") is None:
        return "fsspec"
    from fsspec.registry import known_implementations, registry

    if protocol in registry:  # registered at run time: importable
        return ""
    known = known_implementations.get(protocol)
    if known is None:
        raise ConfigError(
            f"Expected cache.store with a protocol fsspec knows (s3, gs, az, memory, ...). Got {protocol!r}."
        )
    module = known["class"].split(".")[0]
    return module if importlib.util.find_spec(module) is None else ""


def _validate_model(model: ModelConfig, where: str, seq_len: int) -> None:
    if model.init == "pretrained" and not model.path:
        raise ConfigError(
            f"Expected {where}.path (a Hugging Face model folder) with {where}.init = 'pretrained'. Got no path."
        )
    if model.path:  # the folder's config decides the architecture (checked when it is built)
        return
    if model.family not in BUILT_IN_FAMILIES and model.family not in causal_lm_families():
        close = difflib.get_close_matches(model.family, causal_lm_families(), n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"Expected {where}.family to be 'llama', 'gpt2' or the model type of a transformers causal LM "
            f"(e.g. 'qwen2', 'mistral'). Got {model.family!r}.{hint}"
        )
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        _at_least(getattr(model, name), 1, f"{where}.{name}")
    _at_least(model.num_kv_heads, 0, f"{where}.num_kv_heads", " (0 = num_heads)")
    if model.hidden_size % model.num_heads:
        raise ConfigError(
            f"Expected {where}.hidden_size ({model.hidden_size}) divisible by num_heads ({model.num_heads})."
        )
    kv = model.num_kv_heads or model.num_heads
    if model.num_heads % kv:
        raise ConfigError(f"Expected {where}.num_heads ({model.num_heads}) divisible by num_kv_heads ({kv}).")
    if model.family == "gpt2" and model.num_kv_heads not in (0, model.num_heads):
        raise ConfigError(f"{where}: GPT-2 has no grouped-query attention; leave num_kv_heads at 0.")
    head_dim = model.hidden_size // model.num_heads
    if model.family == "llama" and head_dim % 2:
        raise ConfigError(
            f"Expected {where}.hidden_size / num_heads (the head size) to be even for rotary embeddings. "
            f"Got {model.hidden_size} / {model.num_heads} = {head_dim}."
        )
    _require(
        model.max_position_embeddings == 0 or model.max_position_embeddings >= seq_len,
        f"{where}.max_position_embeddings",
        f"0 (= data.seq_len) or >= data.seq_len ({seq_len})",
        model.max_position_embeddings,
    )
    _positive(model.rope_theta, f"{where}.rope_theta")
    _require(0.0 <= model.dropout < 1.0, f"{where}.dropout", "in [0, 1)", model.dropout)


def _validate_train(train: TrainConfig, where: str) -> None:
    if train.batch_size < 1 or train.grad_accum_steps < 1 or train.batch_size % train.grad_accum_steps:
        raise ConfigError(
            f"Expected {where}.batch_size ({train.batch_size}) to be a positive multiple of "
            f"grad_accum_steps ({train.grad_accum_steps})."
        )
    _positive(train.lr, f"{where}.lr")
    _require(0.0 <= train.min_lr_ratio <= 1.0, f"{where}.min_lr_ratio", "in [0, 1]", train.min_lr_ratio)
    _at_least(train.weight_decay, 0, f"{where}.weight_decay")
    for name in ("adam_beta1", "adam_beta2"):
        _require(0.0 <= getattr(train, name) < 1.0, f"{where}.{name}", "in [0, 1)", getattr(train, name))
    _positive(train.adam_eps, f"{where}.adam_eps")
    _at_least(train.epochs, 0, f"{where}.epochs")
    _at_least(train.max_steps, 0, f"{where}.max_steps", " (0 = the epochs decide)")
    if train.epochs < 1 and train.max_steps < 1:
        raise ConfigError(
            f"Expected {where}.epochs >= 1 or max_steps >= 1. Got {train.epochs} and {train.max_steps}."
        )
    _at_least(train.warmup_steps, 0, f"{where}.warmup_steps")
    _positive(train.max_grad_norm, f"{where}.max_grad_norm")
    for name in ("eval_batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
        _at_least(getattr(train, name), 1, f"{where}.{name}")
