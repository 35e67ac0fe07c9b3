"""Helpers shared by the sparse-KD kernels: options, input validation, backend choice, launch config.

Backend rule (one dispatch point, :func:`resolve_backend`):

1. an explicit ``backend="triton"`` or ``backend="torch"`` keyword wins;
2. otherwise the environment variable ``LOGITCACHE_KERNEL_BACKEND`` (``auto``/``triton``/``torch``);
3. otherwise ``auto``: Triton when the logits live on CUDA and Triton imports, the closed-form
   chunked torch backend everywhere else (CPU training).

``backend="triton"`` on CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (the interpreter
that CI uses); anything else is a :class:`~logitcache.kernels.errors.KernelError`.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, replace
from typing import Final, TypedDict, Unpack

import torch

from logitcache.kernels.errors import KernelError

BACKENDS: Final = ("auto", "triton", "torch")
REDUCTIONS: Final = ("mean", "sum", "batchmean-compat")
# The divergence between the teacher's and the student's distribution over the sparse support
# (formulas in logitcache.kernels.sparse_kd). Their index is the Triton kernel's DIVERGENCE constexpr.
DIVERGENCES: Final = ("forward_kl", "reverse_kl", "jsd", "tv")
# Reverse KL takes log(max(p, PROB_FLOOR)) of the teacher: a cached weight of exactly 0 (a value
# quantised to 0, e.g. p < p_max / 2046 with ratio_q10) would otherwise make the loss infinite.
PROB_FLOOR: Final = 1e-8
BACKEND_ENV_VAR: Final = "LOGITCACHE_KERNEL_BACKEND"


@dataclass(frozen=True)
class SparseKDParams:
    """Options of the sparse-KD loss: validated once here, passed as one object to every backend.

    ``loss_pos = ce_weight * CE + kl_weight * T**2 * KL`` (see :mod:`logitcache.kernels.sparse_kd`);
    ``reduction`` in :data:`REDUCTIONS`; targets equal to ``ignore_index`` contribute nothing.
    ``kl_batch_div`` is the divisor of the KL sum in ``reduction="batchmean-compat"``: the leading
    dimension of the logits as the caller gave them (``B`` for ``(B, T, V)``, ``N`` for ``(N, V)``),
    exactly what ``torch.nn.KLDivLoss(reduction="batchmean")`` divides by; the public functions set
    it from the shape (:meth:`for_shape`). ``divergence`` in :data:`DIVERGENCES` replaces the KL
    term (the name ``kl_weight`` stays: it weighs whichever divergence); ``jsd_beta`` in (0, 1) is
    the teacher's share of the JSD mixture (used only by ``divergence="jsd"``).
    """

    temperature: float = 1.0
    ce_weight: float = 0.5
    kl_weight: float = 0.5
    ignore_index: int = -100
    reduction: str = "mean"
    kl_batch_div: int = 1
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise KernelError(
                f"Expected divergence in {DIVERGENCES}. Got {self.divergence!r}. Pick one of those."
            )
        if not (0.0 < float(self.jsd_beta) < 1.0):
            raise KernelError(
                f"Expected jsd_beta in (0, 1). Got {self.jsd_beta!r}. JSD vanishes at 0 and 1: use "
                "divergence='forward_kl' or 'reverse_kl' for those limits."
            )
        if self.reduction not in REDUCTIONS:
            raise KernelError(
                f"Expected reduction in {REDUCTIONS}. Got {self.reduction!r}. Pick one of those."
            )
        if not (float(self.temperature) > 0.0) or math.isinf(float(self.temperature)):
            raise KernelError(f"Expected temperature > 0. Got {self.temperature!r}. Use e.g. 1.0 or 2.0.")
        for name in ("ce_weight", "kl_weight"):
            value = float(getattr(self, name))
            if not (value >= 0.0) or math.isinf(value):
                raise KernelError(f"Expected {name} >= 0 and finite. Got {value!r}.")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "ce_weight", float(self.ce_weight))
        object.__setattr__(self, "kl_weight", float(self.kl_weight))
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        object.__setattr__(self, "kl_batch_div", max(int(self.kl_batch_div), 1))
        object.__setattr__(self, "jsd_beta", float(self.jsd_beta))

    @classmethod
    def from_alpha(
        cls,
        alpha: float,
        *,
        temperature: float = 1.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
    ) -> SparseKDParams:
        """``(1 - alpha) * CE + alpha * T**2 * D``: the usual distillation mix (alpha = 0: CE only)."""
        if not (0.0 <= float(alpha) <= 1.0):
            raise KernelError(f"Expected alpha in [0, 1]. Got {alpha!r}.")
        return cls(
            temperature=temperature,
            ce_weight=1.0 - float(alpha),
            kl_weight=float(alpha),
            ignore_index=ignore_index,
            reduction=reduction,
            divergence=divergence,
            jsd_beta=jsd_beta,
        )

    def for_shape(self, logits_shape: torch.Size | tuple[int, ...]) -> SparseKDParams:
        """These options with ``kl_batch_div`` set from the caller's logits (or hidden) shape."""
        div = max(int(logits_shape[0]), 1) if len(logits_shape) > 1 else 1
        return self if div == self.kl_batch_div else replace(self, kl_batch_div=div)

    def op_args(self) -> tuple[float, float, float, int, str, int, str, float]:
        """The fields in declaration order: how the options cross a ``torch.library.custom_op``
        boundary (which takes no dataclasses); ``SparseKDParams(*op_args)`` rebuilds them."""
        return (
            self.temperature,
            self.ce_weight,
            self.kl_weight,
            self.ignore_index,
            self.reduction,
            self.kl_batch_div,
            self.divergence,
            self.jsd_beta,
        )

    def keywords(self) -> dict[str, float | int | str]:
        """The public keyword arguments of the loss functions (everything but ``kl_batch_div``)."""
        return {
            "temperature": self.temperature,
            "ce_weight": self.ce_weight,
            "kl_weight": self.kl_weight,
            "ignore_index": self.ignore_index,
            "reduction": self.reduction,
            "divergence": self.divergence,
            "jsd_beta": self.jsd_beta,
        }

    def bucket_tail(
        self, tail: torch.Tensor | None, lead: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor | None:
        """The tail the divergence is computed with: as given, except JSD and TV without a tail
        (renormalised weights), which use a tail of 0: the teacher puts no mass outside S, and the
        student's mass outside S is one bucket (the exact full-vocabulary JSD / TV against that
        teacher). Forward KL with a tail of 0 equals forward KL without one; reverse KL without a
        tail restricts the student to S instead (it would be infinite)."""
        if tail is not None or self.divergence not in ("jsd", "tv"):
            return tail
        return torch.zeros(
            lead, dtype=like.dtype if like.dtype.is_floating_point else torch.float32, device=like.device
        )


class LossKeywords(TypedDict, total=False):
    """The public keyword options of every loss function (the fields of :class:`SparseKDParams`)."""

    temperature: float
    ce_weight: float
    kl_weight: float
    ignore_index: int
    reduction: str
    divergence: str
    jsd_beta: float


def make_params(
    logits_shape: torch.Size | tuple[int, ...], **options: Unpack[LossKeywords]
) -> SparseKDParams:
    """Validated options from the public keywords (defaults as in :class:`SparseKDParams`),
    ``kl_batch_div`` from the logits (or hidden) shape."""
    unknown = set(options) - set(LossKeywords.__annotations__)
    if unknown:
        raise KernelError(
            f"Unknown loss option(s) {sorted(unknown)}. Expected some of {list(LossKeywords.__annotations__)}."
        )
    return SparseKDParams(**options).for_shape(logits_shape)  # type: ignore[arg-type]


def divisors(params: SparseKDParams, n_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce_divisor, kl_divisor) for the reduction; n_valid is clamped to 1 (mean of nothing = 0)."""
    n = n_valid.clamp(min=1)
    one = torch.ones_like(n)
    if params.reduction == "mean":
        return n, n
    if params.reduction == "sum":
        return one, one
    return n, one * params.kl_batch_div  # batchmean-compat


def check_shapes(
    lead: tuple[int, ...],
    vocab: int,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None,
) -> None:
    """Shape and dtype checks (no device sync). ``lead`` is the logits shape without the vocab dim."""
    if vocab < 1:
        raise KernelError(f"Expected a vocabulary dimension >= 1. Got logits with last dim {vocab}.")
    if tuple(targets.shape) != lead:
        raise KernelError(
            f"Expected targets of shape {lead} (logits without the vocab dim). Got {tuple(targets.shape)}."
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise KernelError(f"Expected integer targets. Got dtype {targets.dtype}. Cast with .long().")
    if teacher_ids.dim() != len(lead) + 1 or tuple(teacher_ids.shape[:-1]) != lead:
        raise KernelError(
            f"Expected teacher_ids of shape {lead + ('k',)}. Got {tuple(teacher_ids.shape)}. "
            "Check that the cache slice matches the batch."
        )
    if teacher_ids.shape[-1] < 1:
        raise KernelError("Expected at least one teacher entry per position (k >= 1). Got k = 0.")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype == torch.bool:
        raise KernelError(f"Expected integer teacher_ids. Got dtype {teacher_ids.dtype}.")
    if tuple(teacher_weights.shape) != tuple(teacher_ids.shape):
        raise KernelError(
            f"Expected teacher_weights of shape {tuple(teacher_ids.shape)} (same as teacher_ids). "
            f"Got {tuple(teacher_weights.shape)}."
        )
    if not teacher_weights.dtype.is_floating_point:
        raise KernelError(f"Expected floating teacher_weights. Got dtype {teacher_weights.dtype}.")
    if tail is not None:
        if tuple(tail.shape) != lead:
            raise KernelError(f"Expected tail of shape {lead}. Got {tuple(tail.shape)}.")
        if not tail.dtype.is_floating_point:
            raise KernelError(f"Expected a floating tail. Got dtype {tail.dtype}.")


def check_values(vocab: int, targets: torch.Tensor, teacher_ids: torch.Tensor, ignore_index: int) -> None:
    """Range checks that need a device sync: run on the torch backend only, and never while compiling."""
    if torch.compiler.is_compiling():
        return
    bad_target = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad_target.any()):
        value = int(targets[bad_target][0])
        raise KernelError(
            f"Expected targets in [0, {vocab}) or ignore_index={ignore_index}. Got {value}. "
            "Check the tokenizer/vocab size of the student."
        )
    if bool((teacher_ids >= vocab).any()):
        value = int(teacher_ids.max())
        raise KernelError(
            f"Expected teacher ids < vocab size {vocab} (negative ids mean padding). Got {value}. "
            "The cache was written for a different vocabulary."
        )


# find_spec does not import triton (the interpreter choice happens at its first import)
_TRITON_INSTALLED: Final = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(requested: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` following the rule in the module docstring."""
    if requested not in BACKENDS:
        raise KernelError(f"Expected backend in {BACKENDS}. Got {requested!r}.")
    choice = requested
    if choice == "auto":
        choice = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
        if choice not in BACKENDS:
            raise KernelError(
                f"Expected {BACKEND_ENV_VAR} in {BACKENDS}. Got {choice!r}. Unset it or fix its value."
            )
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise KernelError(
                "Expected Triton to be importable for backend='triton'. Got ImportError. "
                "Install triton or use backend='torch'."
            )
        if device.type != "cuda" and not triton_interpreting():
            raise KernelError(
                f"Expected CUDA tensors for backend='triton' (or TRITON_INTERPRET=1). Got device {device}. "
                "Use backend='torch' on CPU."
            )
    return choice


def checked_call(
    shape: torch.Size | tuple[int, ...],
    vocab: int,
    device: torch.device,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None,
    backend: str,
    **options: Unpack[LossKeywords],
) -> tuple[SparseKDParams, str]:
    """A public loss call's checks in one place: the inputs' shapes against ``shape`` (the logits',
    (..., V), or the hidden states', (..., H)) and ``vocab``, the loss options, the backend for
    ``device``, and on the torch backend the ids' values (Triton checks them in the kernel, without
    a device sync). Returns ``(params, backend)``."""
    check_shapes(tuple(shape[:-1]), vocab, targets, teacher_ids, teacher_weights, tail)
    params = make_params(shape, **options)
    chosen = resolve_backend(backend, device)
    if chosen == "torch":
        check_values(vocab, targets, teacher_ids, params.ignore_index)
    return params, chosen


def next_power_of_2(value: int) -> int:
    return 1 << max(int(value) - 1, 0).bit_length()


# With a tail, a row's outside sum is its whole sum minus S's unless S holds more than 1 - this of
# the row's mass at T (the difference would cancel): such rows sum the outside directly.
OUT_SHARE_MIN = 1.0 / 16.0


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int
    block_t: int
    k_pad: int
    num_warps: int


def launch_config(vocab: int, k: int, *, block_v: int | None = None) -> LaunchConfig:
    """Fixed block sizes per V (no autotuning; see docs/kernels.md for why).

    One program handles one row. BLOCK_V covers up to 16384 vocab entries, so a row of V <= 16384
    is one chunk: pass 2 re-reads it from L2 right after pass 1, and DRAM sees one read and one
    write. Larger V streams in 16384-wide chunks (like Liger's cross-entropy kernel). With a tail
    (ghost bucket), the rare rows whose outside sum is taken directly (``OUT_SHARE_MIN``) test
    membership in S per chunk of BLOCK_T <= 2048 against the ids that fall in the chunk (sorted),
    which costs k * BLOCK_T compares per such row. num_warps keeps ~16 fp32 values per thread per
    live chunk tensor.
    """
    if block_v is None:
        block_v = min(next_power_of_2(vocab), 16384)
    if block_v & (block_v - 1):
        raise KernelError(f"Expected block_v to be a power of two. Got {block_v}.")
    num_warps = max(1, min(32, block_v // 512))
    return LaunchConfig(
        block_v=block_v, block_t=min(block_v, 2048), k_pad=max(next_power_of_2(k), 2), num_warps=num_warps
    )
