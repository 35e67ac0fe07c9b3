"""Triton kernel of the sparse-KD loss (math and launcher in :mod:`logitcache.kernels.sparse_kd`).

Kept in its own module only so that triton is imported lazily (see ``sparse_kd._fwd_kernel``).

One program per row:

1. gather the teacher entries' logits z[S] and the target logit z[y] (before any write, so the
   gradient may overwrite the logits in place);
2. pass 1 over V in BLOCK_V chunks: online log-sum-exp at T = 1 and at T with one running max
   (max(z / T) = max(z) / T); with a tail, also a masked online log-sum-exp over v not in S with its
   own running max: S is sorted, the ids inside a chunk are the contiguous range
   [#ids < chunk_start, #ids < chunk_end) and are compared against the chunk's vocab indices
   (k * BLOCK_V compares per row in all);
3. the row loss, and the gradient values at S and at y (from registers);
4. pass 2 writes the generic gradient ce_coef * p + kl_coef / T * (W q - r q / q_out) for every v,
   then (after a barrier) overwrites the k + 1 special positions.
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
    CE_BY_VALID: tl.constexpr,
    KL_BY_VALID: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    TEMP_IS_ONE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    K_PAD: tl.constexpr,
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
        # padding slots past K sort after every vocab id for the per-chunk range counts
        ids_for_count = tl.where(k_in, ids, 1 << 40)
    else:
        tail_mass = 0.0

    # Pass 1: online log-sum-exp at T = 1 and at T (shared running max: max(z/T) = max(z)/T),
    # plus, with a tail, a masked online log-sum-exp over v not in S with its own max.
    run_max = float("-inf")
    sum_exp_1 = 0.0
    sum_exp_t = 0.0
    out_max = float("-inf")
    out_sum = 0.0
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
        if HAS_TAIL:
            # ids are sorted, so those inside [chunk_start, chunk_start + BLOCK_V) are a range
            first = tl.sum((ids_for_count < chunk_start).to(tl.int32), axis=0)
            last = tl.sum((ids_for_count < chunk_start + BLOCK_V).to(tl.int32), axis=0)
            in_s = offs < 0  # all False, (BLOCK_V,)
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

    # Loss of this row.
    ce = (run_max - z_y) + log_sum_1
    log_q_s = (z_s - run_max) * inv_temperature - log_sum_t  # (K_PAD,)
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

    # Pass 2: the gradient for every v as if v were neither y nor in S ...
    for chunk_start in range(0, vocab_size, BLOCK_V):
        offs = chunk_start + offs_v
        in_vocab = offs < vocab_size
        z = tl.load(logits_row + offs, mask=in_vocab, other=0.0).to(tl.float32)
        p_1 = tl.exp((z - run_max) - log_sum_1)
        if TEMP_IS_ONE:
            q_t = p_1
        else:
            q_t = tl.exp((z - run_max) * inv_temperature - log_sum_t)
        grad = ce_coef * p_1 + kl_grad_coef * total_mass * q_t
        if HAS_TAIL:
            grad -= kl_grad_coef * ghost_mass * tl.exp((z - out_shift) * inv_temperature - log_out_sum)
        tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)
    # ... then overwrite S and y. The barrier orders these stores after pass 2's stores of the
    # same addresses by other threads of this program. Duplicate addresses get equal values.
    tl.debug_barrier()
    tl.store(grad_row + safe_ids, grad_s.to(grad_ptr.dtype.element_ty), mask=present)
    tl.store(grad_row + target, grad_y.to(grad_ptr.dtype.element_ty))
