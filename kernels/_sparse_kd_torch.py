"""Closed-form, chunked torch backend of the sparse-KD loss (CPU, and any device without Triton).

Same math and the same contract as the Triton kernel (:mod:`logitcache.kernels.sparse_kd` has the
definition and the reference): one forward pass writes the per-row losses and d loss / d logits,
and autograd never sees the N x V computation. Rows are processed in chunks of ``C`` rows (``C * V ~ 2**21``); per
chunk, with ``e = exp(z - max z)`` (one ``exp`` over the chunk, written over the chunk's buffer)::

    s      = e.sum(-1)                          # q = e / s
    ce     = log(s) - (z_y - max z)             # -log q_y, in log space (no underflow)
    log_qS = (z_S - max z) - log(s)             # (C, k), gathered before the exp
    kl     = sum xlogy(w, w) + xlogy(r, r) - (w * log_qS).sum() - r * log(q_out)
    q_out  = e[not in S].sum() / s              # a direct sum of the non-cached terms, not 1 - sum

and the gradient in closed form (``c = kl_coef / T``, ``W = sum(w) + r``)::

    g_v = (ce_coef + c * (W - r / q_out)) * q_v            v not in S
    g_v = (ce_coef + c * W) * q_v - c * w_v                v in S
    g_y -= ce_coef

which is one multiply over the chunk plus (C, k) scatters. At T != 1 the CE part needs
``softmax(z)`` besides ``softmax(z / T)``: one more exp pass into a scratch chunk. Teacher-only
terms (the entropy ``sum xlogy(w, w)``, ``W``, the padding map) are computed once per call over all
rows, not per chunk.

Padding ids (negative) are mapped to an id already present in their row with weight 0, which
changes neither S nor any value. Rows whose outside mass underflows (``q_out`` below ~1e-25 in
fp32; e.g. logits of +-1e4), and rows with a tail but no present id, are recomputed in log space
(masked log-sum-exp, as the reference does) from their logits: exact at any logit range, rare.

Reverse KL, JSD and TV (:func:`_chunk_divergence`) use the same pass up to the exp and the
direct outside sum, then ``g = Q (h - hbar) / T`` per outcome (``h = dD/dQ``): one multiply over
the chunk by ``(ce_coef + c (h_bucket - hbar)) / s`` and (C, k) scatters at S and y. They need no
log-space fallback: their terms are continuous in ``q_out`` at 0.

Memory: besides the logits and their gradient, one (C, k) set of temporaries and, at T != 1 or for
logits of another dtype than the compute dtype, one (C, V) scratch chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from logitcache.kernels._common import PROB_FLOOR, SparseKDParams, divisors

# Rows per chunk when the caller does not choose: C * V ~ 2**21 elements (8 MiB in fp32). Smaller
# chunks stay in the caches, but every op of a chunk is a parallel region whose threads wait for
# each other: on a 2-core CPU shared with other work, many small ops cost far more than the cache
# misses (measured on the demo shape N = 2016, V = 4096: 64-row chunks up to 5x slower than
# 512-row chunks under load, equal when idle).
CHUNK_ELEMENTS = 1 << 21


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


@dataclass(frozen=True)
class TeacherRows:
    """Per-row teacher terms, computed once per call over all N rows (no vocab dimension)."""

    ids: torch.Tensor  # (N, k) int64, padding mapped to a present id of the row
    weights: torch.Tensor  # (N, k) compute dtype, 0 at padding
    tail: torch.Tensor | None  # (N,) compute dtype
    mass: torch.Tensor  # (N,) W = sum(w) + r
    entropy_term: torch.Tensor  # (N,) sum xlogy(w, w) + xlogy(r, r)
    no_entry: torch.Tensor  # (N,) bool: no present id at all (S is empty)
    present: torch.Tensor  # (N, k) bool: a real id (not padding)
    first_present: torch.Tensor  # (N, 1) int64: the slot whose id padding slots were mapped to


def prepare_teacher(
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    tail: torch.Tensor | None,
    dtype: torch.dtype,
) -> TeacherRows:
    ids = teacher_ids.long()  # (N, k)
    present = ids >= 0  # (N, k)
    first_present = present.to(torch.uint8).argmax(dim=1, keepdim=True)  # (N, 1) 0 when none
    fill = ids.gather(1, first_present).clamp(min=0)  # (N, 1)
    safe_ids = torch.where(present, ids, fill)  # (N, k)
    weights = teacher_weights.to(dtype).masked_fill(~present, 0.0)  # (N, k)
    mass = weights.sum(dim=1)  # (N,)
    entropy_term = torch.xlogy(weights, weights).sum(dim=1)  # (N,)
    tail_c = None
    if tail is not None:
        tail_c = tail.to(dtype)  # (N,)
        mass = mass + tail_c
        entropy_term = entropy_term + torch.xlogy(tail_c, tail_c)
    return TeacherRows(
        safe_ids, weights, tail_c, mass, entropy_term, ~present.any(dim=1), present, first_present
    )


def sparse_kd_forward_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherRows,
    params: SparseKDParams,
    *,
    grad_out: torch.Tensor,
    n_valid: torch.Tensor,
    logits_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rows_offset: int = 0,
    rows_per_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (N,) and parts (N, 2) in the compute dtype; writes d loss / d logits into
    ``grad_out``. ``parts[:, 0]`` is the row's CE, ``parts[:, 1]`` its divergence (unweighted; 0 on
    ignored rows).

    ``logits`` (N, V) and ``grad_out`` (N, V) may be the same tensor (in place: the logits are
    destroyed). ``teacher`` holds rows ``rows_offset .. rows_offset + N`` of a larger batch (the
    fused-linear variant calls this per chunk); ``n_valid`` counts the non-ignored rows of the whole
    batch. ``logits_rows(rows)`` returns the original logits of local ``rows`` for the log-space
    recomputation of underflowing rows; when None, ``logits`` must not alias ``grad_out``.
    """
    n_rows, vocab = logits.shape
    dtype = compute_dtype_of(logits.dtype)
    if logits_rows is None:
        if grad_out.data_ptr() == logits.data_ptr() and n_rows:
            raise ValueError("internal: in-place use needs logits_rows for the log-space fallback")

        def logits_rows(rows: torch.Tensor) -> torch.Tensor:
            return logits[rows]

    row_loss = torch.empty(n_rows, dtype=dtype, device=logits.device)  # (N,)
    row_parts = torch.empty((n_rows, 2), dtype=dtype, device=logits.device)  # (N, 2) CE, divergence
    chunk_fn = _chunk_loss_and_grad if params.divergence == "forward_kl" else _chunk_divergence
    if teacher.tail is None and params.divergence in ("jsd", "tv"):
        raise ValueError("internal: JSD / TV need the tail from SparseKDParams.bucket_tail")
    ce_div, kl_div = divisors(params, n_valid.to(dtype))
    chunk = rows_per_chunk or default_rows_per_chunk(vocab)
    in_place = grad_out.dtype == dtype
    scratch = (
        None if in_place else torch.empty((min(chunk, n_rows), vocab), dtype=dtype, device=logits.device)
    )
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        if in_place:
            work = grad_out[start:stop]  # (c, V)
            if work.data_ptr() != logits[start:stop].data_ptr():
                work.copy_(logits[start:stop])
        else:
            work = scratch[: stop - start]  # type: ignore[index]
            work.copy_(logits[start:stop])
        rows = slice(rows_offset + start, rows_offset + stop)
        flagged = chunk_fn(
            work,
            targets[start:stop],
            teacher,
            rows,
            params,
            ce_div,
            kl_div,
            row_loss[start:stop],
            row_parts[start:stop],
        )
        if flagged is not None:
            local = flagged + start  # (f,) rows of this call
            loss_f, parts_f, grad_f = _rows_log_space(
                logits_rows(local).to(dtype),
                targets[local],
                teacher,
                flagged + rows.start,
                params,
                ce_div,
                kl_div,
            )
            row_loss[local] = loss_f
            row_parts[local] = parts_f
            work[flagged] = grad_f
        if not in_place:
            grad_out[start:stop].copy_(work)
    return row_loss, row_parts


def _coefficients(
    targets: torch.Tensor,
    params: SparseKDParams,
    ce_div: torch.Tensor,
    kl_div: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid, target ids clamped, ce_coef per row, kl_coef per row); 0 coefficients on ignored rows."""
    valid = targets != params.ignore_index  # (c,)
    y = torch.where(valid, targets, torch.zeros_like(targets)).long()  # (c,)
    validf = valid.to(dtype)
    ce_coef = validf * (params.ce_weight / ce_div)  # (c,)
    kl_coef = validf * (params.kl_weight * params.temperature**2 / kl_div)  # (c,)
    return valid, y, ce_coef, kl_coef


class _StudentRows(NamedTuple):
    """The student's side of one chunk, shared by every divergence (:func:`_student_softmax`)."""

    valid: torch.Tensor  # (c,) bool
    y: torch.Tensor  # (c,) targets, ignored rows clamped to 0
    ce_coef: torch.Tensor  # (c,)
    kl_coef: torch.Tensor  # (c,)
    c_kl: torch.Tensor  # (c,) kl_coef / T
    ce: torch.Tensor  # (c,) -log softmax(z)_y
    ce_in_q: torch.Tensor  # (c,) the CE coefficient folded into q (T = 1), else 0
    ce_scaled: torch.Tensor | None  # (c, V) ce_coef * softmax(z) at T != 1, else None
    z_s: torch.Tensor  # (c, k) (z_S - max z) / T
    s: torch.Tensor  # (c,) sum of e
    log_s: torch.Tensor  # (c,)
    log_q_s: torch.Tensor  # (c, k) log q at S


def _student_softmax(
    work: torch.Tensor,
    targets: torch.Tensor,
    ids: torch.Tensor,
    params: SparseKDParams,
    ce_div: torch.Tensor,
    kl_div: torch.Tensor,
) -> _StudentRows:
    """Overwrite ``work`` (c, V) (the chunk's logits z) with ``e = exp((z - max z) / T)`` and return
    the CE term, the row sums and the student's log-probabilities at the cached ids."""
    temp = params.temperature
    valid, y, ce_coef, kl_coef = _coefficients(targets, params, ce_div, kl_div, work.dtype)
    top = work.amax(dim=1, keepdim=True)  # (c, 1)
    work.sub_(top)  # z - max z
    z_y = work.gather(1, y.unsqueeze(1)).squeeze(1)  # (c,)
    ce_scaled = None  # ce_coef * softmax(z), only at T != 1
    if temp != 1.0:
        ce_scaled = torch.exp(work)  # (c, V) scratch
        s1 = ce_scaled.sum(dim=1)  # (c,)
        ce = s1.log() - z_y
        ce_scaled.mul_((ce_coef / s1).unsqueeze(1))
        work.mul_(1.0 / temp)  # (z - max z) / T: its max is 0 as well
        ce_in_q = torch.zeros_like(ce_coef)
    z_s = work.gather(1, ids)  # (c, k) (z_S - max z) / T
    torch.exp(work, out=work)  # e = exp((z - max z) / T)
    s = work.sum(dim=1)  # (c,)
    log_s = s.log()
    if temp == 1.0:
        ce = log_s - z_y  # -log q_y
        ce_in_q = ce_coef  # at T = 1 softmax(z) = q: the CE part folds into the scale of q
    log_q_s = z_s - log_s.unsqueeze(1)  # (c, k)
    return _StudentRows(
        valid, y, ce_coef, kl_coef, kl_coef / temp, ce, ce_in_q, ce_scaled, z_s, s, log_s, log_q_s
    )


def _chunk_loss_and_grad(
    work: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherRows,
    rows: slice,
    params: SparseKDParams,
    ce_div: torch.Tensor,
    kl_div: torch.Tensor,
    loss_out: torch.Tensor,
    parts_out: torch.Tensor,
) -> torch.Tensor | None:
    """Overwrite ``work`` (c, V) (the chunk's logits) with the gradient; write the row losses and
    their (CE, KL) parts. Forward KL only (:func:`_chunk_divergence` does the others).

    Returns the local indices of rows to recompute in log space, or None.
    """
    dtype = work.dtype
    ids = teacher.ids[rows]  # (c, k)
    w = teacher.weights[rows]  # (c, k)
    mass = teacher.mass[rows]  # (c,)
    st = _student_softmax(work, targets, ids, params, ce_div, kl_div)
    valid, y, ce_coef, kl_coef, c_kl = st.valid, st.y, st.ce_coef, st.kl_coef, st.c_kl
    ce, ce_in_q, ce_scaled, s, log_s, log_q_s = st.ce, st.ce_in_q, st.ce_scaled, st.s, st.log_s, st.log_q_s
    kl = teacher.entropy_term[rows] - (w * log_q_s).sum(dim=1)  # (c,)
    in_s_coef = ce_in_q + c_kl * mass  # (c,) multiplies q on S

    flagged = None
    if teacher.tail is None:
        work.mul_((in_s_coef / s).unsqueeze(1))
    else:
        r = teacher.tail[rows]  # (c,)
        work.scatter_(1, ids, 0.0)  # e outside S only
        s_out = work.sum(dim=1)  # (c,) direct sum of the non-cached terms
        tiny = torch.finfo(dtype).tiny * 1e13  # below this, exp() may have flushed terms to 0
        has_r = r > 0
        ok = s_out > tiny
        log_q_out = s_out.log() - log_s
        kl = kl - torch.where(has_r, r * log_q_out, torch.zeros_like(r))
        ghost = torch.where(has_r & ok, r * s / s_out.clamp(min=tiny), torch.zeros_like(r))  # r / q_out
        work.mul_(((in_s_coef - c_kl * ghost) / s).unsqueeze(1))
        work.scatter_(1, ids, (log_q_s.exp() * in_s_coef.unsqueeze(1)))  # q_S * (ce + c W)
        bad = valid & ((has_r & ~ok) | teacher.no_entry[rows])
        if bool(bad.any()):
            flagged = bad.nonzero().squeeze(1)
    work.scatter_add_(1, ids, -(c_kl.unsqueeze(1) * w))
    work.scatter_add_(1, y.unsqueeze(1), -ce_coef.unsqueeze(1))
    if ce_scaled is not None:
        work.add_(ce_scaled)
    _write_rows(valid, ce_coef * ce + kl_coef * kl, ce, kl, loss_out, parts_out)
    return flagged


def _outcome_terms(
    p: torch.Tensor, q: torch.Tensor, log_q: torch.Tensor, on: torch.Tensor, params: SparseKDParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """(terms, h) per outcome for the non-forward divergences: D = terms.sum(-1) and h = dD/dq up
    to a constant shared by all outcomes (it cancels in ``q * (h - sum(q * h))``). 0 where ``on``
    is False; h is 0 where q == 0 (its gradient is 0 there)."""
    zeros = torch.zeros_like(q)
    if params.divergence == "reverse_kl":
        log_ratio = log_q - torch.log(p.clamp(min=PROB_FLOOR))
        terms = torch.where(q > 0, q * log_ratio, zeros)
        h = log_ratio  # d/dq q log(q / p) = log(q / p) + 1
    elif params.divergence == "jsd":
        beta = params.jsd_beta
        m = beta * p + (1.0 - beta) * q  # the mixture
        log_m = torch.where(m > 0, torch.log(m), math.log(1.0 - beta) + log_q)  # m == 0: p == q == 0
        teacher = torch.where(p > 0, p * (torch.log(p) - log_m), zeros)
        student = log_q - log_m
        terms = beta * teacher + (1.0 - beta) * torch.where(q > 0, q * student, zeros)
        h = (1.0 - beta) * student  # the two terms' derivatives through m cancel: (1 - beta) log(q / m)
    else:  # tv
        terms = 0.5 * (p - q).abs()
        h = 0.5 * torch.sign(q - p)  # subgradient 0 at a tie (as autograd of abs)
    terms = torch.where(on, terms, zeros)
    h = torch.where(on & (q > 0), h, zeros)
    return terms, h


def _chunk_divergence(
    work: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherRows,
    rows: slice,
    params: SparseKDParams,
    ce_div: torch.Tensor,
    kl_div: torch.Tensor,
    loss_out: torch.Tensor,
    parts_out: torch.Tensor,
) -> None:
    """:func:`_chunk_loss_and_grad` for reverse KL, JSD and TV.

    Outcomes: the k entries and, with a tail, the bucket (student mass ``q_out``, a direct sum of
    the non-cached terms). Without a tail (reverse KL only: the launcher gives JSD/TV a tail of 0)
    the student is restricted to S and renormalised. With ``h = dD/dQ`` per outcome and
    ``hbar = sum(Q * h)``, d D / d z_v = Q_v (h_v - hbar) / T: ``q_v (h_bucket - hbar) / T`` for v
    outside S (0 without a bucket), one multiply over the chunk plus (c, k) scatters.
    """
    ids = teacher.ids[rows]  # (c, k)
    w = teacher.weights[rows]  # (c, k)
    present = teacher.present[rows]  # (c, k)
    no_entry = teacher.no_entry[rows]  # (c,)
    st = _student_softmax(work, targets, ids, params, ce_div, kl_div)
    valid, y, ce_coef, kl_coef, c_kl = st.valid, st.y, st.ce_coef, st.kl_coef, st.c_kl
    ce, ce_in_q, ce_scaled, z_s, s, log_s, log_q_s = (
        st.ce, st.ce_in_q, st.ce_scaled, st.z_s, st.s, st.log_s, st.log_q_s
    )  # fmt: skip
    q_s = log_q_s.exp()  # (c, k)

    if teacher.tail is not None:
        r = teacher.tail[rows]  # (c,)
        work.scatter_(1, ids, 0.0)  # e outside S only
        if bool(no_entry.any()):  # S empty: the id its padding was mapped to is outside S
            lost = no_entry.nonzero().squeeze(1)
            work[lost, ids[lost, 0]] = z_s[lost, 0].exp()
        s_out = work.sum(dim=1)  # (c,) direct sum of the non-cached terms
        q_out = s_out / s
        p_all = torch.cat([w, r.unsqueeze(1)], dim=1)  # (c, k + 1)
        q_all = torch.cat([torch.where(present, q_s, 0.0), q_out.unsqueeze(1)], dim=1)
        log_q_all = torch.cat([log_q_s, (s_out.log() - log_s).unsqueeze(1)], dim=1)
        on = torch.cat([present, ((s_out > 0) | (r > 0)).unsqueeze(1)], dim=1)
        terms, h = _outcome_terms(p_all, q_all, log_q_all, on, params)
        hbar = (q_all * h).sum(dim=1)  # (c,)
        h_s, big_q_s = h[:, :-1], q_all[:, :-1]  # (c, k)
        out_coef = h[:, -1] - hbar  # (c,) multiplies q_v, v outside S
        work.mul_(((ce_in_q + c_kl * out_coef) / s).unsqueeze(1))
    else:  # reverse KL without a tail: Q = q_S / q(S)
        lse_s = torch.logsumexp(log_q_s.masked_fill(~present, float("-inf")), dim=1, keepdim=True)
        lse_s = torch.where(no_entry.unsqueeze(1), torch.zeros_like(lse_s), lse_s)  # (c, 1)
        log_q_tilde = log_q_s - lse_s  # (c, k)
        big_q_s = torch.where(present, log_q_tilde.exp(), 0.0)  # (c, k)
        terms, h_s = _outcome_terms(w, big_q_s, log_q_tilde, present, params)
        hbar = (big_q_s * h_s).sum(dim=1)
        work.mul_((ce_in_q / s).unsqueeze(1))
    kd = terms.sum(dim=1)  # (c,)
    values = q_s * ce_in_q.unsqueeze(1) + c_kl.unsqueeze(1) * big_q_s * (h_s - hbar.unsqueeze(1))  # (c, k)
    # padding slots repeat a present id of their row: they must write that slot's value; rows
    # without any entry keep what the multiply wrote (their ids are outside S)
    values = torch.where(present, values, values.gather(1, teacher.first_present[rows]))
    values = torch.where(no_entry.unsqueeze(1), work.gather(1, ids), values)
    work.scatter_(1, ids, values)
    work.scatter_add_(1, y.unsqueeze(1), -ce_coef.unsqueeze(1))
    if ce_scaled is not None:
        work.add_(ce_scaled)
    _write_rows(valid, ce_coef * ce + kl_coef * kd, ce, kd, loss_out, parts_out)


def _write_rows(
    valid: torch.Tensor,
    per_row: torch.Tensor,
    ce: torch.Tensor,
    kd: torch.Tensor,
    loss_out: torch.Tensor,
    parts_out: torch.Tensor,
) -> None:
    """Row losses and (CE, divergence) parts, 0 on ignored rows."""
    zeros = torch.zeros_like(per_row)
    loss_out.copy_(torch.where(valid, per_row, zeros))
    parts_out[:, 0].copy_(torch.where(valid, ce, zeros))
    parts_out[:, 1].copy_(torch.where(valid, kd, zeros))


def _rows_log_space(
    z: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherRows,
    rows: torch.Tensor,
    params: SparseKDParams,
    ce_div: torch.Tensor,
    kl_div: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (f,), parts (f, 2) and gradient (f, V) of a few rows with the masked log-sum-exp (exact at any range)."""
    temp = params.temperature
    valid, y, ce_coef, kl_coef = _coefficients(targets, params, ce_div, kl_div, z.dtype)
    ids, w = teacher.ids[rows], teacher.weights[rows]  # (f, k)
    r = teacher.tail[rows] if teacher.tail is not None else torch.zeros_like(ce_coef)  # (f,)
    log_p1 = torch.log_softmax(z, dim=1)  # (f, V)
    log_q = log_p1 if temp == 1.0 else torch.log_softmax(z / temp, dim=1)
    in_s = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)  # (f, V)
    in_s[teacher.no_entry[rows]] = False  # S is empty there (its ids were all padding)
    masked = log_q.masked_fill(in_s, float("-inf"))
    log_q_out = torch.logsumexp(masked, dim=1)  # (f,) -inf when nothing is outside S
    finite = torch.isfinite(log_q_out)
    safe_out = torch.where(finite, log_q_out, torch.zeros_like(log_q_out))
    outside_soft = torch.where(finite.unsqueeze(1), torch.exp(masked - safe_out.unsqueeze(1)), 0.0)  # (f, V)
    ce = -log_p1.gather(1, y.unsqueeze(1)).squeeze(1)
    ghost = torch.where(r > 0, -r * log_q_out, torch.zeros_like(r))
    kl = teacher.entropy_term[rows] - (w * log_q.gather(1, ids)).sum(dim=1) + ghost
    q = log_q.exp()
    c_kl = (kl_coef / temp).unsqueeze(1)
    grad = c_kl * (teacher.mass[rows].unsqueeze(1) * q - r.unsqueeze(1) * outside_soft)
    grad.scatter_add_(1, ids, -c_kl * w)
    grad.add_(ce_coef.unsqueeze(1) * log_p1.exp())
    grad.scatter_add_(1, y.unsqueeze(1), -ce_coef.unsqueeze(1))
    zeros = torch.zeros_like(ce)
    parts = torch.stack([torch.where(valid, ce, zeros), torch.where(valid, kl, zeros)], dim=1)  # (f, 2)
    return ce_coef * ce + kl_coef * kl, parts, grad
