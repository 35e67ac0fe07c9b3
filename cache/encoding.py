"""Encode selected entries into the stored arrays and decode them back (NumPy / CPU torch, no zarr).

All transforms happen here, before zarr's codec chain, so that the stored arrays are plain
integers / floats readable by any Zarr v3 implementation (no numcodecs filters).

Ids (``id_code``), stored as ``uint16`` when ``vocab_size <= 65536`` else ``int32``:

* ``sorted_gaps``: per position the ids are sorted ascending and stored as
  ``[id_0, id_1 - id_0, ..., id_{k-1} - id_{k-2}]``; decoding is ``cumsum`` (exact). Values are
  reordered to match. Gaps are smaller and far more compressible than ids in rank order. A gap of
  0 after the first slot marks a padding slot (sampled mode only); it decodes to the previous id.
* ``rank``: ids as selected, most probable first.

Values (``value_code``); ``p`` = probability at the cache temperature, ``logp = log p``,
``p_max`` = the largest ``p`` of the position:

=============  =========  ========================================================  ========================================
code           dtype      stored value                                              decoding error bound per entry
=============  =========  ========================================================  ========================================
``ratio_qB``   u8 / u16   ``q = rint(p / p_max * (2^B - 1))`` (B = 8, 10, 12, 16);        ``|d p| <= p_max / (2 (2^B - 1))``
                          decoded ``u = q / (2^B - 1)`` (so ``p ~ u * p_max``)        before renormalisation
``logp_qB``    u8 / u16   ``q = rint((max(logp, f) - f) / -f * (2^B - 1))``,          ``|d logp| <= -f / (2 (2^B - 1))``
                          ``f = logp_floor``; decoded ``u = exp(f + q (-f) / (2^B-1))``  (below ``f``: decodes to ``e^f``)
``logp_fp16``  float16    ``logp`` rounded to float16 (clamped to [-1000, 0])         ``|d logp| <= 2^-11 |logp|``
``logp_bf16``  u16        the upper 16 bits of float32 ``logp``, round-to-nearest     ``|d logp| <= 2^-8 |logp|``
``logp_fp32``  float32    ``logp`` (clamped to [-1000, 0])                           float32 rounding only
``count``      u16        number of draws of the id (sampled mode)                   exact; weight = count / num_samples
=============  =========  ========================================================  ========================================

The reader turns the decoded ``u`` into weights by renormalising over the stored entries of the
position: ``w = u / sum(u)`` (renormalised top-k) or ``w = u / sum(u) * (1 - tail)``
(ghost-bucket mode: the stored entries plus the tail sum to exactly 1). ``ratio_qB`` therefore
needs no scale: the top entry always stores ``2^B - 1``. ``count`` is used as ``count / n``.

The quantised codes are computed in float32; ``rint`` rounds half to even.

Tail mass (topk and hybrid modes): float32, exact as computed.

Hybrid mode (format version 2): ``ids`` and ``values`` have ``k + m`` slots per position in two
segments, each sorted gaps of its own: slots ``[0, k)`` the head (ids and a 16-bit probability
code, as topk), slots ``[k, k + m)`` the unique ids drawn from the tail and their ``count``s
(padding as in sampled mode). Decoded weights: head ``u / sum(u) * (1 - tail)``, tail
``tail * count / m`` (the importance weights: unbiased for the tail, see cache/select.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from logitcache.cache.errors import CacheError
from logitcache.cache.metadata import CacheMetadata

FLOAT_LOGP_MIN = -1000.0  # exp(-1000) == 0 in float32: nothing is lost by clamping there


def value_bits(value_code: str) -> int:
    """B of a ``*_qB`` code."""
    return int(value_code.rsplit("_q", 1)[1])


def value_dtype(value_code: str) -> np.dtype:
    """Storage dtype of the values array."""
    if value_code in ("logp_q8", "ratio_q8"):
        return np.dtype("uint8")
    if value_code in (
        "logp_q10",
        "logp_q12",
        "logp_q16",
        "ratio_q10",
        "ratio_q12",
        "ratio_q16",
        "logp_bf16",
        "count",
    ):
        return np.dtype("uint16")
    if value_code == "logp_fp16":
        return np.dtype("float16")
    if value_code == "logp_fp32":
        return np.dtype("float32")
    raise CacheError(f"Expected a known value code. Got {value_code!r}.")


def value_max(value_code: str, *, num_samples: int | None = None) -> float:
    """Largest valid stored integer for integer codes (used by verify)."""
    if value_code == "count":
        return float(num_samples or 0)
    if "_q" in value_code:
        return float((1 << value_bits(value_code)) - 1)
    if value_code == "logp_bf16":
        return float(np.iinfo(np.uint16).max)
    return 0.0  # float codes store log p <= 0


@dataclass(frozen=True)
class EncodedEntries:
    """The arrays written for a block of rows."""

    ids: np.ndarray  # (R, T, k) uint16 | int32
    values: np.ndarray  # (R, T, k) see value_dtype
    tail: np.ndarray | None  # (R, T) float32, None in sampled mode


@dataclass(frozen=True)
class DecodedEntries:
    """Entries read back: ids exact, weights within the code's error bound."""

    ids: np.ndarray  # (R, T, k) int64
    weights: np.ndarray  # (R, T, k) float32, see normalize_weights; 0 in padding slots
    tail: np.ndarray | None  # (R, T) float32 or None


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> upper 16 bits, rounded to nearest even (finite inputs only)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def encode_values(logprobs: np.ndarray, *, value_code: str, logp_floor: float) -> np.ndarray:
    """Encode float log-probabilities with a probability code (not ``count``)."""
    if value_code.startswith(("logp_q", "ratio_q")):
        # float32 torch (several threads): its rounding moves q by one level only where the exact
        # value lies within ~1e-4 of a level's edge, far inside the error bounds of the table
        logp_t = torch.as_tensor(logprobs).to(torch.float32).clamp(max=0.0)
        levels = (1 << value_bits(value_code)) - 1
        if value_code.startswith("logp_q"):
            scaled = (logp_t.clamp(min=logp_floor) - logp_floor) * (levels / -logp_floor)
        else:  # p / p_max in [0, 1]; the top entry is exp(0) * levels = levels exactly
            scaled = torch.exp(logp_t - logp_t.amax(dim=-1, keepdim=True)) * levels
        return torch.round(scaled).to(torch.int32).numpy().astype(value_dtype(value_code))  # half to even
    logp = np.minimum(np.asarray(logprobs, dtype=np.float64), 0.0)
    clamped = np.maximum(logp, FLOAT_LOGP_MIN)
    if value_code == "logp_fp16":
        return clamped.astype(np.float16)
    if value_code == "logp_bf16":
        return _bf16_bits(clamped.astype(np.float32))
    if value_code == "logp_fp32":
        return clamped.astype(np.float32)
    raise CacheError(f"Expected a probability value code. Got {value_code!r}.")


def decode_probs(
    values: np.ndarray, *, value_code: str, logp_floor: float, num_samples: int | None = None
) -> np.ndarray:
    """Stored values -> unnormalised weights ``u`` (float32), see the module docstring."""
    if value_code == "count":
        return (values.astype(np.float64) / float(num_samples or 1)).astype(np.float32)
    if value_code.startswith("logp_q"):
        levels = (1 << value_bits(value_code)) - 1
        logp = logp_floor + values.astype(np.float64) * (-logp_floor / levels)
        return np.exp(logp).astype(np.float32)
    if value_code.startswith("ratio_q"):
        levels = (1 << value_bits(value_code)) - 1
        return (values.astype(np.float64) / levels).astype(np.float32)
    if value_code == "logp_bf16":
        return np.exp(_bf16_to_float32(values)).astype(np.float32)
    if value_code in ("logp_fp16", "logp_fp32"):
        return np.exp(values.astype(np.float32))
    raise CacheError(f"Expected a known value code. Got {value_code!r}.")


def mass_tolerance(metadata: CacheMetadata) -> float | None:
    """Bound on ``|sum(decoded u) + tail - 1|`` for a valid topk position, or None where the code
    stores no absolute scale (``ratio_qB``: verify checks ``max q == 2^B - 1`` instead).

    Derived from the per-entry bounds in the module docstring summed over k entries, plus 1e-5
    for float32 rounding of the tail and of the sum.
    """
    enc, k = metadata.encoding, metadata.k
    code = enc.value_code
    slack = 1e-5
    if code.startswith("ratio_q") or code == "count":
        return None
    if code.startswith("logp_q"):
        half_step = -enc.logp_floor / (2 * ((1 << value_bits(code)) - 1))
        return float(np.expm1(half_step)) + k * float(np.exp(enc.logp_floor)) + slack
    # Float codes: |dp| <= p * expm1(u |logp|) and p |logp| <= 1/e, so the sum is <= ~k u / e.
    unit = {"logp_fp16": 2.0**-11, "logp_bf16": 2.0**-8, "logp_fp32": 2.0**-24}[code]
    return 1.1 * k * unit / np.e + slack


# float32 rounding inside the encoder, in units of the decoded u (ratio codes: exp of (logp - max)
# in float32 is within a few ulp, so ``scaled`` is off by <= L * 2^-22 levels, i.e. 2^-22 in u) and
# in log-probability (logp codes: the affine map to levels and back in float32/float64).
_ENCODE_ROUNDING_U = 2.0**-22
_ENCODE_ROUNDING_LOGP = 2.0**-20
# |d logp| <= relative * |logp| + absolute for the float codes (absolute: float16 subnormals, 2^-24).
_FLOAT_LOGP_ERROR = {
    "logp_fp16": (2.0**-11, 2.0**-24),
    "logp_bf16": (2.0**-8, 2.0**-133),
    "logp_fp32": (2.0**-24, 2.0**-149),
}


def decoded_interval(probs: np.ndarray, metadata: CacheMetadata) -> tuple[np.ndarray, np.ndarray]:
    """Bounds ``lo <= u <= hi`` on the decoded ``u`` of entries whose exact probabilities are ``probs``.

    ``probs``: (..., k) the exact probabilities of the stored entries of each position (topk mode).
    From the per-entry error bounds in the module docstring: ``ratio_qB``:
    ``u = p / p_max +- (1/2 + eps) / (2^B - 1)``; ``logp_qB``: ``u = max(p, e^f) * e^(+-h)`` with
    ``h = -f / (2 (2^B - 1))`` (below the floor ``u = e^f``); float codes:
    ``u = p * e^(+-d)`` with ``d = rel * |log p| + abs``. ``eps`` covers float32 rounding in the encoder.
    """
    p = np.asarray(probs, dtype=np.float64)  # (..., k)
    code, enc = metadata.encoding.value_code, metadata.encoding
    if code.startswith("ratio_q"):
        levels = (1 << value_bits(code)) - 1
        ratio = p / np.maximum(p.max(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
        error = 0.5 / levels + _ENCODE_ROUNDING_U
        return np.clip(ratio - error, 0.0, None), ratio + error
    if code.startswith("logp_q"):
        half_step = -enc.logp_floor / (2 * ((1 << value_bits(code)) - 1)) + _ENCODE_ROUNDING_LOGP
        floored = np.maximum(p, np.exp(enc.logp_floor))
        return floored * np.exp(-half_step), floored * np.exp(half_step)
    if code in _FLOAT_LOGP_ERROR:
        relative, absolute = _FLOAT_LOGP_ERROR[code]
        logp = np.log(np.maximum(p, np.finfo(np.float64).tiny))
        spread = relative * np.abs(logp) + absolute + _ENCODE_ROUNDING_LOGP
        return p * np.exp(-spread), p * np.exp(spread)
    raise CacheError(f"Expected a probability value code (topk mode). Got {code!r}.")


def weight_error_bound(probs: np.ndarray, kept: np.ndarray, metadata: CacheMetadata) -> np.ndarray:
    """Bound on ``|w - p|`` for the weights the reader returns, including renormalisation.

    ``w_i = u_i / sum_j u_j * kept`` (``kept = 1 - tail``: ghost mode; ``kept = 1``: renormalised
    against ``p / sum p``, pass ``probs`` normalised then). ``w_i`` grows with ``u_i`` and shrinks
    with every other ``u_j``, so over the intervals of :func:`decoded_interval` its extremes are
    ``kept * lo_i / (lo_i + sum_{j != i} hi_j)`` and ``kept * hi_i / (hi_i + sum_{j != i} lo_j)``;
    the bound is the larger distance from ``p_i`` to either. For ``ratio_qB`` this is about
    ``p_max (kept + k p_i) / (2 (2^B - 1) kept)``: the k rounding errors in ``sum u`` move every weight,
    up to k / 2 times the error of the entry itself. Returns (..., k) float64.
    """
    p = np.asarray(probs, dtype=np.float64)  # (..., k)
    lo, hi = decoded_interval(p, metadata)
    kept = np.asarray(kept, dtype=np.float64)[..., None]  # (..., 1)
    tiny = np.finfo(np.float64).tiny
    w_low = kept * lo / np.maximum(lo + hi.sum(-1, keepdims=True) - hi, tiny)
    w_high = kept * hi / np.maximum(hi + lo.sum(-1, keepdims=True) - lo, tiny)
    return np.maximum(p - w_low, w_high - p)


def _to_numpy(x: object) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()  # type: ignore[no-any-return, union-attr]
    return np.asarray(x)


def _sorted_gaps(ids: object, values: object) -> tuple[np.ndarray, np.ndarray]:
    """Per position: ids sorted ascending as gaps (first id, then differences), values reordered to match.

    The order is that of a stable sort, so a sampled selection's padding slots (they repeat the last
    real id, with count 0) stay after that id and get gap 0. One NumPy sort of int64 keys
    ``id << 32 | slot`` per position gives it (distinct keys, so any sort is stable): 2x faster than
    torch's row-wise sort at k = 64. Ids outside [0, 2^31) take torch's stable sort instead.
    """
    ids64 = np.asarray(ids).astype(np.int64, copy=False)  # (..., k)
    width = ids64.shape[-1]
    if ids64.size == 0 or int(ids64.min()) < 0 or int(ids64.max()) >= 1 << 31:
        ids_t = torch.as_tensor(ids64)
        sorted_ids, order = torch.sort(ids_t, dim=-1, stable=True)
        gaps = torch.diff(sorted_ids, dim=-1, prepend=torch.zeros_like(sorted_ids[..., :1]))
        return gaps.numpy(), torch.gather(torch.as_tensor(values), -1, order).numpy()
    keys = (ids64 << 32) | np.arange(width, dtype=np.int64)  # (..., k)
    keys.sort(axis=-1)
    sorted_ids = keys >> 32
    gaps = np.diff(sorted_ids, axis=-1, prepend=np.zeros_like(sorted_ids[..., :1]))
    return gaps, np.take_along_axis(np.asarray(values), keys & 0xFFFFFFFF, -1)


def encode_entries(selection: object, metadata: CacheMetadata) -> EncodedEntries:
    """Encode a :class:`TopkSelection`, :class:`SampledSelection` or :class:`HybridSelection`
    (torch or NumPy fields)."""
    from logitcache.cache.select import HybridSelection, SampledSelection, TopkSelection

    id_dtype = np.dtype(metadata.id_dtype)
    enc = metadata.encoding
    if isinstance(selection, HybridSelection):
        if metadata.mode != "hybrid":
            raise CacheError(
                f"Expected a {'TopkSelection' if metadata.mode == 'topk' else 'SampledSelection'} for a "
                f"cache in mode {metadata.mode!r}. Got a HybridSelection."
            )
        head_ids, head_logp = _sorted_gaps(_to_numpy(selection.head_ids), _to_numpy(selection.head_logprobs))
        head_values = encode_values(head_logp, value_code=enc.value_code, logp_floor=enc.logp_floor)
        tail_ids, counts = _sorted_gaps(  # already ascending; stable keeps padding last
            _to_numpy(selection.tail_ids).astype(np.int64, copy=False),
            _to_numpy(selection.tail_counts).astype(np.int64, copy=False),
        )
        tail = _to_numpy(selection.tail).astype(np.float32)
        return EncodedEntries(
            ids=np.concatenate([head_ids, tail_ids], axis=-1).astype(id_dtype),  # (R, T, k + m)
            values=np.concatenate([head_values.astype(np.uint16), counts.astype(np.uint16)], axis=-1),
            tail=np.clip(tail, 0.0, 1.0),
        )
    if isinstance(selection, TopkSelection):
        if metadata.mode != "topk":
            raise CacheError(
                f"Expected a SampledSelection for a cache in mode {metadata.mode!r}. Got a TopkSelection."
            )
        ids = _to_numpy(selection.ids).astype(np.int64, copy=False)
        logp = _to_numpy(selection.logprobs)
        tail = _to_numpy(selection.tail).astype(np.float32)
        if enc.id_code == "sorted_gaps":
            ids, logp = _sorted_gaps(ids, logp)
        values = encode_values(logp, value_code=enc.value_code, logp_floor=enc.logp_floor)
        return EncodedEntries(ids=ids.astype(id_dtype), values=values, tail=np.clip(tail, 0.0, 1.0))
    if isinstance(selection, SampledSelection):
        if metadata.mode != "sampled":
            raise CacheError(
                f"Expected a TopkSelection for a cache in mode {metadata.mode!r}. Got a SampledSelection."
            )
        ids = _to_numpy(selection.ids).astype(np.int64, copy=False)
        counts = _to_numpy(selection.counts).astype(np.int64, copy=False)
        ids, counts = _sorted_gaps(ids, counts)  # already ascending; stable keeps padding last
        return EncodedEntries(ids=ids.astype(id_dtype), values=counts.astype(np.uint16), tail=None)
    raise CacheError(
        f"Expected a TopkSelection, SampledSelection or HybridSelection. Got {type(selection).__name__}."
    )


def decode_entries(
    ids: np.ndarray,
    values: np.ndarray,
    tail: np.ndarray | None,
    metadata: CacheMetadata,
    *,
    weights: str = "renormalized",
) -> DecodedEntries:
    """Inverse of :func:`encode_entries`: exact ids, weights for the loss.

    ``weights="renormalized"``: per position the weights sum to 1 (tail returned as None).
    ``weights="ghost"``: the weights sum to ``1 - tail`` and the tail is returned (topk mode only).
    Sampled mode: weights = count / n (they sum to 1), tail None.
    Hybrid mode: head weights ``u / sum(u) * (1 - tail)``, tail weights ``tail * count / m``
    (together they sum to 1), tail None; ``"ghost"`` is refused (the drawn ids carry the tail).
    """
    if weights not in ("renormalized", "ghost"):
        raise CacheError(f"Expected weights='renormalized' or 'ghost'. Got {weights!r}.")
    if metadata.mode == "hybrid":
        return _decode_hybrid(ids, values, tail, metadata, weights=weights)
    ids64 = ids.astype(np.int64)
    if metadata.encoding.id_code == "sorted_gaps":
        ids64 = np.cumsum(ids64, axis=-1)
    unnormalized = decode_probs(
        values,
        value_code=metadata.encoding.value_code,
        logp_floor=metadata.encoding.logp_floor,
        num_samples=metadata.num_samples,
    )
    if metadata.mode == "sampled":
        if weights == "ghost":
            raise CacheError(
                "Expected weights='renormalized' for a sampled cache (it has no tail). Got 'ghost'."
            )
        return DecodedEntries(ids=ids64, weights=unnormalized, tail=None)
    if tail is None:
        raise CacheError("Expected a tail array in a topk cache. Got none: the cache is damaged.")
    total = unnormalized.astype(np.float64).sum(axis=-1, keepdims=True)  # (R, T, 1), > 0 for valid data
    scale = 1.0 / np.maximum(total, np.finfo(np.float64).tiny)
    if weights == "ghost":
        scale = scale * (1.0 - tail.astype(np.float64))[..., None]
        return DecodedEntries(
            ids=ids64, weights=(unnormalized * scale).astype(np.float32), tail=tail.astype(np.float32)
        )
    return DecodedEntries(ids=ids64, weights=(unnormalized * scale).astype(np.float32), tail=None)


def split_hybrid(array: np.ndarray, metadata: CacheMetadata) -> tuple[np.ndarray, np.ndarray]:
    """The head slots ``[..., :k]`` and the tail slots ``[..., k:]`` of a hybrid cache's ids or values."""
    return array[..., : metadata.k], array[..., metadata.k :]


def _decode_hybrid(
    ids: np.ndarray, values: np.ndarray, tail: np.ndarray | None, metadata: CacheMetadata, *, weights: str
) -> DecodedEntries:
    """Hybrid mode: each segment (head, tail draws) is sorted gaps of its own; see decode_entries."""
    if weights == "ghost":
        raise CacheError(
            "Expected weights='renormalized' for a hybrid cache (its tail draws carry the tail mass). Got 'ghost'."
        )
    if tail is None:
        raise CacheError("Expected a tail array in a hybrid cache. Got none: the cache is damaged.")
    head_gaps, tail_gaps = split_hybrid(ids.astype(np.int64), metadata)
    head_values, counts = split_hybrid(values, metadata)
    u = decode_probs(
        head_values, value_code=metadata.encoding.value_code, logp_floor=metadata.encoding.logp_floor
    ).astype(np.float64)  # (R, T, k)
    kept = 1.0 - tail.astype(np.float64)[..., None]  # (R, T, 1) exact head mass
    head_w = u * (kept / np.maximum(u.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny))
    tail_w = counts.astype(np.float64) * (tail.astype(np.float64)[..., None] / metadata.num_samples)
    return DecodedEntries(
        ids=np.concatenate([np.cumsum(head_gaps, axis=-1), np.cumsum(tail_gaps, axis=-1)], axis=-1),
        weights=np.concatenate([head_w, tail_w], axis=-1).astype(np.float32),  # (R, T, k + m)
        tail=None,
    )
