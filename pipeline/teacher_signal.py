"""Where a student's teacher signal comes from: the teachers run now, or their cache.

One module for both sources, so that they are checked the same way and the loss never knows
which it got (DistillKit separates "where the teacher signal comes from" from "the loss"):

* :class:`TeacherEnsemble` loads the teachers once (trained here, or any HF causal LM folder given
  as ``teachers.NAME.path``, in its stored dtype or ``teachers.NAME.dtype``), each checked against
  the prepared data first (the data's tokenizer, at least as many output logits as tokens,
  safetensors weights only), and combines them by the config's ensemble rule (``cache.ensemble``,
  ``cache.weights``, ``cache.temperature``; :func:`logitcache.cache.ensemble_logprobs`). It serves the live signal
  of the online student (:meth:`TeacherEnsemble.logprobs`, full vocabulary) and the entries
  that `pipe cache-logits` stores (:meth:`TeacherEnsemble.select`, top-k, sampled or hybrid).
* :func:`open_student_cache` opens those stored entries for the cache-mode student, refusing a
  cache made for other data, another tokenizer or other ``[cache]`` settings.

The tokenizer check (:func:`check_tokenizer`) is the one for every model folder that meets the
data: teachers, and the HF folder a teacher or student is built from (``model.path``). A model
whose output layer is padded beyond the tokenizer's vocabulary (to a multiple of 64 or 128) is
fine: its logits are cut to the vocabulary before the ensemble, so padded ids can enter neither the
ensemble nor the top-k (the same as masking them to -inf, without the (B, T, V_pad) work).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from logitcache.cache import (
    CacheMetadata,
    CacheReader,
    HybridSelection,
    SampledSelection,
    TeacherInfo,
    TopkSelection,
    ensemble_logprobs,
    ensemble_topk,
    open_cache,
)
from logitcache.cache.select import ensemble_hybrid, ensemble_sampled
from logitcache.cache.storage import StoreLike
from logitcache.cache.writer import existing_cache
from logitcache.pipeline.config import CacheConfig, Config
from logitcache.pipeline.errors import CacheError, StageError, TeacherError
from logitcache.pipeline.models import DTYPES, check_model_dir, check_model_fits, has_tokenizer, load_model
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


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over the model's safetensors files (sorted by name), i.e. of exactly its weights."""
    digest = hashlib.sha256()
    for path in check_model_dir(model_dir):  # the safetensors files, sorted; pickle-only refused
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_vocab(model_dir: Path) -> dict[str, int] | None:
    """token -> id of the tokenizer saved in ``model_dir`` (added tokens included); None if it has none.
    An unreadable tokenizer is a one-line :class:`TeacherError`."""
    path = model_dir / "tokenizer.json"
    if not has_tokenizer(model_dir):
        return None
    try:
        if path.is_file():
            return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
        return dict(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False).get_vocab())
    except Exception as exc:  # noqa: BLE001 - any unreadable tokenizer is the same user error
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeacherError(
            f"Expected a tokenizer that loads in {model_dir}. Got an error ({reason[:200]}): save the model's "
            "tokenizer again (save_pretrained)."
        ) from None


def vocab_differences(ours: Mapping[str, int], theirs: Mapping[str, int], *, shown: int = 3) -> str:
    """How two vocabularies (token -> id) differ, or "" when they are equal, e.g.
    ``2 of 512 token ids differ (id: data's token vs the model's): 100: 'ab' vs 'cd', 101: 'cd' vs 'ab'``."""
    by_id = [{i: token for token, i in vocab.items()} for vocab in (ours, theirs)]
    ids = sorted(set(by_id[0]) | set(by_id[1]))
    differing = [i for i in ids if by_id[0].get(i) != by_id[1].get(i)]
    if not differing:
        return ""

    def token(i: int, side: int) -> str:
        return repr(by_id[side][i]) if i in by_id[side] else "(none)"

    first = ", ".join(f"{i}: {token(i, 0)} vs {token(i, 1)}" for i in differing[:shown])
    more = ", ..." if len(differing) > shown else ""
    return f"{len(differing)} of {len(ids)} token ids differ (id: data's token vs the model's): {first}{more}"


def check_tokenizer(
    who: str, model_dir: Path, data: PreparedData | TokenWindows, *, required: bool = True
) -> None:
    """Refuse a model folder whose tokenizer differs from the prepared data's (ids would mean other
    tokens), naming the first differing ids; ``required``: refuse a folder without a tokenizer too.
    ``who`` starts the message, e.g. "Teacher 'llama'" or "student.model"."""
    saved = model_dir / "tokenizer.json"
    if saved.is_file() and saved.read_bytes() == Path(data.tokenizer_path).read_bytes():
        return
    theirs = tokenizer_vocab(model_dir)
    if theirs is None:
        if required:
            raise TeacherError(
                f"{who} at {model_dir} has no tokenizer (tokenizer.json). Expected the tokenizer of the prepared "
                f"data ({data.tokenizer_path}); teachers must share it."
            )
        return
    ours = Tokenizer.from_file(str(data.tokenizer_path)).get_vocab(with_added_tokens=True)
    if differences := vocab_differences(ours, theirs):
        raise TeacherError(
            f"{who} at {model_dir} uses a different tokenizer than the prepared data (and its cache): "
            f"{differences}. Prepare the data with that model's tokenizer (data.tokenizer = its folder), "
            "or use models that share the data's tokenizer."
        )


def vocab_error(who: str, model_dir: Path, data: PreparedData | TokenWindows, vocab: int) -> TeacherError:
    who = who[:1].lower() + who[1:]  # "Teacher 'x'" starts other messages
    return TeacherError(
        f"Expected {who} at {model_dir} to predict the {data.vocab_size} tokens of the prepared data. Got an "
        f"output layer of {vocab} tokens: use models that share the data's tokenizer, or prepare the data "
        "with theirs."
    )


def check_vocab_size(who: str, model_dir: Path, data: PreparedData | TokenWindows) -> None:
    """Refuse a model with fewer output logits than the data has tokens, from its config.json (before
    the weights are read; :func:`check_model_fits` checks the loaded model again)."""
    try:
        vocab = int(AutoConfig.from_pretrained(model_dir, trust_remote_code=False).vocab_size)
    except Exception:  # noqa: BLE001 - no readable vocab_size: the loaded model is checked instead
        return
    if vocab < data.vocab_size:
        raise vocab_error(who, model_dir, data, vocab)


def check_teacher(
    who: str, model_dir: Path, data: PreparedData | TokenWindows, *, tokenizer_required: bool = True
) -> None:
    """Every check of a model folder against prepared data, before its weights are opened (the one
    check of cache-logits, online students, ``pipe evaluate`` and the API): safetensors only (no
    pickle), headers intact, the data's tokenizer, enough output logits."""
    check_model_dir(model_dir)
    check_tokenizer(who, model_dir, data, required=tokenizer_required)
    check_vocab_size(who, model_dir, data)


def check_model_folder(
    who: str, model_dir: Path, data: PreparedData | TokenWindows, *, weights: bool
) -> None:
    """The HF folder a teacher or student is built from (``model.path``): its tokenizer, when it has one,
    must be the data's; ``weights``: it must hold safetensors weights (they are loaded)."""
    if not (model_dir / "config.json").is_file():
        raise TeacherError(
            f"Expected {who}.path to be a Hugging Face model folder (with config.json). Got {str(model_dir)!r}."
        )
    check_tokenizer(who, model_dir, data, required=False)
    if weights:
        check_model_dir(model_dir)


def load_teacher(
    name: str,
    model_dir: Path,
    data: PreparedData | TokenWindows,
    device: torch.device,
    *,
    dtype: str = "auto",
) -> PreTrainedModel:
    """One teacher, checked against the data (:func:`check_teacher`: weights format, tokenizer,
    vocabulary), frozen, in eval mode.

    ``dtype``: "auto" (as the weights are stored), "bfloat16", "float16" or "float32".
    """
    check_teacher(f"Teacher '{name}'", model_dir, data)
    model = load_model(model_dir, dtype=DTYPES.get(dtype, "auto")).to(device).eval()
    model.requires_grad_(False)
    check_model_fits(model, vocab_size=data.vocab_size, seq_len=data.seq_len, where=f"teacher '{name}'")
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
    ``dtypes`` (name -> "auto", "bfloat16", "float16" or "float32"; default "auto", the stored
    dtype) is what each teacher is loaded in. Teachers run in eval mode without gradients; float32
    ones in bf16 autocast on CUDA, half-precision ones as they are.
    """

    def __init__(
        self,
        dirs: Mapping[str, Path],
        data: PreparedData | TokenWindows,
        device: torch.device,
        *,
        cache: CacheConfig,
        seed: int,
        dtypes: Mapping[str, str] | None = None,
    ):
        if not dirs:
            raise StageError("Expected at least one teacher in the config ([teachers.NAME]). Got none.")
        self.dirs = {name: Path(path) for name, path in dirs.items()}
        self.names = list(self.dirs)
        self.vocab = data.vocab_size
        self.cache = cache
        self.seed = seed
        self.device = device
        dtypes = dtypes or {}
        self.models = [
            load_teacher(name, path, data, device, dtype=dtypes.get(name, "auto"))
            for name, path in self.dirs.items()
        ]
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        )
        # What each teacher computes in: bf16 under autocast, else its weights' dtype.
        self.dtypes = [
            "bfloat16" if self._autocast(model) else str(model.dtype).removeprefix("torch.")
            for model in self.models
        ]

    @property
    def all_float32(self) -> bool:
        """Whether every teacher computes in float32 (else bf16/fp16 rounding enters the logits)."""
        return all(dtype == "float32" for dtype in self.dtypes)

    def _autocast(self, model: PreTrainedModel) -> bool:
        return self.device.type == "cuda" and model.dtype == torch.float32

    @classmethod
    def load(cls, config: Config, data: PreparedData, device: torch.device) -> TeacherEnsemble:
        """The teachers of ``config`` (each in ``teachers.NAME.dtype``) with its ``[cache]`` ensemble
        rule and ``run.seed``."""
        dtypes = {name: teacher.dtype for name, teacher in config.teachers.items()}
        return cls(
            trained_teacher_dirs(config),
            data,
            device,
            cache=config.cache,
            seed=config.run.seed,
            dtypes=dtypes,
        )

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
                dtype=dtype,
            )
            for (name, path), dtype in zip(self.dirs.items(), self.dtypes, strict=True)
        )

    @torch.no_grad()
    def teacher_logits(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """Each teacher's logits (B, T, V) for windows (B, T), cut to the tokenizer's vocabulary V.

        Ids >= V (an output layer padded beyond the tokenizer) are dropped here, before any ensemble
        or top-k, so they can never be selected nor take probability mass.
        """
        input_ids = windows.to(self.device, dtype=torch.long)  # (B, T)
        logits = []
        for model in self.models:
            with self.autocast if self._autocast(model) else nullcontext():
                out = model(input_ids=input_ids).logits  # (B, T, V_model), V_model >= V
            logits.append(out[..., : self.vocab])  # (B, T, V)
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
    def select(
        self, windows: torch.Tensor, window_indices: torch.Tensor
    ) -> TopkSelection | SampledSelection | HybridSelection:
        """The entries a cache stores for windows (B, T) (rows ``window_indices`` of the data), on the CPU."""
        cache = self.cache
        # Each mode a block of windows at a time (cache/select.py): the same entries as
        # select_*(self.logprobs(...)), without (B, T, V) temporaries.
        selection: TopkSelection | SampledSelection | HybridSelection
        if cache.mode == "hybrid":
            selection = ensemble_hybrid(
                self.teacher_logits(windows),
                k=cache.k,
                num_samples=cache.tail_samples,
                seed=self.seed,
                **self._ensemble_args(window_indices),
            )
        elif cache.mode == "sampled":
            selection = ensemble_sampled(
                self.teacher_logits(windows),
                num_samples=cache.samples,
                seed=self.seed,
                **self._ensemble_args(window_indices),
            )
        else:
            selection = ensemble_topk(
                self.teacher_logits(windows), k=cache.k, **self._ensemble_args(window_indices)
            )
        return type(selection)(**{f: getattr(selection, f).cpu() for f in selection.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------
# The cached source


def cache_settings_differences(config: Config, metadata: CacheMetadata) -> list[str]:
    """``field (config X, cache Y)`` for each setting of ``config`` that the cache was made with otherwise.

    Compared: what decides the stored entries (teachers, ensemble rule, temperature, mode, k or
    the number of samples, their encoding; the seed of a sampled or hybrid cache), not how the cache was
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
        if cache.mode == "hybrid":
            pairs += [
                ("cache.k", cache.k, metadata.k),
                ("cache.tail_samples", cache.tail_samples, metadata.num_samples),
                ("cache.value_code", cache.value_code, metadata.encoding.value_code),
                ("run.seed", config.run.seed, metadata.seed),
            ]
        elif sampled:
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


def cache_store(config: Config) -> str | Path:
    """The store the cache-mode student reads: the ``cache.store`` URL when set, else
    ``RUN/cache/logits.zarr`` (or ``RUN/cache`` if that is one)."""
    layout = RunLayout.of(config)
    return layout.cache_url or locate_cache_store(layout.cache)


def open_checked_cache(
    store: StoreLike,
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
    if not (existing_cache(store) if isinstance(store, str) else Path(store).exists()):  # a URL: any objects
        raise StageError(
            f"Expected a logit cache at {store}. Found none: run `pipe cache-logits CONFIG` first."
        )
    reader = open_cache(store)  # verified: metadata, files, indexes, digests (~0.02 s on the demo)
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
