"""Sparse-KD loss: reference against independent definitions, both backends against the reference.

The two backends are the Triton kernel and the closed-form chunked torch backend (CPU). On CPU
the Triton kernel runs under TRITON_INTERPRET=1 on small shapes (N in {1, 7, 33}, V in {17, 100,
300}, k in {1, 5, V-1}); the same checks at full size live in test_kernels_gpu.py.

Tolerances (see logitcache.kernels.testing.assert_within_naive): in fp32 a backend is compared with
the float64 reference and may be at most 2x as far from it as the fp32 reference is, plus 8 fp32
ulps of the largest value. The torch backend in float64 is held to 1e-10 against the float64
reference (see below). Float64-vs-float64 checks of two exact formulas use
1e-10 (rounding of O(1) sums over <= 300 terms is ~1e-14; 1e-10 leaves room without hiding a
wrong term, which would be >= 1e-4 here).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # The Triton interpreter is chosen when triton is first imported: set it before anything does.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from logitcache.kernels import (
    BACKEND_ENV_VAR,
    resolve_backend,
    sparse_kd_grad_reference,
    sparse_kd_loss,
    sparse_kd_loss_reference,
)
from logitcache.kernels._common import OUT_SHARE_MIN
from logitcache.kernels.errors import KernelError
from logitcache.kernels.testing import IGNORE, MODES, assert_within_naive, make_case

# (N, V, k): an odd V (17) with k = V - 1, a single position with k = 1, a middle shape
SHAPES = [(7, 100, 5), (33, 17, 16), (1, 300, 1)]


@pytest.fixture(autouse=True)
def _interpret_triton_on_cpu(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)


def _tail_arg(case, dtype=torch.float64):
    return None if case.tail is None else case.tail.to(dtype)


# ---------------------------------------------------------------------------------------------
# The reference against independent definitions
# ---------------------------------------------------------------------------------------------


def _bucket_loss_loop(case, *, temperature, ce_weight, kl_weight, reduction, batch):
    """Independent per-position definition: F.cross_entropy + KL over the k (+1 ghost) buckets,
    the student's ghost bucket as 1 - sum (fine in float64 for these tame logits)."""
    ce_sum, kl_sum, n_valid = 0.0, 0.0, 0
    for row in range(case.logits.shape[0]):
        if int(case.targets[row]) == IGNORE:
            continue
        n_valid += 1
        z = case.logits[row]
        ce_sum += float(F.cross_entropy(z[None], case.targets[row : row + 1]))
        q = torch.softmax(z / temperature, dim=-1)
        keep = case.ids[row] >= 0
        teacher = case.weights[row][keep]
        student = q[case.ids[row][keep]]
        if case.tail is not None:
            teacher = torch.cat([teacher, case.tail[row : row + 1]])
            student = torch.cat([student, (1 - student.sum()).reshape(1)])
        pos = teacher > 0
        kl_sum += float((teacher[pos] * (teacher[pos].log() - student[pos].log())).sum())
    ce_div = max(n_valid, 1) if reduction != "sum" else 1
    kl_div = {"mean": max(n_valid, 1), "sum": 1, "batchmean-compat": batch}[reduction]
    return ce_weight * ce_sum / ce_div + kl_weight * temperature**2 * kl_sum / kl_div


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean-compat"])
def test_reference_matches_bucket_definition(mode, temperature, reduction):
    case = make_case(7, 40, 5, mode, seed=1)
    got = sparse_kd_loss_reference(
        case.logits,
        case.targets,
        case.ids,
        case.weights,
        case.tail,
        temperature=temperature,
        ce_weight=0.3,
        kl_weight=0.7,
        reduction=reduction,
    )
    want = _bucket_loss_loop(
        case, temperature=temperature, ce_weight=0.3, kl_weight=0.7, reduction=reduction, batch=7
    )
    assert abs(float(got) - want) <= 1e-10 * max(1.0, abs(want))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_batchmean_compat_matches_babyllama(temperature):
    """With the full teacher distribution (k = V) and no ignored position, batchmean-compat equals
    BabyLlama's alpha * CE + (1 - alpha) * T^2 * KLDivLoss(batchmean) on (B, T, V) logits."""
    gen = torch.Generator().manual_seed(3)
    batch, seq, vocab, alpha = 2, 5, 13, 0.4
    student = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64)
    teacher = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    ids = torch.arange(vocab).expand(batch, seq, vocab)
    weights = torch.softmax(teacher / temperature, dim=-1)
    ours = sparse_kd_loss_reference(
        student,
        targets,
        ids,
        weights,
        temperature=temperature,
        ce_weight=alpha,
        kl_weight=1 - alpha,
        reduction="batchmean-compat",
    )
    kl = torch.nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1)
    )
    babyllama = (
        alpha * F.cross_entropy(student.reshape(-1, vocab), targets.reshape(-1))
        + (1 - alpha) * kl * temperature**2
    )
    assert abs(float(ours) - float(babyllama)) <= 1e-10


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reference_gradcheck_and_closed_form(mode, temperature):
    case = make_case(4, 9, 3, mode, seed=2, scale=1.0)
    kwargs = dict(temperature=temperature, ce_weight=0.4, kl_weight=0.6)
    logits = case.logits.clone().requires_grad_()

    def loss_fn(z):
        return sparse_kd_loss_reference(z, case.targets, case.ids, case.weights, case.tail, **kwargs)

    assert torch.autograd.gradcheck(loss_fn, (logits,))
    (autograd_grad,) = torch.autograd.grad(loss_fn(logits), logits)
    closed = sparse_kd_grad_reference(case.logits, case.targets, case.ids, case.weights, case.tail, **kwargs)
    assert float((closed - autograd_grad).abs().max()) <= 1e-10


def test_reference_all_ignored_is_zero_with_zero_grad():
    case = make_case(4, 9, 3, "ghost", seed=4)
    targets = torch.full_like(case.targets, IGNORE)
    logits = case.logits.clone().requires_grad_()
    for reduction in ("mean", "sum", "batchmean-compat"):
        loss = sparse_kd_loss_reference(
            logits, targets, case.ids, case.weights, case.tail, reduction=reduction
        )
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and grad.abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------
# Both backends (Triton in the interpreter on CPU; the chunked torch backend) against the reference
# ---------------------------------------------------------------------------------------------

BACKENDS = ["triton", "torch"]


def _check_backend(case, backend="triton", *, grad_scale=1.0, block_v=None, inplace=False, **kwargs):
    """A backend in fp32 vs float64 truth, bounded by the fp32 reference's own error."""
    exact_in = case.logits.clone().requires_grad_()
    exact = sparse_kd_loss_reference(exact_in, case.targets, case.ids, case.weights, case.tail, **kwargs)
    (exact * grad_scale).backward()

    naive_in = case.logits.float().requires_grad_()
    naive = sparse_kd_loss_reference(
        naive_in, case.targets, case.ids, case.weights.float(), _tail_arg(case, torch.float32), **kwargs
    )
    (naive * grad_scale).backward()

    ours_in = case.logits.float().requires_grad_()
    buffer = ours_in.detach().clone() if inplace else ours_in
    ours = sparse_kd_loss(
        buffer.requires_grad_() if inplace else ours_in,
        case.targets,
        case.ids,
        case.weights.float(),
        _tail_arg(case, torch.float32),
        backend=backend,
        block_v=block_v,
        inplace_grad=inplace,
        **kwargs,
    )
    (ours * grad_scale).backward()
    ours_grad = buffer.grad if inplace else ours_in.grad
    assert ours.dtype == torch.float32
    assert_within_naive(ours.detach(), exact.detach(), naive.detach(), "loss")
    assert_within_naive(ours_grad, exact_in.grad, naive_in.grad, "grad")
    return ours_grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}V{}k{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, mode, temperature, shape):
    n, vocab, k = shape
    case = make_case(n, vocab, k, mode, seed=hash((mode, shape)) % 1000)
    _check_backend(case, backend, temperature=temperature, grad_scale=0.75)


@pytest.mark.parametrize("mode", ["topk", "ghost"])
@pytest.mark.parametrize("reduction", ["sum", "batchmean-compat"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_multi_chunk_and_reductions(backend, mode, reduction):
    """block_v=32 forces several vocab chunks (V=100 is not a multiple of 32) and the online lse."""
    case = make_case(7, 100, 9, mode, seed=5)
    _check_backend(
        case, backend, block_v=32, temperature=2.0, reduction=reduction, ce_weight=0.2, kl_weight=0.8
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_extreme_logits_and_zero_weights(backend, temperature):
    case = make_case(7, 100, 5, "ghost", seed=6)
    case.logits[:, ::3] = 1e4
    case.logits[:, 1::3] = -1e4
    case.weights[:, 0] = 0.0  # zero-weight entries stay in S
    case.tail[3] = 0.0
    _check_backend(case, backend, block_v=32, temperature=temperature)


# Outside shares (the student's mass at T outside the cached ids) around the kernel's switch from
# "row sum minus S's sum" to a direct outside sum (OUT_SHARE_MIN = 1/16), and far below it.
OUTSIDE_SHARES = [0.9, 0.5, 1.02 / 16, 0.98 / 16, 1e-3, 1e-6]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ghost_outside_sum_on_both_sides_of_the_direct_sum_switch(backend, temperature, divergence):
    """Rows whose cached ids hold from 10 % to nearly all of the student's mass, in one batch: the
    Triton kernel subtracts in the first rows and sums directly in the last (where subtracting
    would cancel: the ghost term would be off by orders of magnitude); both match the reference."""
    assert OUT_SHARE_MIN == 1.0 / 16.0  # the shares above straddle it
    vocab, k = 96, 8
    case = make_case(len(OUTSIDE_SHARES), vocab, k, "ghost", seed=11, ignore_every=0)
    noise = torch.randn(case.logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for row, share in enumerate(OUTSIDE_SHARES):
        # S's logits at a, the others near 0: share = (V - k) / ((V - k) + k exp(a / T)), about
        a = temperature * math.log((vocab - k) * (1.0 - share) / (k * share))
        case.logits[row] = 0.01 * noise[row]
        case.logits[row, case.ids[row]] += a
    _check_backend(case, backend, temperature=temperature, divergence=divergence)


def test_triton_sorted_and_unsorted_ids_agree():
    unsorted = make_case(7, 100, 8, "ghost", seed=7)
    sorted_ = make_case(7, 100, 8, "ghost", seed=7, sort_ids=True)
    assert not torch.equal(unsorted.ids, sorted_.ids)
    grads = [_check_backend(c, temperature=2.0) for c in (unsorted, sorted_)]
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_all_ignored_and_grad_output(backend):
    case = make_case(7, 17, 3, "ghost", seed=8)
    case.targets[:] = IGNORE
    for reduction in ("mean", "sum"):
        logits = case.logits.float().requires_grad_()
        loss = sparse_kd_loss(
            logits, case.targets, case.ids, case.weights.float(), case.tail.float(), backend=backend,
            reduction=reduction,
        )  # fmt: skip
        (loss * 3.0).backward()
        assert loss.item() == 0.0 and logits.grad.abs().max().item() == 0.0


def test_triton_inplace_matches_out_of_place():
    case = make_case(7, 100, 5, "ghost", seed=9)
    _check_backend(case, inplace=True, temperature=2.0, grad_scale=2.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_all_of_vocab_in_s(backend):
    """k = V: nothing outside S. With a zero tail the bucket contributes nothing and stays finite."""
    case = make_case(7, 17, 17, "ghost", seed=10)
    case.weights = case.weights / case.weights.sum(dim=1, keepdim=True)
    case.tail = torch.zeros_like(case.tail)
    _check_backend(case, backend, temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_ids_give_the_merged_gradient(backend):
    """Documented behaviour: duplicated ids act as one entry with the summed weight for the gradient."""
    case = make_case(7, 30, 4, "ghost", seed=11)
    dup_ids = torch.cat([case.ids, case.ids[:, :1]], dim=1)  # (N, 5): id 0 repeated
    half = case.weights[:, :1] / 2
    dup_weights = torch.cat([half, case.weights[:, 1:], half], dim=1)
    merged = sparse_kd_grad_reference(case.logits, case.targets, case.ids, case.weights, case.tail)
    ref_logits = case.logits.clone().requires_grad_()
    sparse_kd_loss_reference(ref_logits, case.targets, dup_ids, dup_weights, case.tail).backward()
    assert float((ref_logits.grad - merged).abs().max()) <= 1e-10
    ours = case.logits.float().requires_grad_()
    sparse_kd_loss(
        ours, case.targets, dup_ids, dup_weights.float(), case.tail.float(), backend=backend
    ).backward()
    assert float((ours.grad.double() - merged).abs().max()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_dim_logits_batchmean_compat(backend):
    case = make_case(12, 17, 4, "sampled", seed=12)
    shaped = dict(
        logits=case.logits.reshape(3, 4, 17),
        targets=case.targets.reshape(3, 4),
        ids=case.ids.reshape(3, 4, 4),
        weights=case.weights.reshape(3, 4, 4),
    )
    want = sparse_kd_loss_reference(
        shaped["logits"], shaped["targets"], shaped["ids"], shaped["weights"], reduction="batchmean-compat"
    )
    got = sparse_kd_loss(
        shaped["logits"].float(),
        shaped["targets"],
        shaped["ids"],
        shaped["weights"].float(),
        reduction="batchmean-compat",
        backend=backend,
    )
    assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_torch_compile_has_no_graph_break(backend):
    case = make_case(7, 17, 3, "ghost", seed=13)
    weight = torch.randn(17, 8, dtype=torch.float32, requires_grad=True)
    hidden = torch.randn(7, 8, dtype=torch.float32)

    def step(hidden, weight):
        logits = hidden @ weight.t()
        return sparse_kd_loss(
            logits,
            case.targets,
            case.ids,
            case.weights.float(),
            case.tail.float(),
            temperature=2.0,
            backend=backend,
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(hidden, weight)
    loss.backward()
    grad_compiled = weight.grad.clone()
    weight.grad = None
    step(hidden, weight).backward()
    assert float((grad_compiled - weight.grad).abs().max()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_passes_opcheck(backend):
    case = make_case(3, 17, 3, "ghost", seed=14)
    logits = case.logits.float().requires_grad_()
    args = (
        logits,
        case.targets,
        case.ids,
        case.weights.float(),
        case.tail.float(),
        2.0,
        0.5,
        0.5,
        IGNORE,
        "mean",
        3,
        "forward_kl",
        0.5,
        0,
        backend,
    )
    torch.library.opcheck(
        torch.ops.logitcache.sparse_kd_loss.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


# ---------------------------------------------------------------------------------------------
# Backend selection and input errors
# ---------------------------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("triton", cpu) == "triton"  # keyword beats env (interpreter is on)
    monkeypatch.setenv(BACKEND_ENV_VAR, "nonsense")
    with pytest.raises(KernelError):
        resolve_backend("auto", cpu)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(KernelError):
        resolve_backend("triton", cpu)
    with pytest.raises(KernelError):
        resolve_backend("cuda", cpu)


def test_auto_backend_on_cpu_is_the_torch_backend():
    case = make_case(7, 17, 3, "topk", seed=15)
    got = sparse_kd_loss(case.logits, case.targets, case.ids, case.weights)
    want = sparse_kd_loss_reference(case.logits, case.targets, case.ids, case.weights)
    assert got.dtype == torch.float64 and abs(float(got) - float(want)) <= 1e-12


def test_input_errors():
    case = make_case(7, 17, 3, "topk", seed=16)
    with pytest.raises(KernelError):
        sparse_kd_loss(case.logits, case.targets[:-1], case.ids, case.weights)
    with pytest.raises(KernelError):
        sparse_kd_loss(case.logits, case.targets, case.ids, case.weights[:, :2])
    with pytest.raises(KernelError):
        sparse_kd_loss(case.logits, case.targets, case.ids.double(), case.weights)
    with pytest.raises(KernelError):
        sparse_kd_loss(case.logits, case.targets, case.ids, case.weights, reduction="batchmean")
    with pytest.raises(KernelError):
        sparse_kd_loss(case.logits, case.targets, case.ids, case.weights, temperature=0.0)
    bad_targets = case.targets.clone()
    bad_targets[1] = 17
    with pytest.raises(KernelError):
        sparse_kd_loss(case.logits, bad_targets, case.ids, case.weights, backend="torch")
    bad_ids = case.ids.clone()
    bad_ids[0, 0] = 17
    with pytest.raises(KernelError):
        sparse_kd_loss(case.logits, case.targets, bad_ids, case.weights, backend="torch")


# ---------------------------------------------------------------------------------------------
# The closed-form chunked torch backend in float64: exact formulas, so 1e-10 (see the top)
# ---------------------------------------------------------------------------------------------


def _forward_chunked(case, rows_per_chunk, **kwargs):
    """The torch backend's forward on 2-D inputs with a chosen chunk size: (loss, gradient)."""
    from logitcache.kernels._common import make_params
    from logitcache.kernels.sparse_kd import sparse_kd_forward_chunked

    params = make_params(case.logits.shape, **({"ignore_index": IGNORE} | kwargs))
    grad = torch.empty_like(case.logits)
    rows, _ = sparse_kd_forward_chunked(
        case.logits, case.targets, case.ids, case.weights, case.tail, params, grad_out=grad,
        rows_per_chunk=rows_per_chunk,
    )  # fmt: skip
    return rows.sum(), grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean-compat"])
def test_torch_backend_float64_matches_reference(mode, temperature, reduction):
    """Loss and gradient of every mode against the reference's value and autograd gradient."""
    case = make_case(33, 100, 7, mode, seed=hash((mode, reduction)) % 997)
    kwargs = dict(temperature=temperature, ce_weight=0.3, kl_weight=0.7, reduction=reduction)
    ref_in = case.logits.clone().requires_grad_()
    want = sparse_kd_loss_reference(ref_in, case.targets, case.ids, case.weights, case.tail, **kwargs)
    want.backward()
    for rows_per_chunk in (None, 1, 5):  # one chunk, one row per chunk, a ragged last chunk
        loss, grad = _forward_chunked(case, rows_per_chunk, **kwargs)
        assert loss.dtype == torch.float64
        assert abs(float(loss) - float(want.detach())) <= 1e-10 * max(1.0, abs(float(want.detach())))
        assert float((grad - ref_in.grad).abs().max()) <= 1e-10


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)])
def test_torch_backend_ce_only_and_kl_only(weights):
    """alpha = 0 (CE only) and alpha = 1 (no CE term): the folded coefficients must still be right."""
    case = make_case(9, 50, 4, "ghost", seed=21)
    kwargs = dict(ce_weight=weights[0], kl_weight=weights[1], temperature=1.0)
    ref_in = case.logits.clone().requires_grad_()
    sparse_kd_loss_reference(ref_in, case.targets, case.ids, case.weights, case.tail, **kwargs).backward()
    ours_in = case.logits.clone().requires_grad_()
    sparse_kd_loss(
        ours_in, case.targets, case.ids, case.weights, case.tail, backend="torch", **kwargs
    ).backward()
    assert float((ours_in.grad - ref_in.grad).abs().max()) <= 1e-10
    if weights == (1.0, 0.0):  # CE only is F.cross_entropy (an independent definition)
        valid = case.targets != IGNORE
        want = F.cross_entropy(case.logits[valid], case.targets[valid])
        got = sparse_kd_loss(case.logits, case.targets, case.ids, case.weights, backend="torch", **kwargs)
        assert abs(float(got) - float(want)) <= 1e-12


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_torch_backend_log_space_fallback_rows(temperature):
    """Rows whose outside mass underflows (student sure of S, teacher tail > 0), rows whose ids are
    all padding, and rows with nothing outside S take the log-space path: still the reference."""
    case = make_case(6, 40, 39, "ghost", seed=22)
    case.logits[0] = -200.0
    case.logits[0, case.ids[0]] = 200.0  # q_out ~ exp(-400): tiny, but the direct float64 sum holds it
    case.logits[1] = -1e4
    case.logits[1, case.ids[1]] = 1e4  # q_out underflows in float64 too
    case.ids[2] = -1  # every id is padding: S is empty, the bucket is the whole vocabulary
    case.weights[2] = 0.0
    case.tail[2] = 1.0
    case.targets[2] = 3
    ref_in = case.logits.clone().requires_grad_()
    kwargs = dict(temperature=temperature)
    want = sparse_kd_loss_reference(ref_in, case.targets, case.ids, case.weights, case.tail, **kwargs)
    want.backward()
    ours_in = case.logits.clone().requires_grad_()
    got = sparse_kd_loss(ours_in, case.targets, case.ids, case.weights, case.tail, backend="torch", **kwargs)
    got.backward()
    got, want = got.detach(), want.detach()
    assert torch.isfinite(want) and abs(float(got) - float(want)) <= 1e-10 * abs(float(want))
    assert float((ours_in.grad - ref_in.grad).abs().max()) <= 1e-10


def test_torch_backend_int32_ids_bf16_logits():
    """What the cache reader hands over (int32 ids, float32 weights); bf16 logits computed in fp32."""
    case = make_case(16, 64, 6, "ghost", seed=23)
    logits = case.logits.to(torch.bfloat16)
    want_in = logits.float().requires_grad_()
    want = sparse_kd_loss(
        want_in, case.targets, case.ids, case.weights.float(), case.tail.float(), backend="torch"
    )
    want.backward()
    ours_in = logits.clone().requires_grad_()
    got = sparse_kd_loss(
        ours_in, case.targets.int(), case.ids.int(), case.weights.float(), case.tail.float(), backend="torch"
    )
    got.backward()
    assert got.dtype == torch.float32 and float(got.detach()) == float(want.detach())
    assert ours_in.grad.dtype == torch.bfloat16
    assert torch.equal(ours_in.grad, want_in.grad.to(torch.bfloat16))


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean-compat"])
def test_dense_kd_loss_is_the_reference_with_every_id(reduction):
    """The online mode's loss: a dense teacher is the sparse reference with S = the whole vocabulary
    ((B, T, V) logits, so batchmean-compat divides the KL by B = 3)."""
    from logitcache.kernels import dense_kd_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, 0] = IGNORE
    teacher = torch.log_softmax(torch.randn(3, 5, 11, dtype=torch.float64) * 3, -1)
    ids = torch.arange(11).expand(3, 5, 11)
    for temperature in (1.0, 2.0):
        kwargs = dict(temperature=temperature, ce_weight=0.25, kl_weight=0.75, reduction=reduction)
        got = dense_kd_loss(logits, targets, teacher, **kwargs)
        want = sparse_kd_loss_reference(logits, targets, ids, teacher.exp(), **kwargs)
        assert abs(float(got) - float(want)) <= 1e-10 * max(1.0, abs(float(want)))


def test_params_object_validates_and_maps_alpha():
    from logitcache.kernels import SparseKDParams

    params = SparseKDParams.from_alpha(0.25, temperature=2.0, reduction="sum")
    assert (params.ce_weight, params.kl_weight, params.temperature) == (0.75, 0.25, 2.0)
    assert params.for_shape((4, 5, 6)).kl_batch_div == 4 and params.for_shape((6,)).kl_batch_div == 1
    case = make_case(7, 17, 3, "topk", seed=25)
    via_params = sparse_kd_loss(case.logits, case.targets, case.ids, case.weights, **params.keywords())
    via_keywords = sparse_kd_loss(
        case.logits, case.targets, case.ids, case.weights, temperature=2.0, ce_weight=0.75, kl_weight=0.25,
        reduction="sum",
    )  # fmt: skip
    assert float(via_params) == float(via_keywords)
    for bad in (dict(alpha=1.5), dict(alpha=-0.1)):
        with pytest.raises(KernelError):
            SparseKDParams.from_alpha(**bad)
    with pytest.raises(KernelError):
        SparseKDParams(ce_weight=-1.0)
    assert issubclass(KernelError, ValueError)
