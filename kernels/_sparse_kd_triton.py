"""Triton kernel of the sparse-KD loss (math and launcher in :mod:`logitcache.kernels.sparse_kd`).

Kept in its own module only so that triton is imported lazily (see ``sparse_kd._fwd_kernel``).

One program per row:

1. gather the teacher entries' logits z[S] and the target logit z[y] (before any write, so the
   gradient may overwrite the logits in place);
2. pass 1 over V in BLOCK_V chunks: online log-sum-exp at T = 1 and at T with one running max
   (max(z / T) = max(z) / T); with a tail, the sum over v not in S is the row's sum at T minus the
   distinct gathered entries' sum, or, when S holds more than 1 - OUT_SHARE_MIN of the row's mass
   at T (the difference would cancel), a masked online log-sum-exp over v not in S in an extra pass
   with its own max: S is sorted, the ids inside a BLOCK_T chunk are the contiguous range
   [#ids < chunk_start, #ids < chunk_end) and are compared against the chunk's vocab indices;
3. the row loss, and the gradient values at S and at y (from registers);
4. pass 2 writes the generic gradient ce_coef * p + kl_coef / T * (W q - r q / q_out) for every v,
   then (after a barrier) overwrites the k + 1 special positions.

``DIVERGENCE`` (constexpr) picks the divergence: 0 (forward KL) is the code above; 1-3 (reverse
KL, JSD, TV) replace steps 3-4 with ``Q (h - hbar) / T`` per outcome (see sparse_kd.py), the
generic value for v outside S being ``ce_coef * p + kl_coef / T * (h_bucket - hbar) * q``.
"""

import triton
import triton.language as tl


@triton.jit
def sparse_kd_fwd_kernel(
    logits_ptr,  # (N, V) student logits, fp32/bf16/fp16
    grad_ptr,  # (N, V) d loss / d logits, logits dtype; may alias logits_ptr (in-place)
    targets_ptr,  # (N,) int target token
    ids_ptr,  # (N, K) int teacher ids, negative = padding; ascending when HAS_TAIL
    weights_ptr,  # (N, K) float teacher probabilities
    tail_ptr,  # (N,) float ghost-bucket mass, read only when HAS_TAIL
    n_valid_ptr,  # (1,) int number of non-ignored positions (device scalar: no host sync)
    row_loss_ptr,  # (N,) fp32 out: this row's scaled contribution to the loss
    row_parts_ptr,  # (N, 2) fp32 out: this row's CE and divergence, unweighted (0 when ignored)
    logits_row_stride,
    grad_row_stride,
    ids_row_stride,
    weights_row_stride,
    vocab_size,
    num_entries,  # K
    inv_temperature,  # 1 / T
    ce_weight,
    kl_weight_t2,  # kl_weight * T**2
    kl_static_div,  # KL divisor when not dividing by n_valid (1 or the batch size)
    ignore_index,
    jsd_beta,  # the teacher's share of the JSD mixture (DIVERGENCE == 2)
    CE_BY_VALID: tl.constexpr,
    KL_BY_VALID: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    TEMP_IS_ONE: tl.constexpr,
    DIVERGENCE: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD, 3 TV (_common.DIVERGENCES)
    BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr,  # chunk of the direct outside sum (rows whose S holds nearly all mass)
    K_PAD: tl.constexpr,
    OUT_SHARE_MIN: tl.constexpr,  # below this outside share at T, the outside sum is direct
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    offs_v = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row).to(tl.int64)

    if target == ignore_index:
        for chunk_start in range(0, vocab_size, BLOCK_V):
            offs = chunk_start + offs_v
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
            tl.store(grad_row + offs, zeros.to(grad_ptr.dtype.element_ty), mask=offs < vocab_size)
        tl.store(row_loss_ptr + row, 0.0)
        tl.store(row_parts_ptr + 2 * row, 0.0)
        tl.store(row_parts_ptr + 2 * row + 1, 0.0)
        return

    n_valid = tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
    if CE_BY_VALID:
        ce_coef = ce_weight / n_valid
    else:
        ce_coef = ce_weight + 0.0 * n_valid
    if KL_BY_VALID:
        kl_coef = kl_weight_t2 / n_valid
    else:
        kl_coef = kl_weight_t2 / kl_static_div + 0.0 * n_valid
    kl_grad_coef = kl_coef * inv_temperature  # T**2 * (1/T) from the chain rule through z / T

    # Gather the teacher entries and the target logit before any write (in-place safe).
    offs_k = tl.arange(0, K_PAD)
    k_in = offs_k < num_entries
    ids_row = ids_ptr + row * ids_row_stride
    weights_row = weights_ptr + row * weights_row_stride
    ids = tl.load(ids_row + offs_k, mask=k_in, other=-1).to(tl.int64)  # (K_PAD,)
    present = k_in & (ids >= 0)
    safe_ids = tl.where(present, ids, 0)
    weights = tl.load(weights_row + offs_k, mask=present, other=0.0).to(tl.float32)  # (K_PAD,)
    z_s = tl.load(logits_row + safe_ids, mask=present, other=0.0).to(tl.float32)  # (K_PAD,)
    z_y = tl.load(logits_row + target).to(tl.float32)
    if HAS_TAIL:
        tail_mass = tl.load(tail_ptr + row).to(tl.float32)
    else:
        tail_mass = 0.0

    # Pass 1: online log-sum-exp at T = 1 and at T (shared running max: max(z/T) = max(z)/T).
    run_max = float("-inf")
    sum_exp_1 = 0.0
    sum_exp_t = 0.0
    for chunk_start in range(0, vocab_size, BLOCK_V):
        offs = chunk_start + offs_v
        in_vocab = offs < vocab_size
        z = tl.load(logits_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        sum_exp_1 = sum_exp_1 * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        if not TEMP_IS_ONE:
            sum_exp_t = sum_exp_t * tl.exp((run_max - new_max) * inv_temperature) + tl.sum(
                tl.exp((z - new_max) * inv_temperature), axis=0
            )
        run_max = new_max

    # With a tail: the sum of exp((z - out_max) / T) over v not in S. Usually the whole row's sum
    # minus S's (distinct ids: sorted, so a repeat follows its first copy), with out_max = run_max:
    # no extra exp per vocab entry. When S holds more than 1 - OUT_SHARE_MIN of the row's mass at
    # T, that difference would cancel, so this row sums v not in S directly in an extra pass.
    subtracted = False
    out_max = float("-inf")
    out_sum = 0.0
    if HAS_TAIL:
        if TEMP_IS_ONE:
            total_t = sum_exp_1
        else:
            total_t = sum_exp_t
        prev_ids = tl.load(ids_row + offs_k - 1, mask=present & (offs_k > 0), other=-1).to(tl.int64)
        first_copy = present & (ids != prev_ids)
        in_sum = tl.sum(tl.where(first_copy, tl.exp((z_s - run_max) * inv_temperature), 0.0), axis=0)
        subtracted = total_t - in_sum >= OUT_SHARE_MIN * total_t
        if subtracted:
            out_max = run_max
            out_sum = total_t - in_sum
        else:
            offs_t = tl.arange(0, BLOCK_T)
            # padding slots past K sort after every vocab id for the per-chunk range counts
            ids_for_count = tl.where(k_in, ids, 1 << 40)
            for chunk_start in range(0, vocab_size, BLOCK_T):
                offs = chunk_start + offs_t
                in_vocab = offs < vocab_size
                z = tl.load(logits_row + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
                # ids are sorted, so those inside [chunk_start, chunk_start + BLOCK_T) are a range
                first = tl.sum((ids_for_count < chunk_start).to(tl.int32), axis=0)
                last = tl.sum((ids_for_count < chunk_start + BLOCK_T).to(tl.int32), axis=0)
                in_s = offs < 0  # all False, (BLOCK_T,)
                for slot in range(first, last):
                    in_s = in_s | (offs == tl.load(ids_row + slot).to(tl.int64))
                outside = in_vocab & (~in_s)
                z_out = tl.where(outside, z, float("-inf"))
                new_out_max = tl.maximum(out_max, tl.max(z_out, axis=0))
                safe_out_max = tl.where(new_out_max == float("-inf"), 0.0, new_out_max)
                out_sum = out_sum * tl.exp((out_max - safe_out_max) * inv_temperature) + tl.sum(
                    tl.where(outside, tl.exp((z - safe_out_max) * inv_temperature), 0.0), axis=0
                )
                out_max = new_out_max

    # Log-probabilities are formed as (z - max) - log(sum): never subtract an absolute lse from z,
    # which loses ulp(|lse|) when the logits are large (e.g. +-1e4).
    log_sum_1 = tl.log(sum_exp_1)
    if TEMP_IS_ONE:
        log_sum_t = log_sum_1
    else:
        log_sum_t = tl.log(sum_exp_t)

    # Loss of this row: CE, then the divergence (forward KL: the fast path, specialised).
    ce = (run_max - z_y) + log_sum_1
    log_q_s = (z_s - run_max) * inv_temperature - log_sum_t  # (K_PAD,)
    tl.store(row_parts_ptr + 2 * row, ce)
    if DIVERGENCE == 0:
        log_weights = tl.log(tl.where(weights > 0.0, weights, 1.0))  # 0 log 0 = 0, no log(0) evaluated
        kl_terms = tl.where(weights > 0.0, weights * (log_weights - log_q_s), 0.0)
        kl = tl.sum(kl_terms, axis=0)
        total_mass = tl.sum(weights, axis=0) + tail_mass
        if HAS_TAIL:
            has_outside = out_sum > 0.0
            out_shift = tl.where(has_outside, out_max, 0.0)
            log_out_sum = tl.log(tl.where(has_outside, out_sum, 1.0))
            log_q_out = (out_shift - run_max) * inv_temperature + log_out_sum - log_sum_t
            ghost = tail_mass * (tl.log(tl.where(tail_mass > 0.0, tail_mass, 1.0)) - log_q_out)
            ghost = tl.where(has_outside, ghost, float("inf"))
            kl += tl.where(tail_mass > 0.0, ghost, 0.0)
            ghost_mass = tl.where(has_outside, tail_mass, 0.0)  # NaN-free gradient when S = vocab
        tl.store(row_loss_ptr + row, ce_coef * ce + kl_coef * kl)
        tl.store(row_parts_ptr + 2 * row + 1, kl)

        # Gradient values at S and at y, from the gathered logits (computed before pass 2 so that
        # an in-place pass 2 cannot clobber their inputs). Duplicated ids get the merged weight.
        merged_weights = tl.zeros([K_PAD], dtype=tl.float32)
        for slot in range(0, num_entries):
            slot_id = tl.load(ids_row + slot).to(tl.int64)
            slot_w = tl.load(weights_row + slot).to(tl.float32)
            merged_weights += tl.where(present & (ids == slot_id), slot_w, 0.0)
        is_target = present & (ids == target)
        p_1_s = tl.exp((z_s - run_max) - log_sum_1)
        grad_s = ce_coef * (p_1_s - tl.where(is_target, 1.0, 0.0)) + kl_grad_coef * (
            total_mass * tl.exp(log_q_s) - merged_weights
        )
        target_in_s = tl.max(is_target.to(tl.int32), axis=0) > 0
        target_w = tl.sum(tl.where(is_target, weights, 0.0), axis=0)
        if HAS_TAIL:
            q_over_out_y = tl.exp((z_y - out_shift) * inv_temperature - log_out_sum)
            target_teacher = tl.where(target_in_s, target_w, ghost_mass * q_over_out_y)
        else:
            target_teacher = target_w
        p_1_y = tl.exp((z_y - run_max) - log_sum_1)
        q_y = tl.exp((z_y - run_max) * inv_temperature - log_sum_t)
        grad_y = ce_coef * (p_1_y - 1.0) + kl_grad_coef * (total_mass * q_y - target_teacher)

        # Pass 2: the gradient for every v as if v were neither y nor in S: ce_coef p + kl_grad_coef
        # (total_mass q - ghost_mass q / Q_out), Q_out = the student's mass outside S at T. When
        # pass 1 subtracted, Q_out >= OUT_SHARE_MIN and the ghost share folds into q's coefficient.
        q_coef = kl_grad_coef * total_mass
        if HAS_TAIL:
            if subtracted:
                q_coef -= kl_grad_coef * ghost_mass * tl.exp(log_sum_t - log_out_sum)
        for chunk_start in range(0, vocab_size, BLOCK_V):
            offs = chunk_start + offs_v
            in_vocab = offs < vocab_size
            z = tl.load(logits_row + offs, mask=in_vocab, other=0.0).to(tl.float32)
            p_1 = tl.exp((z - run_max) - log_sum_1)
            if TEMP_IS_ONE:
                q_t = p_1
            else:
                q_t = tl.exp((z - run_max) * inv_temperature - log_sum_t)
            grad = ce_coef * p_1 + q_coef * q_t
            if HAS_TAIL:
                if not subtracted:
                    grad -= (
                        kl_grad_coef * ghost_mass * tl.exp((z - out_shift) * inv_temperature - log_out_sum)
                    )
            tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)
        # ... then overwrite S and y. The barrier orders these stores after pass 2's stores of the
        # same addresses by other threads of this program. Duplicate addresses get equal values.
        tl.debug_barrier()
        tl.store(grad_row + safe_ids, grad_s.to(grad_ptr.dtype.element_ty), mask=present)
        tl.store(grad_row + target, grad_y.to(grad_ptr.dtype.element_ty))
    else:
        # Reverse KL, JSD, TV over the outcomes: the present entries and, with a tail, the bucket
        # (the launcher gives JSD / TV a tail of 0 when there is none). Without a tail (reverse
        # KL) the student is restricted to S and renormalised. h = dD/dQ per outcome (up to a
        # shared constant), hbar = sum Q h; d D / d z_v = Q_v (h_v - hbar) / T.
        if HAS_TAIL:
            has_outside = out_sum > 0.0
            out_shift = tl.where(has_outside, out_max, 0.0)
            log_out_sum = tl.log(tl.where(has_outside, out_sum, 1.0))
            log_q_b = (out_shift - run_max) * inv_temperature + log_out_sum - log_sum_t
            q_b = tl.where(has_outside, tl.exp(log_q_b), 0.0)
            log_big_q = log_q_s  # (K_PAD,)
        else:
            max_s = tl.max(tl.where(present, log_q_s, float("-inf")), axis=0)
            safe_max_s = tl.where(max_s == float("-inf"), 0.0, max_s)  # S empty: no outcome at all
            sum_s = tl.sum(tl.where(present, tl.exp(log_q_s - safe_max_s), 0.0), axis=0)
            log_big_q = log_q_s - (safe_max_s + tl.log(tl.where(sum_s > 0.0, sum_s, 1.0)))
        big_q = tl.where(present, tl.exp(log_big_q), 0.0)  # (K_PAD,)
        terms_s, h_s = _divergence_terms(weights, big_q, log_big_q, jsd_beta, DIVERGENCE)
        terms_s = tl.where(present, terms_s, 0.0)
        h_s = tl.where(present & (big_q > 0.0), h_s, 0.0)
        kd = tl.sum(terms_s, axis=0)
        hbar = tl.sum(big_q * h_s, axis=0)
        if HAS_TAIL:
            term_b, h_b = _divergence_terms(tail_mass, q_b, log_q_b, jsd_beta, DIVERGENCE)
            bucket_on = has_outside | (tail_mass > 0.0)
            kd += tl.where(bucket_on, term_b, 0.0)
            h_b = tl.where(bucket_on & (q_b > 0.0), h_b, 0.0)
            hbar += q_b * h_b
            out_coef = h_b - hbar  # multiplies q_v for v outside S
        else:
            out_coef = 0.0
        tl.store(row_loss_ptr + row, ce_coef * ce + kl_coef * kd)
        tl.store(row_parts_ptr + 2 * row + 1, kd)

        # Gradient values at S and at y before pass 2 (in-place safe); ids are distinct.
        kd_grad_s = big_q * (h_s - hbar)  # (K_PAD,) d D / d z_S times T
        is_target = present & (ids == target)
        p_1_s = tl.exp((z_s - run_max) - log_sum_1)
        grad_s = ce_coef * (p_1_s - tl.where(is_target, 1.0, 0.0)) + kl_grad_coef * kd_grad_s
        target_in_s = tl.max(is_target.to(tl.int32), axis=0) > 0
        q_y = tl.exp((z_y - run_max) * inv_temperature - log_sum_t)
        kd_grad_y = tl.where(target_in_s, tl.sum(tl.where(is_target, kd_grad_s, 0.0), axis=0), out_coef * q_y)
        p_1_y = tl.exp((z_y - run_max) - log_sum_1)
        grad_y = ce_coef * (p_1_y - 1.0) + kl_grad_coef * kd_grad_y

        # Pass 2: CE plus the bucket's share for every v, then S and y overwritten.
        for chunk_start in range(0, vocab_size, BLOCK_V):
            offs = chunk_start + offs_v
            in_vocab = offs < vocab_size
            z = tl.load(logits_row + offs, mask=in_vocab, other=0.0).to(tl.float32)
            p_1 = tl.exp((z - run_max) - log_sum_1)
            grad = ce_coef * p_1
            if HAS_TAIL:
                if TEMP_IS_ONE:
                    q_t = p_1
                else:
                    q_t = tl.exp((z - run_max) * inv_temperature - log_sum_t)
                grad += kl_grad_coef * out_coef * q_t
            tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)
        tl.debug_barrier()
        tl.store(grad_row + safe_ids, grad_s.to(grad_ptr.dtype.element_ty), mask=present)
        tl.store(grad_row + target, grad_y.to(grad_ptr.dtype.element_ty))


@triton.jit
def _divergence_terms(p, q, log_q, jsd_beta, DIVERGENCE: tl.constexpr):
    """(term, h) per outcome (any shape): D = sum of terms, h = dD/dq up to a shared constant.

    Reverse KL: q log(q / max(p, PROB_FLOOR)), h = log(q / p'); JSD: beta p log(p / m) +
    (1 - beta) q log(q / m), m = beta p + (1 - beta) q, h = (1 - beta) log(q / m); TV: |p - q| / 2,
    h = sign(q - p) / 2 (0 at a tie). Terms with q == 0 (or p == 0) are 0; h is masked by the caller.
    """
    if DIVERGENCE == 1:
        log_ratio = log_q - tl.log(tl.maximum(p, 1e-8))  # PROB_FLOOR in _common.py
        term = tl.where(q > 0.0, q * log_ratio, 0.0)
        h = log_ratio
    elif DIVERGENCE == 2:
        m = jsd_beta * p + (1.0 - jsd_beta) * q
        log_m = tl.where(m > 0.0, tl.log(tl.where(m > 0.0, m, 1.0)), tl.log(1.0 - jsd_beta) + log_q)
        teacher = tl.where(p > 0.0, p * (tl.log(tl.where(p > 0.0, p, 1.0)) - log_m), 0.0)
        student = log_q - log_m
        term = jsd_beta * teacher + (1.0 - jsd_beta) * tl.where(q > 0.0, q * student, 0.0)
        h = (1.0 - jsd_beta) * student
    else:
        term = 0.5 * tl.abs(p - q)
        h = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
    return term, h
