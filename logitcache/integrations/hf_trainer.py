"""Train any Hugging Face causal LM from a logitcache cache with ``transformers.Trainer``.

::

    from transformers import AutoModelForCausalLM, TrainingArguments
    from logitcache import DistillationTrainer, open_dataset

    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained("my-student"),
        args=TrainingArguments("out", bf16=True, gradient_accumulation_steps=4, report_to="none"),
        train_dataset=open_dataset("runs/demo/cache"),
        alpha=0.5, temperature=1.0,
    )
    trainer.train()

What it changes in ``Trainer`` (everything else, TrainingArguments included, is as usual):

* the loss: :func:`~logitcache.pipeline.student.distillation_loss` of the model's logits,
  ``(1 - alpha) * CE + alpha * T**2 * KL(teacher || student)`` per predicted position, exactly the
  loss of `pipe train-student` (logits of position t against token t + 1 and the cache entries of
  position t);
* gradient accumulation and DDP: as transformers normalises its own causal-LM loss. Trainer
  counts the target tokens of all micro-batches of an optimizer step (``num_items_in_batch``,
  over all processes when ``average_tokens_across_devices``); the loss is the *sum* over the
  micro-batch's positions divided by that count (times the number of processes, whose gradients
  DDP averages), so accumulated and distributed steps equal one step on the whole batch;
* the data: the dataset's batches pass through :class:`DistillationCollator` unchanged (the
  teacher columns are not model inputs, so no column is removed), and the training order is
  shuffled by cache chunk (:func:`~logitcache.pipeline.data_order.block_shuffled_order`, keyed
  by ``args.seed`` and the epoch) so that a batch decompresses a few cache chunks, not one per
  window.

Needs ``accelerate`` (as ``Trainer`` itself does): ``pip install "logitcache[hf]"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer

from logitcache.kernels import SparseKDParams
from logitcache.pipeline.data_order import Batch, block_shuffled_order
from logitcache.pipeline.student import distillation_loss
from logitcache.pipeline.student_data import StudentDataset, collate_batches


class DistillationCollator:
    """Trainer's ``data_collator`` for :class:`~logitcache.pipeline.student_data.DistillationDataset`.

    A list of items is stacked; a micro-batch that the dataset read at once (``__getitems__``,
    what the DataLoader calls) is already a batch and passes as it is.
    """

    def __call__(self, features: Sequence[Batch] | Batch) -> Batch:
        return collate_batches(features)


class ChunkShuffleSampler(Sampler[int]):
    """Every window once per epoch, in :func:`block_shuffled_order` (blocks of one cache chunk).

    Keyed by ``seed`` and the epoch (``set_epoch``, which Trainer calls), so every process of a
    DDP run draws the same order and takes its own batches of it.
    """

    def __init__(self, num_windows: int, *, block: int, buffer_blocks: int = 4, seed: int = 0):
        self.num_windows, self.block, self.buffer_blocks, self.seed = num_windows, block, buffer_blocks, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        order = block_shuffled_order(
            self.num_windows, self.seed, self.epoch, block=self.block, buffer_blocks=self.buffer_blocks
        )  # (N,)
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.num_windows


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the sparse distillation loss against a logitcache cache.

    ``alpha``, ``temperature``: ``(1 - alpha) * CE + alpha * T**2 * KL`` (:meth:`SparseKDParams.from_alpha`),
    or ``params`` (a :class:`SparseKDParams`) for full control. ``shuffle_buffer_blocks``: cache
    chunks mixed per shuffle buffer (more: closer to uniform, more chunks in memory); the
    dataset keeps ``cached_chunks`` (default 16) of them, at least ``2 * shuffle_buffer_blocks``.
    Other arguments are Trainer's; ``data_collator`` defaults to :class:`DistillationCollator`.
    """

    def __init__(
        self,
        *args: Any,
        alpha: float = 0.5,
        temperature: float = 1.0,
        params: SparseKDParams | None = None,
        shuffle_buffer_blocks: int = 4,
        **kwargs: Any,
    ):
        kwargs.setdefault("data_collator", DistillationCollator())
        super().__init__(*args, **kwargs)
        self.distill_params = params or SparseKDParams.from_alpha(alpha, temperature=temperature)
        self.shuffle_buffer_blocks = shuffle_buffer_blocks
        # compute_loss normalises by num_items_in_batch itself: Trainer must count the target
        # tokens and pass them, and must not divide the loss by the accumulation steps again.
        self.model_accepts_loss_kwargs = True

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        return data_collator  # teacher_ids/weights/tail are the loss's inputs, not the model's

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler[int] | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, StudentDataset) and dataset.cache_store is not None:
            return ChunkShuffleSampler(
                len(dataset),
                block=dataset.windows_per_chunk,
                buffer_blocks=self.shuffle_buffer_blocks,
                seed=self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        outputs = model(input_ids=inputs["input_ids"])  # logits (B, T, V)
        params = self.distill_params
        if num_items_in_batch is None:  # Trainer divides by the accumulation steps itself
            loss = distillation_loss(outputs.logits, inputs, params)
        elif params.reduction == "mean":
            # sum over this micro-batch / target tokens of the whole step (all micro-batches, and
            # all processes when average_tokens_across_devices): transformers' own normalisation.
            loss = distillation_loss(outputs.logits, inputs, replace(params, reduction="sum"))
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages the processes' gradients
        else:  # "sum" / "batchmean-compat": per micro-batch as configured, averaged over the step
            loss = (
                distillation_loss(outputs.logits, inputs, params) / self.current_gradient_accumulation_steps
            )
        return (loss, outputs) if return_outputs else loss
