"""Where a student's teacher signal comes from: the teachers run now, or their cache.

One module for both sources, so that they are checked the same way and the loss never knows
which it got (DistillKit separates "where the teacher signal comes from" from "the loss"):

* :class:`TeacherEnsemble` loads the trained teachers once, each checked against the prepared
  data first (the data's tokenizer, at least as many output logits as tokens, safetensors weights
  only), and combines them by the config's ensemble rule (``cache.ensemble``, ``cache.weights``,
  ``cache.temperature``; :func:`logitcache.cache.ensemble_logprobs`). It serves the live signal
  of the online student (:meth:`TeacherEnsemble.logprobs`, full vocabulary) and the entries
  that `pipe cache-logits` stores (:meth:`TeacherEnsemble.select`, top-k or sampled).
* :func:`open_student_cache` opens those stored entries for the cache-mode student, refusing a
  cache made for other data, another tokenizer or other ``[cache]`` settings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from logitcache.cache import (
    CacheMetadata,
    CacheReader,
    SampledSelection,
    TeacherInfo,
    TopkSelection,
    ensemble_logprobs,
    ensemble_topk,
    open_cache,
    select_sampled,
    verify_cache,
)
from logitcache.pipeline.config import CacheConfig, Config
from logitcache.pipeline.errors import CacheError, StageError, TeacherError
from logitcache.pipeline.models import load_model
from logitcache.pipeline.prepare import PreparedData, TokenWindows
from logitcache.pipeline.rundir import RunLayout, locate_cache_store
from logitcache.pipeline.teachers import is_teacher_complete, teacher_dir

# ----------------------------------------------------------------------------------------------
# Teachers: which, and whether they fit the data


def trained_teacher_dirs(config: Config) -> dict[str, Path]:
    """The model folder of every teacher of the config, refusing one that is not trained yet."""
    if not config.teachers:
        raise StageError("Expected at least one teacher in the config ([teachers.NAME]). Got none.")
    dirs = {}
    for name in config.teachers:
        if not is_teacher_complete(config, name):
            raise StageError(
                f"Teacher '{name}' is not trained yet. Run `pipe train-teacher CONFIG --teacher {name}`."
            )
        dirs[name] = teacher_dir(config, name)
    return dirs


def safetensors_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files, sorted by name; a folder with pickle weights only is refused."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise TeacherError(
            f"Expected safetensors weights in {model_dir}. Found none (pickle .bin files are not read)."
        )
    return files


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over the model's safetensors files (sorted by name), i.e. of exactly its weights."""
    digest = hashlib.sha256()
    for path in safetensors_files(model_dir):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def check_teacher_tokenizer(name: str, model_dir: Path, data: PreparedData | TokenWindows) -> None:
    """Refuse a teacher whose tokenizer differs from the prepared data's (ids would mean other tokens)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise TeacherError(
            f"Teacher '{name}' at {model_dir} has no tokenizer.json. Expected the tokenizer of the prepared data "
            f"({data.tokenizer_path}); teachers must share it."
        )
    ours = Tokenizer.from_file(str(data.tokenizer_path)).get_vocab(with_added_tokens=True)
    theirs = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    if ours != theirs:
        differing = len(set(ours.items()) ^ set(theirs.items()))
        raise TeacherError(
            f"Teacher '{name}' uses a different tokenizer than the prepared data ({len(theirs)} vs {len(ours)} "
            f"tokens, {differing} entries differ). All teachers must share the data's tokenizer."
        )


def load_teacher(
    name: str, model_dir: Path, data: PreparedData | TokenWindows, device: torch.device
) -> PreTrainedModel:
    """One teacher, checked against the data (tokenizer, vocabulary, weights format), frozen, in eval mode."""
    check_teacher_tokenizer(name, model_dir, data)
    safetensors_files(model_dir)
    model = load_model(model_dir).to(device).eval()
    model.requires_grad_(False)
    if model.config.vocab_size < data.vocab_size:
        raise TeacherError(
            f"Teacher '{name}' has {model.config.vocab_size} output logits; the tokenizer has "
            f"{data.vocab_size} tokens."
        )
    return model


def stored_teacher_path(path: Path, base: Path | None) -> str:
    """``path`` as a cache records it: POSIX and relative to ``base`` when inside it, else absolute."""
    absolute = Path(path).resolve()
    if base is not None:
        try:
            return absolute.relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    return str(absolute)


def resolve_teacher_path(stored: str, base: Path) -> Path:
    """A teacher folder recorded in cache metadata: relative paths are relative to ``base`` (the
    run directory, two levels above the store ``RUN/cache/logits.zarr``); absolute ones as they are."""
    path = Path(stored)
    return path if path.is_absolute() else Path(base) / path


# ----------------------------------------------------------------------------------------------
# The live source


class TeacherEnsemble:
    """The teachers, loaded once and checked, run on batches of windows; their ensemble is the signal.

    ``cache`` gives the ensemble rule (``ensemble``, ``weights``, ``temperature``) and, for
    :meth:`select`, what is stored (``mode``, ``k``, ``samples``); ``seed`` seeds the sampled mode.
    Teachers run in eval mode without gradients, in bf16 autocast on CUDA and float32 elsewhere.
    """

    def __init__(
        self,
        dirs: Mapping[str, Path],
        data: PreparedData | TokenWindows,
        device: torch.device,
        *,
        cache: CacheConfig,
        seed: int,
    ):
        if not dirs:
            raise StageError("Expected at least one teacher in the config ([teachers.NAME]). Got none.")
        self.dirs = {name: Path(path) for name, path in dirs.items()}
        self.names = list(self.dirs)
        self.vocab = data.vocab_size
        self.cache = cache
        self.seed = seed
        self.device = device
        self.models = [load_teacher(name, path, data, device) for name, path in self.dirs.items()]
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        )
        self.dtype = "bfloat16" if device.type == "cuda" else "float32"

    @classmethod
    def load(cls, config: Config, data: PreparedData, device: torch.device) -> TeacherEnsemble:
        """The trained teachers of ``config`` with its ``[cache]`` ensemble rule and ``run.seed``."""
        return cls(trained_teacher_dirs(config), data, device, cache=config.cache, seed=config.run.seed)

    def infos(self, base: Path | None = None) -> tuple[TeacherInfo, ...]:
        """What a cache records of each teacher: name, folder, SHA-256 of the weights, compute dtype.

        A folder inside ``base`` (the run directory) is recorded relative to it, so that a moved
        run still finds its teachers (:func:`resolve_teacher_path`); others stay absolute.
        """
        return tuple(
            TeacherInfo(
                name=name,
                path=stored_teacher_path(path, base),
                weights_sha256=weights_sha256(path),
                dtype=self.dtype,
            )
            for name, path in self.dirs.items()
        )

    @torch.no_grad()
    def teacher_logits(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """Each teacher's logits (B, T, V) for windows (B, T), cut to the tokenizer's vocab."""
        input_ids = windows.to(self.device, dtype=torch.long)  # (B, T)
        logits = []
        for model in self.models:
            with self.autocast:
                out = model(input_ids=input_ids).logits  # (B, T, V_model)
            logits.append(out[..., : self.vocab])  # a model may pad its output layer beyond the vocab
        return logits

    def _ensemble_args(self, window_indices: torch.Tensor) -> dict[str, Any]:
        return {
            "teacher_names": self.names,
            "window_indices": window_indices,
            "rule": self.cache.ensemble,
            "weights": self.cache.weights or None,
            "temperature": self.cache.temperature,
        }

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, window_indices: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, V) float32 ensemble log-probabilities at ``cache.temperature`` for windows (B, T)."""
        if window_indices is None:
            window_indices = torch.arange(input_ids.shape[0])
        return ensemble_logprobs(self.teacher_logits(input_ids), **self._ensemble_args(window_indices))

    @torch.no_grad()
    def select(self, windows: torch.Tensor, window_indices: torch.Tensor) -> TopkSelection | SampledSelection:
        """The entries a cache stores for windows (B, T) (rows ``window_indices`` of the data), on the CPU."""
        cache = self.cache
        if cache.mode == "sampled":
            selection = select_sampled(
                self.logprobs(windows, window_indices),
                num_samples=cache.samples,
                seed=self.seed,
                window_indices=window_indices,
            )
        else:  # fused: no (B, T, V) ensemble log-probabilities (see cache/select.py)
            selection = ensemble_topk(
                self.teacher_logits(windows), k=cache.k, **self._ensemble_args(window_indices)
            )
        return type(selection)(**{f: getattr(selection, f).cpu() for f in selection.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------
# The cached source


def cache_settings_differences(config: Config, metadata: CacheMetadata) -> list[str]:
    """``field (config X, cache Y)`` for each setting of ``config`` that the cache was made with otherwise.

    Compared: what decides the stored entries (teachers, ensemble rule, temperature, mode, k or
    the number of samples, their encoding; the seed of a sampled cache), not how the cache was
    computed or laid out (``cache.batch_size``, ``cache.windows_per_shard``).
    """
    cache = config.cache
    sampled = cache.mode == "sampled"
    pairs: list[tuple[str, Any, Any]] = [
        ("teachers", list(config.teachers), [t.name for t in metadata.teachers]),
        ("cache.mode", cache.mode, metadata.mode),
        ("cache.ensemble", cache.ensemble, metadata.ensemble),
        ("cache.weights", list(cache.weights) or None, list(metadata.teacher_weights or []) or None),
        ("cache.temperature", cache.temperature, metadata.temperature),
    ]
    if metadata.mode == cache.mode:  # otherwise the mode's difference says it all
        if sampled:
            pairs += [
                ("cache.samples", cache.samples, metadata.num_samples),
                ("run.seed", config.run.seed, metadata.seed),
            ]
        else:
            pairs += [
                ("cache.k", cache.k, metadata.k),
                ("cache.id_code", cache.id_code, metadata.encoding.id_code),
                ("cache.value_code", cache.value_code, metadata.encoding.value_code),
            ]
    return [f"{name} (config {ours!r}, cache {theirs!r})" for name, ours, theirs in pairs if ours != theirs]


def cache_store(config: Config) -> Path:
    """The store the cache-mode student reads: ``RUN/cache/logits.zarr`` (or ``RUN/cache`` if that is one)."""
    return locate_cache_store(RunLayout.of(config).cache)


def open_checked_cache(
    store: Path,
    *,
    tokenizer_sha256: str | None,
    dataset_sha256: str,
    vocab_size: int | None,
    num_windows: int,
    seq_len: int,
) -> CacheReader:
    """Open the cache ``store`` and refuse it unless it is intact and made for these windows.

    Checked: the cache's integrity (``verify_cache(quick=True)``: metadata, file set, chunk
    indexes and digests, so an emptied or truncated shard is refused before training), then
    tokenizer, vocabulary and windows (:meth:`CacheReader.check_compatible`; None = not checked).
    """
    if not store.exists():
        raise StageError(
            f"Expected a logit cache at {store}. Found none: run `pipe cache-logits CONFIG` first."
        )
    report = verify_cache(store, quick=True)  # metadata, files, indexes, digests: ~0.02 s on the demo
    if not report.ok:
        first = ([p for shard in report.shards for p in shard.problems] or report.problems)[0]  # names a file
        raise CacheError(
            f"Expected an intact cache at {store}. Got: {first}"
            + (f" (damaged shards {report.bad_shards})" if report.bad_shards else "")
            + ". Run `pipe verify-cache` on it for the full list; rebuild with `pipe cache-logits CONFIG --overwrite`."
        )
    reader = open_cache(store)
    reader.check_compatible(
        tokenizer_sha256=tokenizer_sha256,
        dataset_sha256=dataset_sha256,
        vocab_size=vocab_size,
        num_windows=num_windows,
        seq_len=seq_len,
    )
    return reader


def open_student_cache(config: Config, data: PreparedData) -> CacheReader:
    """Open ``RUN/cache`` and refuse it unless it was made for this data and these ``[cache]`` settings.

    Checked: what :func:`open_checked_cache` checks against the prepared training windows, then
    the settings of :func:`cache_settings_differences`, all in one line naming the differing fields.
    """
    store = cache_store(config)
    reader = open_checked_cache(
        store,
        tokenizer_sha256=data.manifest["tokenizer_sha256"],
        dataset_sha256=data.windows_sha256("train"),
        vocab_size=data.vocab_size,
        num_windows=int(data.manifest["splits"]["train"]["windows"]),
        seq_len=data.seq_len,
    )
    differences = cache_settings_differences(config, reader.metadata)
    if differences:
        raise CacheError(
            f"Expected the cache at {store} to be made with the config's settings. Got other values for "
            f"{', '.join(differences)}. Rebuild it (pipe cache-logits CONFIG --overwrite) or use the "
            "cache's settings."
        )
    return reader
