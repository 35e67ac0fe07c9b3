"""The metadata of a logit cache: what was cached, from what, and how it is encoded.

Modelled on zarr-python's ``metadata/v3.py``: one :data:`FORMAT_VERSION` constant, small
``parse_*`` functions that each validate one field and raise :class:`CacheError` naming it, and
frozen dataclasses whose ``to_dict`` / ``from_dict`` round-trip exactly
(``CacheMetadata.from_dict(m.to_dict()) == m``) and reject unknown keys.

The JSON form of :class:`CacheMetadata` is stored in the cache group's attributes under the key
``"logitcache"`` (see docs/cache-format.md).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from logitcache.cache.errors import CacheError

FORMAT_VERSION: Final = 2
"""Version of the on-disk layout written now. Bumped on any change an older reader could misread
(version 2 added the ``hybrid`` mode; docs/cache-format.md, "Versioning")."""

SUPPORTED_FORMAT_VERSIONS: Final = (1, 2)
HYBRID_MIN_FORMAT_VERSION: Final = 2

EnsembleRule = Literal["mean_logits", "mean_probs"]
Mode = Literal["topk", "sampled", "hybrid"]
IdCode = Literal["sorted_gaps", "rank"]
ValueCode = Literal[
    "logp_q8",
    "logp_q10",
    "logp_q12",
    "logp_q16",
    "logp_fp16",
    "logp_bf16",
    "logp_fp32",
    "ratio_q8",
    "ratio_q10",
    "ratio_q12",
    "ratio_q16",
    "count",
]

# The tuples the parse_* validators check against, derived from the Literal types above.
ENSEMBLE_RULES: Final = get_args(EnsembleRule)
MODES: Final = get_args(Mode)
ID_CODES: Final = get_args(IdCode)
VALUE_CODES: Final = get_args(ValueCode)
TEACHER_DTYPES: Final = ("float32", "bfloat16", "float16")
BLOSC_CNAMES: Final = ("zstd", "lz4", "lz4hc", "blosclz", "zlib")
BLOSC_SHUFFLES: Final = ("bitshuffle", "shuffle", "noshuffle")
# Hybrid mode stores head probabilities and tail counts in one uint16 values array: head codes
# must be stored as uint16 too (counts need up to 16 bits).
HYBRID_VALUE_CODES: Final = ("ratio_q10", "ratio_q12", "ratio_q16", "logp_q10", "logp_q12", "logp_q16")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------
# parse_* : one field each, raise CacheError naming the field
# --------------------------------------------------------------------------------------------


def _fail(field_name: str, expected: str, got: object) -> CacheError:
    return CacheError(f"Expected cache metadata field '{field_name}' to be {expected}. Got {got!r}.")


def parse_format_version(data: object) -> int:
    if isinstance(data, bool) or not isinstance(data, int):
        raise _fail("format_version", "an integer", data)
    if data not in SUPPORTED_FORMAT_VERSIONS:
        raise CacheError(
            f"Expected cache format_version in {list(SUPPORTED_FORMAT_VERSIONS)}. Got {data}. "
            "The cache was written by another version of logitcache: upgrade it or rebuild the cache."
        )
    return data


def parse_positive_int(data: object, field_name: str) -> int:
    if isinstance(data, bool) or not isinstance(data, int) or data < 1:
        raise _fail(field_name, "a positive integer", data)
    return data


def parse_nonnegative_int(data: object, field_name: str) -> int:
    if isinstance(data, bool) or not isinstance(data, int) or data < 0:
        raise _fail(field_name, "a non-negative integer", data)
    return data


def parse_sha256(data: object, field_name: str) -> str:
    if not isinstance(data, str) or not _SHA256_RE.match(data):
        raise _fail(field_name, "a lowercase hex SHA-256 (64 characters)", data)
    return data


def parse_str(data: object, field_name: str) -> str:
    if not isinstance(data, str):
        raise _fail(field_name, "a string", data)
    return data


def parse_choice(data: object, field_name: str, choices: tuple[str, ...]) -> Any:
    if data not in choices:
        raise _fail(field_name, f"one of {list(choices)}", data)
    return data


def parse_positive_float(data: object, field_name: str) -> float:
    if isinstance(data, bool) or not isinstance(data, int | float):
        raise _fail(field_name, "a positive finite number", data)
    value = float(data)
    if not math.isfinite(value) or value <= 0:
        raise _fail(field_name, "a positive finite number", data)
    return value


def parse_finite_float(data: object, field_name: str) -> float:
    if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(float(data)):
        raise _fail(field_name, "a finite number", data)
    return float(data)


def parse_json_dict(data: object, field_name: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise _fail(field_name, "a JSON object (dict)", type(data).__name__)
    try:
        # Round-trip through JSON: the stored value must equal what a reader gets back.
        return dict(json.loads(json.dumps(dict(data), allow_nan=False, sort_keys=True)))
    except (TypeError, ValueError) as exc:
        raise _fail(
            field_name, "JSON-serialisable (str/int/float/bool/None/list/dict, finite)", str(exc)
        ) from None


def check_keys(
    data: Mapping[str, Any], allowed: tuple[str, ...], required: tuple[str, ...], where: str
) -> None:
    """Refuse a JSON object with keys outside ``allowed`` or without one of ``required``."""
    if not isinstance(data, Mapping):
        raise CacheError(f"Expected {where} to be a JSON object. Got {type(data).__name__}.")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise CacheError(
            f"Expected only the keys {list(allowed)} in {where}. Got unknown keys {unknown}. "
            "The cache may come from a newer logitcache: upgrade it."
        )
    missing = [key for key in required if key not in data]
    if missing:
        raise CacheError(f"Expected the keys {missing} in {where}. Got none. The cache metadata is damaged.")


# --------------------------------------------------------------------------------------------
# dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherInfo:
    """One teacher of the ensemble: a display name, where it was loaded from, the SHA-256 of its
    weights (e.g. of the concatenated safetensors files, as the caller defines it) and the dtype
    its forward pass ran in."""

    name: str
    path: str
    weights_sha256: str
    dtype: str

    def __post_init__(self) -> None:
        parse_str(self.name, "teachers[].name")
        parse_str(self.path, "teachers[].path")
        parse_sha256(self.weights_sha256, "teachers[].weights_sha256")
        parse_choice(self.dtype, "teachers[].dtype", TEACHER_DTYPES)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "weights_sha256": self.weights_sha256,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TeacherInfo:
        keys = ("name", "path", "weights_sha256", "dtype")
        check_keys(data, keys, keys, "cache metadata 'teachers[]'")
        return cls(**{key: data[key] for key in keys})


@dataclass(frozen=True)
class Compressor:
    """Blosc settings used inside each inner chunk (before the crc32c checksum)."""

    cname: str = "zstd"
    clevel: int = 3
    shuffle: str = "bitshuffle"

    def __post_init__(self) -> None:
        parse_choice(self.cname, "encoding.compressor.cname", BLOSC_CNAMES)
        if isinstance(self.clevel, bool) or not isinstance(self.clevel, int) or not 0 <= self.clevel <= 9:
            raise _fail("encoding.compressor.clevel", "an integer in [0, 9]", self.clevel)
        parse_choice(self.shuffle, "encoding.compressor.shuffle", BLOSC_SHUFFLES)

    def to_dict(self) -> dict[str, Any]:
        return {"cname": self.cname, "clevel": self.clevel, "shuffle": self.shuffle}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Compressor:
        keys = ("cname", "clevel", "shuffle")
        check_keys(data, keys, keys, "cache metadata 'encoding.compressor'")
        return cls(**{key: data[key] for key in keys})


@dataclass(frozen=True)
class Encoding:
    """How the selected entries are turned into array elements (see cache/encoding.py).

    ``id_code``: ``"sorted_gaps"`` (default: ids sorted ascending per position, stored as the
    first id then the gaps to the previous id; values reordered to match) or ``"rank"`` (ids and
    values in rank order, most probable first). ``value_code``: see :mod:`logitcache.cache.encoding`.
    ``logp_floor``: lower end of the range of the ``logp_q*`` codes (log-probabilities below it are
    stored as the floor). ``compressor``: Blosc settings of the values and tail arrays;
    ``id_compressor``: of the ids array (gaps compress best with another shuffle than values).
    """

    id_code: str = "sorted_gaps"
    value_code: str = "ratio_q10"
    logp_floor: float = -20.0
    compressor: Compressor = field(default_factory=Compressor)
    id_compressor: Compressor = field(default_factory=lambda: Compressor(shuffle="shuffle"))

    def __post_init__(self) -> None:
        parse_choice(self.id_code, "encoding.id_code", ID_CODES)
        parse_choice(self.value_code, "encoding.value_code", VALUE_CODES)
        floor = parse_finite_float(self.logp_floor, "encoding.logp_floor")
        if floor >= 0:
            raise _fail("encoding.logp_floor", "a negative number", self.logp_floor)
        object.__setattr__(self, "logp_floor", floor)
        for name in ("compressor", "id_compressor"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, Compressor.from_dict(value))
            elif not isinstance(value, Compressor):
                raise _fail(f"encoding.{name}", "a Compressor", value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id_code": self.id_code,
            "value_code": self.value_code,
            "logp_floor": self.logp_floor,
            "compressor": self.compressor.to_dict(),
            "id_compressor": self.id_compressor.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Encoding:
        keys = ("id_code", "value_code", "logp_floor", "compressor", "id_compressor")
        check_keys(data, keys, keys, "cache metadata 'encoding'")
        return cls(
            id_code=data["id_code"],
            value_code=data["value_code"],
            logp_floor=data["logp_floor"],
            compressor=Compressor.from_dict(data["compressor"]),
            id_compressor=Compressor.from_dict(data["id_compressor"]),
        )


SAMPLED_ENCODING: Final = Encoding(value_code="count")
"""The encoding used for ``mode="sampled"`` (counts are exact; ids sorted as gaps)."""


@dataclass(frozen=True)
class CacheMetadata:
    """Everything needed to use a cache safely. Validated on construction.

    Mode ``"topk"`` stores, per position, the ``k`` most probable ids of the ensemble distribution
    at ``temperature``, their probabilities and the tail mass. Mode ``"sampled"`` stores the unique
    ids among ``num_samples`` draws and their counts; ``k`` is then the stored width and must equal
    ``num_samples`` (positions with fewer unique ids are padded). Mode ``"hybrid"`` (format
    version 2) stores the ``k`` most probable ids with their probabilities and the tail mass, as
    ``topk``, and the unique ids among ``num_samples`` draws from the tail distribution (the
    distribution restricted to the other ids, renormalised) with their counts; the stored width
    is ``k + num_samples`` (:attr:`width`).
    """

    vocab_size: int
    tokenizer_sha256: str
    dataset_sha256: str
    teachers: tuple[TeacherInfo, ...]
    k: int
    package_version: str
    ensemble: str = "mean_logits"
    teacher_weights: tuple[float, ...] | None = None
    temperature: float = 1.0
    mode: str = "topk"
    num_samples: int | None = None
    seed: int = 0
    encoding: Encoding = field(default_factory=Encoding)
    config: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        parse_format_version(self.format_version)
        vocab = parse_positive_int(self.vocab_size, "vocab_size")
        parse_sha256(self.tokenizer_sha256, "tokenizer_sha256")
        parse_sha256(self.dataset_sha256, "dataset_sha256")
        teachers = tuple(
            TeacherInfo.from_dict(t) if isinstance(t, Mapping) else t for t in (self.teachers or ())
        )
        if not teachers or not all(isinstance(t, TeacherInfo) for t in teachers):
            raise _fail("teachers", "a non-empty list of TeacherInfo", self.teachers)
        object.__setattr__(self, "teachers", teachers)
        k = parse_positive_int(self.k, "k")
        if k >= vocab:
            raise CacheError(f"Expected k < vocab_size. Got k={k}, vocab_size={vocab}. Choose a smaller k.")
        parse_str(self.package_version, "package_version")
        parse_choice(self.ensemble, "ensemble", ENSEMBLE_RULES)
        if self.teacher_weights is not None:
            weights = tuple(parse_positive_float(w, "teacher_weights[]") for w in self.teacher_weights)
            if len(weights) != len(teachers):
                raise CacheError(
                    f"Expected one teacher weight per teacher ({len(teachers)}). Got {len(weights)} weights."
                )
            object.__setattr__(self, "teacher_weights", weights)
        object.__setattr__(self, "temperature", parse_positive_float(self.temperature, "temperature"))
        parse_choice(self.mode, "mode", MODES)
        if isinstance(self.encoding, Mapping):
            object.__setattr__(self, "encoding", Encoding.from_dict(self.encoding))
        if not isinstance(self.encoding, Encoding):
            raise _fail("encoding", "an Encoding", self.encoding)
        if self.mode == "hybrid":
            self._check_hybrid(vocab, k)
        elif self.mode == "sampled":
            n = parse_positive_int(self.num_samples, "num_samples")
            if n != k:
                raise CacheError(
                    f"Expected k == num_samples in sampled mode (k is the stored width). Got k={k}, num_samples={n}."
                )
            if n > 65535:
                raise _fail("num_samples", "at most 65535 (counts are stored as uint16)", n)
            if self.encoding.value_code != "count" or self.encoding.id_code != "sorted_gaps":
                raise CacheError(
                    "Expected encoding value_code='count' and id_code='sorted_gaps' in sampled mode. "
                    f"Got value_code={self.encoding.value_code!r}, id_code={self.encoding.id_code!r}. "
                    "Use logitcache.cache.SAMPLED_ENCODING."
                )
        else:
            if self.num_samples is not None:
                raise _fail("num_samples", "null in topk mode", self.num_samples)
            if self.encoding.value_code == "count":
                raise _fail("encoding.value_code", "a probability code (not 'count') in topk mode", "count")
        parse_nonnegative_int(self.seed, "seed")
        object.__setattr__(self, "config", parse_json_dict(self.config, "config"))

    def _check_hybrid(self, vocab: int, k: int) -> None:
        if self.format_version < HYBRID_MIN_FORMAT_VERSION:
            raise _fail(
                "format_version", f">= {HYBRID_MIN_FORMAT_VERSION} in hybrid mode", self.format_version
            )
        m = parse_positive_int(self.num_samples, "num_samples")
        if m > 65535:
            raise _fail("num_samples", "at most 65535 (counts are stored as uint16)", m)
        if k + m >= vocab:
            raise CacheError(
                f"Expected k + num_samples < vocab_size in hybrid mode (the stored width). Got k={k}, "
                f"num_samples={m}, vocab_size={vocab}. Choose fewer entries."
            )
        if self.encoding.id_code != "sorted_gaps" or self.encoding.value_code not in HYBRID_VALUE_CODES:
            raise CacheError(
                f"Expected encoding id_code='sorted_gaps' and value_code in {list(HYBRID_VALUE_CODES)} in "
                f"hybrid mode (head values share a uint16 array with the tail counts). Got "
                f"id_code={self.encoding.id_code!r}, value_code={self.encoding.value_code!r}."
            )

    @property
    def width(self) -> int:
        """Stored entries per position (the last dim of ``ids`` and ``values``): ``k``, or
        ``k + num_samples`` in hybrid mode."""
        return self.k + (self.num_samples or 0) if self.mode == "hybrid" else self.k

    @property
    def has_tail(self) -> bool:
        """Whether the cache stores the tail mass (array ``tail``): topk and hybrid modes."""
        return self.mode in ("topk", "hybrid")

    @property
    def id_dtype(self) -> str:
        """Storage dtype of the id array: uint16 when every id (and gap) fits, else int32."""
        return "uint16" if self.vocab_size <= 65536 else "int32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.tokenizer_sha256,
            "dataset_sha256": self.dataset_sha256,
            "teachers": [t.to_dict() for t in self.teachers],
            "ensemble": self.ensemble,
            "teacher_weights": None if self.teacher_weights is None else list(self.teacher_weights),
            "temperature": self.temperature,
            "k": self.k,
            "mode": self.mode,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "encoding": self.encoding.to_dict(),
            "package_version": self.package_version,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheMetadata:
        keys = (
            "format_version",
            "vocab_size",
            "tokenizer_sha256",
            "dataset_sha256",
            "teachers",
            "ensemble",
            "teacher_weights",
            "temperature",
            "k",
            "mode",
            "num_samples",
            "seed",
            "encoding",
            "package_version",
            "config",
        )
        if not isinstance(data, Mapping):
            raise CacheError(f"Expected the cache metadata to be a JSON object. Got {type(data).__name__}.")
        # Check the version first: a newer format may have other keys, and that is the real error.
        parse_format_version(data.get("format_version"))
        check_keys(data, keys, keys, "cache metadata")
        teachers = data["teachers"]
        if not isinstance(teachers, list):
            raise _fail("teachers", "a list", teachers)
        weights = data["teacher_weights"]
        if weights is not None and not isinstance(weights, list):
            raise _fail("teacher_weights", "a list or null", weights)
        return cls(
            format_version=data["format_version"],
            vocab_size=data["vocab_size"],
            tokenizer_sha256=data["tokenizer_sha256"],
            dataset_sha256=data["dataset_sha256"],
            teachers=tuple(TeacherInfo.from_dict(t) for t in teachers),
            ensemble=data["ensemble"],
            teacher_weights=None if weights is None else tuple(weights),
            temperature=data["temperature"],
            k=data["k"],
            mode=data["mode"],
            num_samples=data["num_samples"],
            seed=data["seed"],
            encoding=Encoding.from_dict(data["encoding"]),
            package_version=data["package_version"],
            config=data["config"],
        )

    def differences(self, other: CacheMetadata) -> list[str]:
        """Names of the top-level fields whose values differ (for resume error messages)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [key for key in mine if mine[key] != theirs[key]]
