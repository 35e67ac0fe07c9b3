"""Fused output projection + sparse-KD loss: the N x V logits never exist at once.

What is computed (reference :func:`fused_linear_sparse_kd_loss_reference`)::

    logits = hidden @ weight.T                                   # (N, V)
    loss   = sparse_kd_loss_reference(logits, targets, teacher_ids, teacher_weights, tail, ...)

with gradients for ``hidden`` (N, H) and ``weight`` (V, H). The Triton path walks the positions in
chunks of C rows: ``logits_c = hidden_c @ weight.T`` (C, V) in the hidden dtype (fp32 accumulate
inside the matmul), the sparse-KD kernel overwrites ``logits_c`` with d loss / d logits_c in place,
then ``grad_hidden_c = grad_logits_c @ weight`` and ``grad_weight += grad_logits_c.T @ hidden_c``.
All gradients are computed in the forward (the only time the logits exist); backward scales them
by grad_output. Extra memory: one (C, V) buffer plus the (N,) row losses. ``grad_weight`` is
accumulated in the weight's dtype (as Liger's fused-linear CE does); pass fp32 weights for fp32
accumulation.

The chunk size default follows the same rule as Liger-Kernel: C = next_pow2(ceil(N / ceil(V / H))),
which makes the (C, V) buffer about the size of ``hidden``; clamped to [1, N].
"""

from __future__ import annotations

import math
from typing import Unpack

import torch

from logitcache.kernels._common import (
    LossKeywords,
    SparseKDParams,
    checked_call,
    next_power_of_2,
)
from logitcache.kernels._sparse_kd_torch import (
    compute_dtype_of,
    default_rows_per_chunk,
    prepare_teacher,
    sparse_kd_forward_torch,
)
from logitcache.kernels.errors import KernelError
from logitcache.kernels.sparse_kd import (
    loss_dtype,
    mean_parts,
    sparse_kd_forward_triton,
    sparse_kd_loss_reference,
)


def fused_linear_sparse_kd_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None = None,
    **options: Unpack[LossKeywords],
) -> torch.Tensor:
    """Dense reference: materialises ``hidden @ weight.T`` and calls the sparse-KD reference."""
    logits = hidden @ weight.t()  # (..., V)
    return sparse_kd_loss_reference(logits, targets, teacher_ids, teacher_weights, tail, **options)


def default_chunk_size(n_rows: int, hidden_size: int, vocab: int, backend: str = "triton") -> int:
    """Rows per chunk: Liger's rule (the (C, V) buffer about the size of ``hidden``) on the GPU; on
    the torch backend at least enough rows for a chunk of ~2**21 logits, so that the per-chunk op
    overhead stays small next to the matmuls."""
    growth = max(math.ceil(vocab / max(hidden_size, 1)), 1)
    rows = next_power_of_2(math.ceil(n_rows / growth))
    if backend == "torch":
        rows = max(rows, default_rows_per_chunk(vocab))
    return max(1, min(rows, max(n_rows, 1)))


def fused_linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None,
    params: SparseKDParams,
    *,
    backend: str,
    chunk_size: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight) for 2-D ``hidden`` (N, H); gradients already scaled.

    One loop for both backends: per chunk of rows, logits by one matmul into a reused (C, V)
    buffer, the backend's forward overwrites it with d loss / d logits, two matmuls give the
    chunk's share of both gradients.
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    chunk = chunk_size or default_chunk_size(n_rows, hidden_size, vocab, backend)
    grad_hidden = torch.empty_like(hidden)  # (N, H)
    grad_weight = torch.zeros_like(weight)  # (V, H)
    row_loss = torch.zeros(n_rows, dtype=loss_dtype(backend, hidden.dtype), device=hidden.device)  # (N,)
    row_parts = torch.zeros((n_rows, 2), dtype=row_loss.dtype, device=hidden.device)  # (N, 2) CE, D
    tail = params.bucket_tail(tail, (n_rows,), teacher_weights)
    n_valid = (targets != params.ignore_index).sum()  # device scalar: no host sync
    logits_buffer = hidden.new_empty((min(chunk, n_rows), vocab))  # (C, V) reused per chunk
    teacher = None
    if backend == "torch":
        teacher = prepare_teacher(teacher_ids, teacher_weights, tail, compute_dtype_of(hidden.dtype))
    elif tail is not None:
        # sort once for all chunks (the launcher would otherwise sort each chunk)
        teacher_ids, order = torch.sort(teacher_ids, dim=1)
        teacher_weights = teacher_weights.gather(1, order)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        hidden_chunk = hidden[start:stop]  # (c, H)
        logits_chunk = logits_buffer[: stop - start]  # (c, V)
        torch.mm(hidden_chunk, weight.t(), out=logits_chunk)
        if teacher is not None:
            row_loss[start:stop], row_parts[start:stop] = sparse_kd_forward_torch(
                logits_chunk,
                targets[start:stop],
                teacher,
                params,
                grad_out=logits_chunk,  # in place: logits_chunk now holds d loss / d logits_chunk
                n_valid=n_valid,
                logits_rows=lambda rows, h=hidden_chunk: h[rows] @ weight.t(),
                rows_offset=start,
                rows_per_chunk=stop - start,
            )
        else:
            row_loss[start:stop], row_parts[start:stop] = sparse_kd_forward_triton(
                logits_chunk,
                targets[start:stop],
                teacher_ids[start:stop],
                teacher_weights[start:stop],
                tail[start:stop] if tail is not None else None,
                params,
                grad_out=logits_chunk,  # in place: logits_chunk now holds d loss / d logits_chunk
                n_valid=n_valid,
                block_v=block_v,
                ids_sorted=True,
            )
        torch.mm(logits_chunk, weight, out=grad_hidden[start:stop])
        grad_weight.addmm_(logits_chunk.t(), hidden_chunk)
    return row_loss.sum(), grad_hidden, grad_weight, mean_parts(row_parts, n_valid)


@torch.library.custom_op("logitcache::fused_linear_sparse_kd_loss", mutates_args=())
def _fused_linear_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    chunk_size: int,
    block_v: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    params = SparseKDParams(
        temperature, ce_weight, kl_weight, ignore_index, reduction, kl_batch_div, divergence, jsd_beta
    )
    return fused_linear_forward(
        hidden,
        weight,
        targets,
        teacher_ids,
        teacher_weights,
        tail,
        params,
        backend=backend,
        chunk_size=chunk_size if chunk_size > 0 else None,
        block_v=block_v if block_v > 0 else None,
    )


@_fused_linear_op.register_fake
def _fused_linear_op_fake(hidden, weight, *args):  # noqa: ANN001
    loss = hidden.new_empty((), dtype=loss_dtype(args[-1], hidden.dtype))
    parts = hidden.new_empty((2,), dtype=torch.float32)
    return loss, torch.empty_like(hidden), torch.empty_like(weight), parts


def _fused_linear_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(output[1], output[2])


def _fused_linear_backward(ctx, grad_loss, _grad_grad_hidden, _grad_grad_weight, _grad_parts):  # noqa: ANN001
    grad_hidden, grad_weight = ctx.saved_tensors
    return (
        grad_hidden * grad_loss.to(grad_hidden.dtype),
        grad_weight * grad_loss.to(grad_weight.dtype),
    ) + (None,) * 15


_fused_linear_op.register_autograd(_fused_linear_backward, setup_context=_fused_linear_setup_context)


def fused_linear_sparse_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    chunk_size: int | None = None,
    block_v: int | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse-KD loss of ``hidden @ weight.T`` without materialising the logits (module docstring).

    Shapes: ``hidden`` (..., H); ``weight`` (V, H); ``targets`` (...); ``teacher_ids`` and
    ``teacher_weights`` (..., k); ``tail`` (...) or None. Differentiable in ``hidden`` and
    ``weight``. ``batchmean-compat`` divides the KL by ``hidden.shape[0]``. ``divergence``,
    ``jsd_beta`` and ``return_parts``: as in :func:`~logitcache.kernels.sparse_kd.sparse_kd_loss`.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise KernelError(
            f"Expected weight of shape (V, {hidden.shape[-1]}) matching hidden (..., H). "
            f"Got weight {tuple(weight.shape)}, hidden {tuple(hidden.shape)}."
        )
    if hidden.dtype != weight.dtype:
        raise KernelError(f"Expected hidden and weight of one dtype. Got {hidden.dtype} and {weight.dtype}.")
    vocab = weight.shape[0]
    params, chosen = checked_call(
        hidden.shape,
        vocab,
        hidden.device,
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
    loss, _, _, parts = _fused_linear_op(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(),
        weight.contiguous(),
        targets.reshape(-1),
        teacher_ids.reshape(-1, k),
        teacher_weights.reshape(-1, k),
        tail.reshape(-1) if tail is not None else None,
        *params.op_args(),
        int(chunk_size or 0),
        int(block_v or 0),
        chosen,
    )
    return (loss, parts.detach()) if return_parts else loss
