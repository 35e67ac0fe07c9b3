"""Fused sparse-KL + cross-entropy loss against cached teacher top-k entries.

What is computed (the plain-PyTorch reference :func:`sparse_kd_loss_reference` is the definition).
For each non-ignored position with student logits ``z`` (V,), target ``y``, teacher ids ``S`` (k,),
teacher probabilities ``w`` (k,) and, in ghost-bucket mode, the tail mass ``r``::

    log_p1   = torch.log_softmax(z, -1)                       # student at T = 1 (for CE)
    log_q    = torch.log_softmax(z / T, -1)                   # student at temperature T
    ce       = -log_p1[y]
    kl       = (torch.xlogy(w, w) - w * log_q[S]).sum()       # sum_j w_j (log w_j - log q_{S_j}), 0 log 0 = 0
    outside  = torch.ones(V, dtype=torch.bool).index_fill_(0, S, False)
    kl      += torch.xlogy(r, r) - r * torch.logsumexp(log_q[outside], -1)   # ghost bucket (tail given)
    loss_pos = ce_weight * ce + kl_weight * T**2 * kl

This is KL(teacher || student), not a soft cross-entropy: it includes the teacher entropy term
``xlogy(w, w)``, so it is 0 when the student matches the teacher on S (and on the bucket).
The student's mass outside S is a masked log-sum-exp over ``v not in S``, never ``1 - sum``.

Other divergences (``divergence=``; ``kl`` above is ``"forward_kl"``, the default). Outcomes: the
present entries of S and, with a tail, the bucket; teacher ``P = cat(w, r)``, student
``Q = cat(q[S], q_out)`` with ``q = softmax(z / T)`` and ``q_out = exp(logsumexp(log_q[outside]))``::

    reverse_kl: D = (Q * (log Q - log(P.clamp(min=1e-8)))).sum()        # KL(student || teacher)
    jsd:        m = beta * P + (1 - beta) * Q                            # beta = jsd_beta in (0, 1)
                D = beta * (xlogy(P, P) - P * log m).sum() + (1 - beta) * (Q * (log Q - log m)).sum()
    tv:         D = 0.5 * (P - Q).abs().sum()
    loss_pos = ce_weight * ce + kl_weight * T**2 * D

Without a tail (renormalised weights): JSD and TV take ``r = 0`` (the teacher has no mass outside
S; the student's mass there is one bucket: the exact full-vocabulary divergence); reverse KL, which
would then be infinite, takes ``Q = q[S] / q[S].sum()`` and no bucket. ``JSD / beta`` tends to the
forward KL as beta -> 0 and, with a tail, ``JSD / (1 - beta)`` to the reverse KL as beta -> 1. The
gradient is ``dD/dz_v = Q_v * (h_v - sum(Q * h)) / T`` with ``h = dD/dQ`` per outcome (``v``
outside S: ``q_v`` and the bucket's ``h``); TV takes the subgradient 0 at ties. Ids must be distinct
for these (padding aside). See docs/kernels.md ("Divergences").

Reductions over positions (ignored positions, ``targets == ignore_index``, contribute nothing):

- ``"mean"`` (default): ``sum(loss_pos) / n_valid`` (0 when every position is ignored, not NaN);
- ``"sum"``: ``sum(loss_pos)``;
- ``"batchmean-compat"``: BabyLlama's scaling, ``ce_weight * sum(ce) / n_valid
  + kl_weight * T**2 * sum(kl) / logits.shape[0]`` (``KLDivLoss(reduction="batchmean")`` divides
  by the leading dim: the batch size for ``(B, T, V)`` logits). See docs/kernels.md.

Gradient with respect to ``z`` (what the Triton kernel writes, :func:`sparse_kd_grad_reference`)::

    g = ce_coef * (softmax(z) - onehot(y))
      + kl_coef / T * (W * q - w_on_S - r * outside * q / q_outside)

with ``q = softmax(z / T)``, ``W = w.sum() + r``, ``w_on_S`` scattering (adding) ``w_j`` at
``S_j``, ``q_outside = q[outside].sum()``, ``ce_coef = ce_weight / ce_divisor`` and
``kl_coef = kl_weight * T**2 / kl_divisor``. This is the exact gradient of the value above with
the weights as given: when weights + tail sum to 1 the first KL term is ``q - p_expanded``.

Conventions:

- ``teacher_weights`` are used as given (no renormalisation); they must be >= 0. Weights + tail
  should sum to 1 per position; if not, the value is still the formula above (a KL only when the
  mass sums to 1) and the gradient is its exact gradient.
- Negative teacher ids are padding: no contribution and not part of S (sampled caches with fewer
  distinct samples than k). Zero-weight entries with a real id contribute 0 to the value but stay in
  S, so they are excluded from the ghost bucket.
- Ids should be duplicate-free. With duplicates, each entry counts separately: the gradient equals
  that of the merged entry (weights added), the value differs from the merged one by the
  z-independent term ``sum xlogy(w_j, w_j) - xlogy(sum w_j, sum w_j)``; S is a set for the bucket.
- Ids must be < V, targets in [0, V) or ``ignore_index``; the torch backend raises
  :class:`~logitcache.kernels.errors.KernelError` otherwise, the Triton path does not check (that
  would need a device sync) and out-of-range values are undefined behaviour there.
"""

from __future__ import annotations

from typing import Unpack

import torch

from logitcache.kernels._common import (
    DIVERGENCES,
    OUT_SHARE_MIN,
    PROB_FLOOR,
    LaunchConfig,
    LossKeywords,
    SparseKDParams,
    check_shapes,
    check_values,
    checked_call,
    divisors,
    launch_config,
    make_params,
    triton_interpreting,
)
from logitcache.kernels._sparse_kd_torch import compute_dtype_of, prepare_teacher, sparse_kd_forward_torch
from logitcache.kernels.errors import KernelError

# ----------------------------------------------------------------------------------------------
# Reference (plain PyTorch, dense): the definition every test and benchmark compares against.
# ----------------------------------------------------------------------------------------------


def _dense_inputs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    params: SparseKDParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    """2-D views of the inputs in the reference's compute dtype:
    (z (N, V), y (N,), safe ids (N, k), present (N, k), w (N, k), valid (N,), dtype)."""
    vocab, k = logits.shape[-1], teacher_ids.shape[-1]
    compute_dtype = compute_dtype_of(logits.dtype)
    z = logits.reshape(-1, vocab).to(compute_dtype)  # (N, V)
    y = targets.reshape(-1)  # (N,)
    ids = teacher_ids.reshape(-1, k).long()  # (N, k)
    present = ids >= 0  # (N, k) negative ids are padding
    w = teacher_weights.reshape(-1, k).to(compute_dtype).masked_fill(~present, 0.0)  # (N, k)
    return z, y, ids.clamp(min=0), present, w, y != params.ignore_index, compute_dtype


def _membership(z: torch.Tensor, safe_ids: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(N, V) bool: v in S. Padding goes to an extra column V that is dropped, so that a padding
    slot never races a real id in the scatter."""
    n_rows, vocab = z.shape
    slots = torch.where(present, safe_ids, vocab)  # (N, k)
    return torch.zeros(n_rows, vocab + 1, dtype=torch.bool, device=z.device).scatter_(1, slots, True)[
        :, :vocab
    ]


def divergence_terms(
    p: torch.Tensor, q: torch.Tensor, log_q: torch.Tensor, on: torch.Tensor, params: SparseKDParams
) -> torch.Tensor:
    """D(p, q) per row (the last dim holds the outcomes), for the non-forward divergences.

    ``p`` teacher probabilities, ``q`` student probabilities and ``log_q`` their logs (..., O);
    outcomes where ``on`` is False count 0. Plain autograd: the definition the backends match.
    """
    if params.divergence == "reverse_kl":
        terms = q * (log_q - torch.log(p.clamp(min=PROB_FLOOR)))
    elif params.divergence == "jsd":
        beta = params.jsd_beta
        log_m = torch.log(beta * p + (1.0 - beta) * q)  # the mixture m = beta p + (1 - beta) q
        terms = beta * (torch.xlogy(p, p) - p * log_m) + (1.0 - beta) * q * (log_q - log_m)
    elif params.divergence == "tv":
        terms = 0.5 * (p - q).abs()  # autograd of abs at a tie: subgradient 0
    else:
        raise ValueError(f"internal: divergence_terms has no {params.divergence!r}")
    return torch.where(on, terms, torch.zeros_like(terms)).sum(dim=-1)


def sparse_kd_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None = None,
    **options: Unpack[LossKeywords],
) -> torch.Tensor:
    """Dense plain-PyTorch sparse-KD loss (see the module docstring). Differentiable by autograd.

    Options: the keywords of :func:`sparse_kd_loss` (``temperature``, ``ce_weight``,
    ``kl_weight``, ``ignore_index``, ``reduction``, ``divergence``, ``jsd_beta``). Computes in
    float64 when the logits are float64, else float32; returns that dtype. (``kl`` below holds
    whichever divergence is chosen.)
    """
    vocab = logits.shape[-1]
    check_shapes(tuple(logits.shape[:-1]), vocab, targets, teacher_ids, teacher_weights, tail)
    params = make_params(logits.shape, **options)
    check_values(vocab, targets, teacher_ids, params.ignore_index)
    z, y, safe_ids, present, w, valid, compute_dtype = _dense_inputs(
        logits, targets, teacher_ids, teacher_weights, params
    )
    temp = params.temperature

    log_p1 = torch.log_softmax(z, dim=-1)  # (N, V)
    ce = -log_p1.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)

    log_q = torch.log_softmax(z / temp, dim=-1)  # (N, V)
    log_q_s = log_q.gather(1, safe_ids)  # (N, k)
    tail = params.bucket_tail(tail, tuple(logits.shape[:-1]), teacher_weights)
    if params.divergence == "forward_kl":
        kl = (torch.xlogy(w, w) - w * log_q_s).sum(dim=1)  # (N,)
    if tail is not None:
        r = tail.reshape(-1).to(compute_dtype)  # (N,)
        in_s = _membership(z, safe_ids, present)  # (N, V)
        has_outside = ~in_s.all(dim=1)  # (N,)
        # masked log-sum-exp over v not in S; rows with nothing outside get a dummy finite row so
        # that autograd stays NaN-free, and their value is fixed below.
        masked = log_q.masked_fill(in_s, float("-inf"))
        masked = torch.where(has_outside.unsqueeze(1), masked, torch.zeros_like(masked))
        log_q_out = torch.logsumexp(masked, dim=1)  # (N,)
        if params.divergence == "forward_kl":
            ghost = torch.xlogy(r, r) - r * log_q_out
            ghost = torch.where(has_outside | (r <= 0), ghost, torch.full_like(ghost, float("inf")))
            kl = kl + ghost
        else:  # outcomes: the k entries and the bucket (student mass 0 when nothing is outside S)
            p_all = torch.cat([w, r.unsqueeze(1)], dim=1)  # (N, k + 1)
            log_q_all = torch.cat([log_q_s, log_q_out.unsqueeze(1)], dim=1)  # (N, k + 1)
            q_all = torch.cat([log_q_s.exp(), torch.where(has_outside, log_q_out.exp(), 0.0).unsqueeze(1)], 1)
            on = torch.cat([present, (has_outside | (r > 0)).unsqueeze(1)], dim=1)  # (N, k + 1)
            kl = divergence_terms(p_all, q_all, log_q_all, on, params)
    elif params.divergence == "reverse_kl":  # no tail: the student restricted to S, renormalised
        lse_s = torch.logsumexp(log_q_s.masked_fill(~present, float("-inf")), dim=1, keepdim=True)  # (N, 1)
        lse_s = torch.where(present.any(dim=1, keepdim=True), lse_s, torch.zeros_like(lse_s))
        log_q_tilde = log_q_s - lse_s  # (N, k)
        kl = divergence_terms(w, log_q_tilde.exp(), log_q_tilde, present, params)

    ce_div, kl_div = divisors(params, valid.sum().to(compute_dtype))
    per_pos = params.ce_weight * ce / ce_div + params.kl_weight * temp**2 * kl / kl_div  # (N,)
    return torch.where(valid, per_pos, torch.zeros_like(per_pos)).sum()


def dense_kd_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    return_parts: bool = False,
    **options: Unpack[LossKeywords],
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same loss with the teacher given at every id (S = the whole vocabulary, no tail).

    ``logits`` and ``teacher_logprobs`` (..., V) (the teacher's log-probabilities at temperature
    T, e.g. live teachers' ensemble), ``targets`` (...). Equal to :func:`sparse_kd_loss_reference`
    with ``teacher_ids = arange(V)`` and ``teacher_weights = teacher_logprobs.exp()``; computed
    without the (N, V) id/weight gather, differentiable by autograd (the online student's loss).
    Every divergence goes through :func:`divergence_terms`, the reference's definition; with S the
    whole vocabulary the student's bucket is empty and reverse KL's restriction to S is the
    identity. ``return_parts``: as in :func:`sparse_kd_loss`.
    """
    vocab = logits.shape[-1]
    if tuple(teacher_logprobs.shape) != tuple(logits.shape):
        raise KernelError(
            f"Expected teacher_logprobs of shape {tuple(logits.shape)} (same as logits). "
            f"Got {tuple(teacher_logprobs.shape)}."
        )
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise KernelError(
            f"Expected targets of shape {tuple(logits.shape[:-1])}. Got {tuple(targets.shape)}."
        )
    params = make_params(logits.shape, **options)
    compute_dtype = compute_dtype_of(logits.dtype)
    z = logits.reshape(-1, vocab).to(compute_dtype)  # (N, V)
    y = targets.reshape(-1)  # (N,)
    valid = y != params.ignore_index  # (N,)
    log_p1 = torch.log_softmax(z, dim=-1)  # (N, V)
    ce = -log_p1.gather(1, y.clamp(min=0).long().unsqueeze(1)).squeeze(1)  # (N,)
    log_q = log_p1 if params.temperature == 1.0 else torch.log_softmax(z / params.temperature, dim=-1)
    log_p = teacher_logprobs.reshape(-1, vocab).to(compute_dtype)  # (N, V)
    p = log_p.exp()
    if params.divergence == "forward_kl":
        kl = (torch.xlogy(p, p) - p * log_q).sum(dim=1)  # (N,)
    else:  # S = the vocabulary: no bucket (JSD/TV's would hold 0 for both), q restricted to S = q
        kl = divergence_terms(p, log_q.exp(), log_q, torch.ones_like(p, dtype=torch.bool), params)
    ce_div, kl_div = divisors(params, valid.sum().to(compute_dtype))
    per_pos = params.ce_weight * ce / ce_div + params.kl_weight * params.temperature**2 * kl / kl_div
    loss = torch.where(valid, per_pos, torch.zeros_like(per_pos)).sum()
    if not return_parts:
        return loss
    row_parts = torch.where(valid.unsqueeze(1), torch.stack([ce, kl], dim=1), 0.0)  # (N, 2)
    return loss, mean_parts(row_parts, valid.sum())


def sparse_kd_grad_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None = None,
    **options: Unpack[LossKeywords],
) -> torch.Tensor:
    """Closed-form d loss / d logits (the formula the Triton kernel writes), in the reference's dtype.

    Tests check it against autograd of :func:`sparse_kd_loss_reference`. Forward KL only (the
    other divergences' closed forms are in ``_sparse_kd_torch.py``, checked against autograd).
    """
    params = make_params(logits.shape, **options)
    if params.divergence != "forward_kl":
        raise KernelError(
            f"Expected divergence='forward_kl' for the closed-form reference gradient. Got "
            f"{params.divergence!r}: use autograd of sparse_kd_loss_reference."
        )
    z, y, safe_ids, present, w, valid, compute_dtype = _dense_inputs(
        logits, targets, teacher_ids, teacher_weights, params
    )
    temp = params.temperature

    p1 = torch.softmax(z, dim=-1)  # (N, V)
    q = torch.softmax(z / temp, dim=-1)  # (N, V)
    onehot = torch.zeros_like(z).scatter_(1, y.clamp(min=0).unsqueeze(1), 1.0)
    w_on_s = torch.zeros_like(z).scatter_add_(1, safe_ids, w)  # (N, V) duplicates add up
    total = w.sum(dim=1)  # (N,)
    kl_grad = total.unsqueeze(1) * q - w_on_s
    if tail is not None:
        r = tail.reshape(-1).to(compute_dtype)
        outside = ~_membership(z, safe_ids, present)  # (N, V)
        q_out = (q * outside).sum(dim=1, keepdim=True)  # masked sum, (N, 1)
        ghost = torch.where(outside, q / q_out.clamp(min=torch.finfo(compute_dtype).tiny), 0.0)
        kl_grad = kl_grad + r.unsqueeze(1) * (q - ghost)
    ce_div, kl_div = divisors(params, valid.sum().to(compute_dtype))
    grad = params.ce_weight / ce_div * (p1 - onehot) + params.kl_weight * temp / kl_div * kl_grad
    grad = torch.where(valid.unsqueeze(1), grad, torch.zeros_like(grad))
    return grad.reshape(logits.shape)


# ----------------------------------------------------------------------------------------------
# Triton path: the kernel (one program per row, loss and gradient in one launch) is in
# _sparse_kd_triton.py; this is its launcher.
# ----------------------------------------------------------------------------------------------


def _fwd_kernel():
    """The Triton kernel, imported on first use.

    Triton is imported lazily (it lives in ``_sparse_kd_triton.py`` for that reason): the CPU
    interpreter is chosen when triton is first imported, so importing logitcache.kernels must not
    import triton before a test sets TRITON_INTERPRET=1.
    """
    from logitcache.kernels._sparse_kd_triton import sparse_kd_fwd_kernel

    if triton_interpreting() and type(sparse_kd_fwd_kernel).__name__ != "InterpretedFunction":
        raise KernelError(
            "Expected TRITON_INTERPRET=1 to be set before triton is first imported. Got triton "
            "imported without it. Set the variable at the start of the process."
        )
    return sparse_kd_fwd_kernel


def sparse_kd_forward_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None,
    params: SparseKDParams,
    *,
    grad_out: torch.Tensor,
    n_valid: torch.Tensor | None = None,
    block_v: int | None = None,
    ids_sorted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on 2-D inputs; writes d loss / d logits into ``grad_out`` (may be ``logits``).

    Returns the per-row losses (N,) in fp32, already scaled by the reduction (their sum is the
    loss), and the per-row parts (N, 2) fp32: CE and the divergence, unweighted (0 when ignored).
    ``tail`` as given (JSD / TV replace a missing one: :meth:`SparseKDParams.bucket_tail`).
    ``n_valid`` (device int scalar) is the number of non-ignored positions of the whole batch (the
    fused-linear variant passes the global count while launching per chunk). ``ids_sorted``: the
    caller already sorted each row's ids ascending (needed with a tail).
    """
    n_rows, vocab = logits.shape
    k = teacher_ids.shape[1]
    tail = params.bucket_tail(tail, (n_rows,), teacher_weights)
    if logits.stride(1) != 1 or grad_out.stride(1) != 1:
        raise ValueError("internal: logits and grad_out need a contiguous last dim")
    if tail is not None and not ids_sorted:
        # sorted ids let the kernel find the ids of each vocab chunk as a contiguous range
        teacher_ids, order = torch.sort(teacher_ids, dim=1)
        teacher_weights = teacher_weights.gather(1, order)
    teacher_ids = teacher_ids.contiguous()
    teacher_weights = teacher_weights.contiguous()
    if n_valid is None:
        n_valid = (targets != params.ignore_index).sum()
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)  # (N,)
    row_parts = torch.empty((n_rows, 2), dtype=torch.float32, device=logits.device)  # (N, 2)
    if n_rows == 0:
        return row_loss, row_parts
    config: LaunchConfig = launch_config(vocab, k, block_v=block_v)
    reduction = params.reduction
    _fwd_kernel()[(n_rows,)](
        logits,
        grad_out,
        targets.contiguous(),
        teacher_ids,
        teacher_weights,
        tail.contiguous() if tail is not None else row_loss,
        n_valid,
        row_loss,
        row_parts,
        logits.stride(0),
        grad_out.stride(0),
        teacher_ids.stride(0),
        teacher_weights.stride(0),
        vocab,
        k,
        1.0 / params.temperature,
        params.ce_weight,
        params.kl_weight * params.temperature**2,
        float(params.kl_batch_div if reduction == "batchmean-compat" else 1),
        params.ignore_index,
        params.jsd_beta,
        CE_BY_VALID=reduction in ("mean", "batchmean-compat"),
        KL_BY_VALID=reduction == "mean",
        HAS_TAIL=tail is not None,
        TEMP_IS_ONE=params.temperature == 1.0,
        DIVERGENCE=DIVERGENCES.index(params.divergence),
        BLOCK_V=config.block_v,
        BLOCK_T=config.block_t,
        K_PAD=config.k_pad,
        OUT_SHARE_MIN=OUT_SHARE_MIN,
        num_warps=config.num_warps,
    )
    return row_loss, row_parts


# ----------------------------------------------------------------------------------------------
# Closed-form torch backend (CPU): the math is in _sparse_kd_torch.py; this is its launcher.
# ----------------------------------------------------------------------------------------------


def sparse_kd_forward_chunked(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None,
    params: SparseKDParams,
    *,
    grad_out: torch.Tensor,
    rows_per_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend on 2-D inputs: per-row losses (N,) and parts (N, 2), d loss / d logits
    written into ``grad_out``."""
    tail = params.bucket_tail(tail, tuple(targets.shape), teacher_weights)
    teacher = prepare_teacher(teacher_ids, teacher_weights, tail, compute_dtype_of(logits.dtype))
    n_valid = (targets != params.ignore_index).sum()
    return sparse_kd_forward_torch(
        logits, targets, teacher, params, grad_out=grad_out, n_valid=n_valid, rows_per_chunk=rows_per_chunk
    )


# ----------------------------------------------------------------------------------------------
# Autograd: one functional custom op for both backends (torch.compile sees no graph break) whose
# forward returns the loss and the already-scaled gradient; backward multiplies by grad_output.
# ----------------------------------------------------------------------------------------------


def loss_dtype(backend: str, logits_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the returned loss: fp32 from the Triton kernel; the compute dtype on torch."""
    return torch.float32 if backend == "triton" else compute_dtype_of(logits_dtype)


def mean_parts(row_parts: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """(2,) fp32, detached: the mean CE and the mean divergence per non-ignored position."""
    return (row_parts.detach().sum(dim=0) / n_valid.clamp(min=1)).float()


@torch.library.custom_op("logitcache::sparse_kd_loss", mutates_args=())
def _sparse_kd_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None,
    temperature: float,
    ce_weight: float,
    kl_weight: float,
    ignore_index: int,
    reduction: str,
    kl_batch_div: int,
    divergence: str,
    jsd_beta: float,
    block_v: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d logits, parts (2,)): the parts are the mean CE and divergence (logged)."""
    params = SparseKDParams(
        temperature, ce_weight, kl_weight, ignore_index, reduction, kl_batch_div, divergence, jsd_beta
    )
    grad = torch.empty_like(logits)
    if backend == "triton":
        row_loss, row_parts = sparse_kd_forward_triton(
            logits,
            targets,
            teacher_ids,
            teacher_weights,
            tail,
            params,
            grad_out=grad,
            block_v=block_v if block_v > 0 else None,
        )
    else:
        row_loss, row_parts = sparse_kd_forward_chunked(
            logits, targets, teacher_ids, teacher_weights, tail, params, grad_out=grad
        )
    return row_loss.sum(), grad, mean_parts(row_parts, (targets != ignore_index).sum())


@_sparse_kd_op.register_fake
def _sparse_kd_op_fake(logits, targets, teacher_ids, teacher_weights, tail, *args):  # noqa: ANN001
    backend = args[-1]
    loss = logits.new_empty((), dtype=loss_dtype(backend, logits.dtype))
    return loss, torch.empty_like(logits), logits.new_empty((2,), dtype=torch.float32)


def _sparse_kd_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(output[1])


def _sparse_kd_backward(ctx, grad_loss, _grad_of_grad, _grad_of_parts):  # noqa: ANN001
    (grad_logits,) = ctx.saved_tensors
    scaled = grad_logits * grad_loss.to(grad_logits.dtype)
    return (scaled,) + (None,) * 14


_sparse_kd_op.register_autograd(_sparse_kd_backward, setup_context=_sparse_kd_setup_context)


class _SparseKDInplace(torch.autograd.Function):
    """Eager-only Triton variant that writes the gradient into the logits buffer (no N x V allocation).

    The caller's logits tensor holds the gradient afterwards; backward scales it in place, so
    the graph cannot be replayed (no ``retain_graph``). Returns (loss, parts) like the op.
    """

    @staticmethod
    def forward(ctx, logits, targets, teacher_ids, teacher_weights, tail, params, block_v):  # noqa: ANN001
        row_loss, row_parts = sparse_kd_forward_triton(
            logits,
            targets,
            teacher_ids,
            teacher_weights,
            tail,
            params,
            grad_out=logits,
            block_v=block_v,
        )
        ctx.save_for_backward(logits)
        parts = mean_parts(row_parts, (targets != params.ignore_index).sum())
        ctx.mark_non_differentiable(parts)
        return row_loss.sum(), parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):  # noqa: ANN001
        (grad_logits,) = ctx.saved_tensors
        # Skipping the scale when grad_loss == 1 (the usual loss.backward()) saves a read and a
        # write of N x V; the check syncs on one scalar, acceptable in this eager-only path.
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad_logits.mul_(grad_loss.to(grad_logits.dtype))
        return grad_logits, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def sparse_kd_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.5,
    kl_weight: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    backend: str = "auto",
    inplace_grad: bool = False,
    block_v: int | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse-KD loss ``ce_weight * CE + kl_weight * T**2 * D(teacher, student)`` (module docstring;
    D = KL(teacher || student) by default, ``divergence`` picks another).

    Shapes: ``logits`` (..., V); ``targets`` (...); ``teacher_ids``/``teacher_weights`` (..., k)
    (ids of any integer dtype, e.g. int32 as the cache reader gives them); ``tail`` (...) or None.
    Returns a scalar: fp32 on the Triton path; on the torch path float64 for float64 logits, else
    float32. ``backend``: "auto" | "triton" | "torch" (see logitcache.kernels._common); "torch" is
    the closed-form chunked backend (loss and gradient in one pass, no N x V temporaries), not the
    reference. ``inplace_grad=True`` (Triton, eager only; ignored by the torch backend) stores the
    gradient in the logits buffer, saving one N x V allocation; the logits' contents are destroyed.
    ``block_v`` overrides the Triton chunk width. ``return_parts=True`` returns ``(loss, parts)``:
    ``parts`` (2,) fp32, detached, the mean CE and the mean divergence D per non-ignored position,
    unweighted (computed by the same pass; with ``reduction="mean"``,
    ``loss = ce_weight * parts[0] + kl_weight * T**2 * parts[1]``).
    """
    vocab = logits.shape[-1]
    params, chosen = checked_call(
        logits.shape,
        vocab,
        logits.device,
        targets,
        teacher_ids,
        teacher_weights,
        tail,
        backend,
        temperature=temperature,
        ce_weight=ce_weight,
        kl_weight=kl_weight,
        ignore_index=ignore_index,
        reduction=reduction,
        divergence=divergence,
        jsd_beta=jsd_beta,
    )
    k = teacher_ids.shape[-1]
    logits_2d = logits.reshape(-1, vocab)  # (N, V)
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    targets_1d = targets.reshape(-1)  # (N,)
    ids_2d = teacher_ids.reshape(-1, k)  # (N, k)
    weights_2d = teacher_weights.reshape(-1, k)  # (N, k)
    tail_1d = tail.reshape(-1) if tail is not None else None  # (N,)
    if chosen == "triton" and inplace_grad and not torch.compiler.is_compiling():
        loss, parts = _SparseKDInplace.apply(
            logits_2d, targets_1d, ids_2d, weights_2d, tail_1d, params, block_v
        )
        return (loss, parts.detach()) if return_parts else loss
    loss, _, parts = _sparse_kd_op(
        logits_2d,
        targets_1d,
        ids_2d,
        weights_2d,
        tail_1d,
        *params.op_args(),
        int(block_v or 0),
        chosen,
    )
    return (loss, parts.detach()) if return_parts else loss
