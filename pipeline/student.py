"""`pipe train-student`: train the student from the logit cache, from live teachers, or alone.

Modes (``student.mode``, one code path, so that comparisons are fair: same model, initialisation,
data order, optimizer and loop; only the teacher signal differs):

* ``cache`` (default): teacher entries read from ``RUN/cache`` (written by ``pipe cache-logits``);
  loss = the kernel's fused sparse-KL + CE, ``fused_linear_sparse_kd_loss`` on the student's last
  hidden states and output weight, so neither the (B, T, V) student logits (Triton path) nor any
  dense teacher tensor ever exists.
* ``online``: the teachers run at every step (eval mode, no grad, bf16 autocast on CUDA) and give
  full-vocabulary log-probabilities, ensembled by the cache's rule (``cache.ensemble``,
  ``cache.weights``, ``cache.temperature``), as in BabyLlama-2; loss =
  :func:`logitcache.kernels.dense_kd_loss`, the same definition at full vocabulary.
* ``ce``: no teacher; cross-entropy only (``alpha`` is ignored).

The loss of one position with student logits ``z``, target ``y`` (the next token), teacher
distribution ``p`` over ids ``S`` (all ids when online) and ``alpha`` = ``distill.alpha``::

    loss = (1 - alpha) * CE(z, y) + alpha * T^2 * KL(p || softmax(z / T))

(``distill.divergence`` replaces the KL by reverse KL, JSD with ``distill.jsd_beta``, or total
variation: docs/kernels.md; only forward KL with sampled / hybrid caches, refused at config load.)

reduced over the (B, T - 1) predicted positions by ``distill.reduction`` (see docs/kernels.md).
The cache entry of position ``t`` is the teachers' distribution of token ``t + 1``, so entries
``[:, :-1]`` go with targets ``input_ids[:, 1:]``; the last position's entries are not used.
``distill.tail``: ``renormalize`` (top-k weights rescaled to sum to 1) or ``ghost`` (raw top-k
probabilities plus the tail mass as one bucket against the student's mass outside the top-k;
topk caches only: a sampled cache's weights count/n, and a hybrid cache's head probabilities plus
its tail draws' importance weights ``tail * count / m``, already sum to 1 and are used as they are).

Output: ``RUN/students/NAME`` (NAME = ``student.name``, or the mode when empty: ``students/cache``,
``students/online``, ``students/ce``), a Hugging Face model folder with tokenizer,
``metrics.jsonl`` (with the loss's parts ``ce`` and ``kd`` per logged step), ``train_summary.json``, ``checkpoints/`` while training (removed once complete),
``COMPLETE.json`` last.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from logitcache.kernels import (
    SparseKDParams,
    dense_kd_loss,
    fused_linear_sparse_kd_loss,
    resolve_backend,
    sparse_kd_loss,
)
from logitcache.pipeline.config import STUDENT_MODES, Config, student_fingerprint
from logitcache.pipeline.data_order import OrderFn, make_block_order
from logitcache.pipeline.distributed import DistContext, init_distributed
from logitcache.pipeline.errors import ConfigError
from logitcache.pipeline.models import count_parameters, output_vocab_size
from logitcache.pipeline.preflight import (
    StageLock,
    check_writable,
    finish_replacement,
    move_aside,
    replaced_path,
)
from logitcache.pipeline.prepare import PreparedData
from logitcache.pipeline.rundir import RunLayout, is_complete, read_marker, stage_is_done, write_provenance
from logitcache.pipeline.student_data import (
    StudentDataset,
    chunks_per_two_buffers,
    default_block,
    tail_weights,
)
from logitcache.pipeline.teacher_signal import TeacherEnsemble, cache_store, open_student_cache
from logitcache.pipeline.teachers import finalize_model_dir, init_model, remove_checkpoints
from logitcache.pipeline.tracking import TrackedModel
from logitcache.pipeline.training import make_plan, train_model

STUDENT_SEED_OFFSET = 0x5717  # the student's init seed is run.seed + this (teachers: + their name)


# ----------------------------------------------------------------------------------------------
# Names, folders (the fingerprint: pipeline/config.py)


def student_seed(config: Config) -> int:
    """Seed of the student's initialisation and data order: ``student.seed``, else ``run.seed``."""
    return config.student.seed or config.run.seed


def student_name(config: Config) -> str:
    return config.student.name or config.student.mode


def student_dir(config: Config) -> Path:
    return RunLayout.of(config).student(student_name(config))


def is_student_complete(config: Config) -> bool:
    return is_complete(student_dir(config), student_fingerprint(config))


# ----------------------------------------------------------------------------------------------
# Losses


@dataclass(frozen=True)
class LossOptions:
    """The student's loss: its mode and the kernel's options (one validated object for every backend)."""

    mode: str  # "cache" | "online" | "ce"
    params: SparseKDParams  # temperature, ce_weight = 1 - alpha, kl_weight = alpha, reduction

    @classmethod
    def from_config(cls, config: Config) -> LossOptions:
        distill = config.student.distill
        teacher = config.student.mode != "ce"  # mode "ce": no teacher term at all
        params = SparseKDParams.from_alpha(
            distill.alpha if teacher else 0.0,
            temperature=distill.temperature,
            reduction=distill.reduction,
            divergence=distill.divergence if teacher else "forward_kl",
            jsd_beta=distill.jsd_beta,
        )
        return cls(mode=config.student.mode, params=params)


class StudentObjective(torch.nn.Module):
    """The module the loop trains (``wrap`` hook): the student plus its loss; forward(batch) -> loss.

    It owns the student's parameters only (teachers are kept out of ``parameters()``), so DDP
    synchronises exactly the student's gradients. ``forward(batch, with_parts=True)`` returns
    ``{"loss": loss, "ce": ..., "kd": ...}`` instead: the mean CE and the mean divergence per
    predicted position (unweighted, detached; from the same pass as the loss), which the loop logs;
    mode "ce" gives ``ce`` only.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        options: LossOptions,
        teachers: TeacherEnsemble | None = None,
        *,
        vocab_size: int | None = None,
    ):
        super().__init__()
        self.model = model
        self.options = options
        self._teachers = [teachers] if teachers is not None else []  # a list: not a submodule
        # The tokenizer's vocabulary V: output rows beyond it (a padded output layer) take no part in
        # the loss, as the teachers' padded ids take none in their signal. None = every row.
        self.vocab_size = vocab_size

    def forward(
        self, batch: dict[str, torch.Tensor], with_parts: bool = False
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        loss, parts = self._loss_and_parts(batch)
        if not with_parts:
            return loss
        if self.options.mode == "ce":
            return {"loss": loss, "ce": parts[0]}
        return {"loss": loss, "ce": parts[0], "kd": parts[1]}

    def _loss_and_parts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, parts (2,): mean CE, mean divergence per predicted position)."""
        o = self.options
        input_ids = batch["input_ids"]  # (B, T)
        targets = input_ids[:, 1:]  # (B, T-1)
        hidden = self.model.base_model(input_ids=input_ids).last_hidden_state[:, :-1]  # (B, T-1, H)
        weight = self.model.get_output_embeddings().weight[: self.vocab_size]  # (V, H)
        if o.mode == "online":
            logits = F.linear(hidden, weight)  # (B, T-1, V)
            teacher_logp = self._teachers[0].logprobs(input_ids)[:, :-1]  # (B, T-1, V)
            return dense_kd_loss(logits, targets, teacher_logp, return_parts=True, **o.params.keywords())
        triton = resolve_backend("auto", hidden.device) == "triton"
        if o.mode == "ce" and not triton:  # plain CE training, exactly as a user would write it
            logits = F.linear(hidden, weight)  # (B, T-1, V)
            ce_reduction = "sum" if o.params.reduction == "sum" else "mean"
            flat_logits, flat_targets = logits.flatten(0, 1).float(), targets.flatten()
            loss = F.cross_entropy(flat_logits, flat_targets, reduction=ce_reduction)
            mean_ce = loss.detach() if ce_reduction == "mean" else loss.detach() / flat_targets.numel()
            return loss, torch.stack([mean_ce, torch.zeros_like(mean_ce)])
        if o.mode == "ce":  # the same fused kernel with no teacher mass: one zero-weight entry
            ids = targets.unsqueeze(-1)  # (B, T-1, 1)
            weights, tail = torch.zeros(ids.shape, device=ids.device), None
        else:
            ids, weights, tail = batch["teacher_ids"], batch["teacher_weights"], batch.get("teacher_tail")
        dtype = (
            torch.get_autocast_dtype("cuda")
            if hidden.is_cuda and torch.is_autocast_enabled("cuda")
            else hidden.dtype
        )
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_sparse_kd_loss(
                hidden.to(dtype), weight.to(dtype), targets, ids, weights, tail, return_parts=True,
                **o.params.keywords(),
            )  # fmt: skip


def distillation_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], params: SparseKDParams, *, backend: str = "auto"
) -> torch.Tensor:
    """The distillation loss of a batch of :class:`~logitcache.pipeline.student_data.DistillationDataset`.

    ``logits`` (B, T, V): the student's output for ``batch["input_ids"]`` (B, T). Position ``t``
    predicts token ``t + 1``: ``logits[:, :-1]`` go with ``labels[:, 1:]`` (``input_ids[:, 1:]``
    when the batch has no labels; -100 = ignored) and the teacher entries (B, T - 1, k) as read.
    ``params``: the loss options, e.g. ``SparseKDParams.from_alpha(0.5, temperature=2.0)``.
    """
    targets = batch.get("labels", batch["input_ids"])[:, 1:]  # (B, T-1)
    return sparse_kd_loss(
        logits[:, :-1],  # (B, T-1, V)
        targets,
        batch["teacher_ids"],
        batch["teacher_weights"],
        batch.get("teacher_tail"),
        **params.keywords(),
        backend=backend,
    )


def fused_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: dict[str, torch.Tensor],
    params: SparseKDParams,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`distillation_loss` of ``logits = hidden @ weight.T`` without the (B, T, V) logits.

    ``hidden`` (B, T, H): the student's last hidden states (after its final norm) for
    ``batch["input_ids"]``; ``weight`` (V, H): its output projection (``get_output_embeddings()``).
    """
    targets = batch.get("labels", batch["input_ids"])[:, 1:]  # (B, T-1)
    return fused_linear_sparse_kd_loss(
        hidden[:, :-1],  # (B, T-1, H)
        weight,
        targets,
        batch["teacher_ids"],
        batch["teacher_weights"],
        batch.get("teacher_tail"),
        **params.keywords(),
        backend=backend,
    )


def objective_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loop's ``loss_fn``: the (compiled / DDP-wrapped) :class:`StudentObjective` does the work;
    its loss parts (``ce``, ``kd``) are logged beside the loss."""
    return module(batch, with_parts=True)


# ----------------------------------------------------------------------------------------------
# The stage


def _check_loader(config: Config) -> None:
    loader = config.student.loader
    if (
        (loader.workers != "auto" and loader.workers < 0)
        or loader.prefetch_factor < 1
        or loader.shuffle_block < 0
        or loader.shuffle_buffer_blocks < 1
    ):
        raise ConfigError(
            'Expected student.loader.workers >= 0 or "auto", prefetch_factor >= 1, shuffle_block >= 0 and '
            f"shuffle_buffer_blocks >= 1. Got {loader}."
        )


def build_student(config: Config, data: PreparedData) -> PreTrainedModel:
    """The student before training: built from ``student.model`` (sizes, an HF config folder, or its
    pretrained weights), checked against the data (tokenizer, vocabulary, positions) and the loss
    (its logits must be its output layer applied to its last hidden states)."""
    seed = student_seed(config) + STUDENT_SEED_OFFSET
    model = init_model(config.student.model, data, seed=seed, where="student.model")
    check_logits_are_linear(model, where="student.model")
    return model


def check_logits_are_linear(model: PreTrainedModel, *, where: str) -> None:
    """Refuse a model whose logits are not ``last_hidden_state @ output_weight.T``.

    The student's loss (:class:`StudentObjective`) fuses the output projection into the loss, so it
    computes logits from the base model's hidden states and the output weight alone; an architecture
    that scales, soft-caps or biases its logits (Gemma 2's soft-cap, Cohere's logit scale, ...)
    would be trained on other logits than it predicts. Checked once on a few tokens, with the output weight scaled by a
    power of two (exact, undone after) so that the logits are ~100: a soft-cap shows at that size.
    """
    head = model.get_output_embeddings()
    input_ids = torch.arange(4).unsqueeze(0) % output_vocab_size(model)  # (1, 4)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hidden = model.base_model(input_ids=input_ids).last_hidden_state  # (1, 4, H)
        size = float(F.linear(hidden, head.weight).abs().max())
        factor = 2.0 ** round(math.log2(100.0 / size)) if 0 < size < math.inf else 1.0
        head.weight.mul_(factor)  # a tied input embedding is scaled too: hidden is recomputed
        try:
            hidden = model.base_model(input_ids=input_ids).last_hidden_state  # (1, 4, H)
            fused = F.linear(hidden, head.weight).float()  # (1, 4, V)
            logits = model(input_ids=input_ids).logits.float()  # (1, 4, V)
        finally:
            head.weight.div_(factor)
    model.train(was_training)
    scale = float(fused.abs().max()) + 1e-6
    if getattr(head, "bias", None) is not None or float((logits - fused).abs().max()) > 1e-4 * scale:
        raise ConfigError(
            f"Expected {where} to compute its logits as its output layer applied to its last hidden states "
            f"(the fused loss needs that). Got a {type(model).__name__}, which transforms them (bias, scaling "
            "or soft-capping): choose another architecture."
        )


def make_dataset(config: Config, data: PreparedData, windows: Any) -> StudentDataset:
    """The student's training data: ``windows`` (N, T) and, in cache mode, their cache rows."""
    student = config.student
    if student.mode != "cache":
        return StudentDataset(windows, None)
    reader = open_student_cache(config, data)
    weights = tail_weights(student.distill.tail, reader.metadata.mode)
    cached_chunks = chunks_per_two_buffers(
        block=_shuffle_block(config, windows.shape[0], windows.shape[1]),
        buffer_blocks=student.loader.shuffle_buffer_blocks,
        windows_per_chunk=reader.layout.windows_per_chunk,
    )
    return StudentDataset(windows, cache_store(config), weights, cached_chunks=cached_chunks)


def make_order(config: Config, num_windows: int, seq_len: int) -> OrderFn:
    """The student's epoch order: block-shuffled by ``student.loader.shuffle_*`` (keeps reads chunk-local)."""
    block = _shuffle_block(config, num_windows, seq_len)
    return make_block_order(block=block, buffer_blocks=config.student.loader.shuffle_buffer_blocks)


def _shuffle_block(config: Config, num_windows: int, seq_len: int) -> int:
    return config.student.loader.shuffle_block or default_block(num_windows, seq_len, config.cache.width)


def train_student(
    config: Config,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    ctx: DistContext | None = None,
) -> Path:
    """Train the student of ``config`` (mode ``student.mode``), resuming if interrupted; return its folder.

    Everything is checked before anything is created, moved or deleted: the config (at load), that
    the output folder can be written, the prepared data, the model, the teachers (online) or the
    cache (cache mode: its integrity, data and settings), the batch plan. Then the output folder is
    locked (one process per student; :class:`~logitcache.pipeline.preflight.StageLock`), and
    ``overwrite`` moves an existing folder to ``NAME.replaced``, deleted only once the new student
    is complete.
    """
    if config.student.mode not in STUDENT_MODES:
        raise ConfigError(f"Expected student.mode in {STUDENT_MODES}. Got {config.student.mode!r}.")
    _check_loader(config)
    out = student_dir(config)
    aside = replaced_path(out)
    what = f"the student '{student_name(config)}'"
    fingerprint = student_fingerprint(config)
    if stage_is_done(out, fingerprint, overwrite=overwrite, what=f"a student '{student_name(config)}'"):
        shutil.rmtree(aside, ignore_errors=True)  # an earlier --overwrite finished all but its cleanup
        remove_checkpoints(out)  # left by a crash between the marker and their removal
        return out
    check_writable(out, what)
    ctx = ctx or init_distributed(config.run.device)
    data = PreparedData.open(RunLayout.of(config).data)
    model = build_student(config, data)  # refused here, before --overwrite moves anything
    windows = data.windows("train")  # (N, T) stored dtype; rows = cache rows
    dev_windows = torch.from_numpy(data.windows("dev").astype("int64"))  # (N_dev, T)
    train = config.student.train
    make_plan(train, windows.shape[0], ctx.world_size)  # a batch that does not fit: refused now
    options = LossOptions.from_config(config)
    teachers = TeacherEnsemble.load(config, data, ctx.device) if options.mode == "online" else None
    dataset = make_dataset(config, data, windows)

    with StageLock(out, what, enabled=ctx.is_main):
        if ctx.is_main:
            if overwrite:
                move_aside(out, aside, is_complete=read_marker(out) is not None)
            out.mkdir(parents=True, exist_ok=True)
            write_provenance(
                out, config, "train-student",
                {"student": student_name(config), "mode": options.mode, "parameters": count_parameters(model)},
            )  # fmt: skip
        ctx.barrier()
        summary = train_model(
            model,
            train=train,
            dataset=dataset,
            seq_len=data.seq_len,
            loss_fn=objective_loss,
            dev_windows=dev_windows,
            out_dir=out,
            seed=student_seed(config),
            fingerprint=fingerprint,
            ctx=ctx,
            progress=progress,
            desc=f"student {student_name(config)}",
            order=make_order(config, windows.shape[0], data.seq_len),
            workers=config.student.loader.workers,
            prefetch_factor=config.student.loader.prefetch_factor,
            report_to=config.run.report_to,
            tracked=TrackedModel(RunLayout.of(config).root, "students", student_name(config)),
            wrap=lambda m: StudentObjective(m, options, teachers, vocab_size=data.vocab_size),
        )
        summary |= {"mode": options.mode, "parameters": count_parameters(model)}
        if ctx.is_main:
            finalize_model_dir(out, model, data, summary, fingerprint)
            finish_replacement(aside)  # the new student is complete: only now the old one goes
        ctx.barrier()
    return out
