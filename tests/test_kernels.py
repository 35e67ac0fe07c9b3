"""Sparse-KD loss: reference against independent definitions, Triton kernel against the reference.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 on small shapes (N in {1, 7, 33},
V in {17, 100, 300}, k in {1, 5, V-1}); the same checks at full size live in test_kernels_gpu.py.

Tolerances (see logitcache.kernels.testing.assert_within_naive): the kernel computes in fp32, so it
is compared with the float64 reference and may be at most 2x as far from it as the fp32 reference
is, plus 8 fp32 ulps of the largest value. Float64-vs-float64 checks of two exact formulas use
1e-10 (rounding of O(1) sums over <= 300 terms is ~1e-14; 1e-10 leaves room without hiding a
wrong term, which would be >= 1e-4 here).
"""

from __future__ import annotations

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
from logitcache.kernels.testing import IGNORE, MODES, assert_within_naive, make_case
from logitcache.pipeline.errors import ConfigError, DataError

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
# Triton kernel (interpreter on CPU) against the reference
# ---------------------------------------------------------------------------------------------


def _check_triton(case, *, grad_scale=1.0, block_v=None, inplace=False, **kwargs):
    """Triton fp32 vs float64 truth, bounded by the fp32 reference's own error."""
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
        backend="triton",
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
def test_triton_matches_reference(mode, temperature, shape):
    n, vocab, k = shape
    case = make_case(n, vocab, k, mode, seed=hash((mode, shape)) % 1000)
    _check_triton(case, temperature=temperature, grad_scale=0.75)


@pytest.mark.parametrize("mode", ["topk", "ghost"])
@pytest.mark.parametrize("reduction", ["sum", "batchmean-compat"])
def test_triton_multi_chunk_and_reductions(mode, reduction):
    """block_v=32 forces several vocab chunks (V=100 is not a multiple of 32) and the online lse."""
    case = make_case(7, 100, 9, mode, seed=5)
    _check_triton(case, block_v=32, temperature=2.0, reduction=reduction, ce_weight=0.2, kl_weight=0.8)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_triton_extreme_logits_and_zero_weights(temperature):
    case = make_case(7, 100, 5, "ghost", seed=6)
    case.logits[:, ::3] = 1e4
    case.logits[:, 1::3] = -1e4
    case.weights[:, 0] = 0.0  # zero-weight entries stay in S
    case.tail[3] = 0.0
    _check_triton(case, block_v=32, temperature=temperature)


def test_triton_sorted_and_unsorted_ids_agree():
    unsorted = make_case(7, 100, 8, "ghost", seed=7)
    sorted_ = make_case(7, 100, 8, "ghost", seed=7, sort_ids=True)
    assert not torch.equal(unsorted.ids, sorted_.ids)
    grads = [_check_triton(c, temperature=2.0) for c in (unsorted, sorted_)]
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-6


def test_triton_all_ignored_and_grad_output():
    case = make_case(7, 17, 3, "topk", seed=8)
    case.targets[:] = IGNORE
    for reduction in ("mean", "sum"):
        logits = case.logits.float().requires_grad_()
        loss = sparse_kd_loss(
            logits, case.targets, case.ids, case.weights.float(), backend="triton", reduction=reduction
        )
        (loss * 3.0).backward()
        assert loss.item() == 0.0 and logits.grad.abs().max().item() == 0.0


def test_triton_inplace_matches_out_of_place():
    case = make_case(7, 100, 5, "ghost", seed=9)
    _check_triton(case, inplace=True, temperature=2.0, grad_scale=2.5)


def test_triton_all_of_vocab_in_s():
    """k = V: nothing outside S. With a zero tail the bucket contributes nothing and stays finite."""
    case = make_case(7, 17, 17, "ghost", seed=10)
    case.weights = case.weights / case.weights.sum(dim=1, keepdim=True)
    case.tail = torch.zeros_like(case.tail)
    _check_triton(case, temperature=2.0)


def test_duplicate_ids_give_the_merged_gradient():
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
        ours, case.targets, dup_ids, dup_weights.float(), case.tail.float(), backend="triton"
    ).backward()
    assert float((ours.grad.double() - merged).abs().max()) <= 1e-6


def test_triton_three_dim_logits_batchmean_compat():
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
        backend="triton",
    )
    assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))


def test_triton_under_torch_compile_has_no_graph_break():
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
            backend="triton",
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(hidden, weight)
    loss.backward()
    grad_compiled = weight.grad.clone()
    weight.grad = None
    step(hidden, weight).backward()
    assert float((grad_compiled - weight.grad).abs().max()) <= 1e-6


def test_custom_op_passes_opcheck():
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
        0,
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
    with pytest.raises(ConfigError):
        resolve_backend("auto", cpu)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError):
        resolve_backend("triton", cpu)
    with pytest.raises(ConfigError):
        resolve_backend("cuda", cpu)


def test_auto_backend_on_cpu_is_the_reference():
    case = make_case(7, 17, 3, "topk", seed=15)
    got = sparse_kd_loss(case.logits, case.targets, case.ids, case.weights)
    want = sparse_kd_loss_reference(case.logits, case.targets, case.ids, case.weights)
    assert got.dtype == torch.float64 and float(got) == float(want)


def test_input_errors():
    case = make_case(7, 17, 3, "topk", seed=16)
    with pytest.raises(DataError):
        sparse_kd_loss(case.logits, case.targets[:-1], case.ids, case.weights)
    with pytest.raises(DataError):
        sparse_kd_loss(case.logits, case.targets, case.ids, case.weights[:, :2])
    with pytest.raises(DataError):
        sparse_kd_loss(case.logits, case.targets, case.ids.double(), case.weights)
    with pytest.raises(ConfigError):
        sparse_kd_loss(case.logits, case.targets, case.ids, case.weights, reduction="batchmean")
    with pytest.raises(ConfigError):
        sparse_kd_loss(case.logits, case.targets, case.ids, case.weights, temperature=0.0)
    bad_targets = case.targets.clone()
    bad_targets[1] = 17
    with pytest.raises(DataError):
        sparse_kd_loss(case.logits, bad_targets, case.ids, case.weights, backend="torch")
    bad_ids = case.ids.clone()
    bad_ids[0, 0] = 17
    with pytest.raises(DataError):
        sparse_kd_loss(case.logits, case.targets, bad_ids, case.weights, backend="torch")
