"""The training loop shared by teachers and students; only the dataset, the order and the loss vary.

What it does, in order: AdamW (no decay on biases and norms), linear warmup then cosine (or
linear/constant) decay, gradient accumulation, clipping, bf16 autocast on CUDA (fp32 on CPU),
DDP under torchrun, a dev-loss evaluation at each epoch end, JSONL metrics, and checkpoints that
hold everything needed to continue exactly: model (safetensors), optimizer state (safetensors +
JSON), scheduler, RNG states and the data position.

The loop owns the data order, a function of (seed, epoch) only: epoch ``e`` visits the training
windows in ``order(N, seed, e)`` (teachers: :func:`~logitcache.pipeline.data_order.epoch_order`,
a ``torch.randperm``; students: a block-shuffled order, see pipeline/data_order.py); optimizer
step ``s`` of the epoch takes windows ``perm[s*B:(s+1)*B]`` (the global batch ``B``), rank ``r``
of ``W`` takes the ``r``-th contiguous slice of it, and each rank splits its slice into
``grad_accum_steps`` micro-batches. A :class:`~logitcache.pipeline.data_order.MicroBatchSampler`
keyed by (seed, epoch, rank) yields exactly these micro-batches from the step the loop is at, and
a DataLoader over the dataset reads them (one ``__getitems__`` call per micro-batch). Every window
has the same number of target tokens, so the mean of per-micro-batch mean losses, averaged over
ranks by DDP, equals the mean over the global batch: one rank and many ranks compute the same
update, and a resumed run the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from transformers import PreTrainedModel

from logitcache.pipeline.config import TrainConfig
from logitcache.pipeline.data_order import (
    Batch,
    BatchGeometry,
    MicroBatchSampler,
    OrderFn,
    epoch_order,
    loader_workers,
    make_loader,
)
from logitcache.pipeline.distributed import DistContext
from logitcache.pipeline.errors import ConfigError, LogitcacheError, StageError, error_line
from logitcache.pipeline.progress import progress_bar
from logitcache.pipeline.rundir import fingerprint_matches
from logitcache.pipeline.tracking import MetricsLog, TrackedModel

# A loss function gets the (possibly DDP-wrapped) model and a batch dict, and returns the mean
# loss over the batch's target tokens as a scalar tensor, or a dict of it ("loss") and detached
# scalar parts of it (e.g. the student's "ce" and "kd"), logged beside the loss.
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor | dict[str, torch.Tensor]]


def _split_loss(out: torch.Tensor | dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, parts) of a :data:`LossFn`'s result."""
    if isinstance(out, dict):
        return out["loss"], {name: value for name, value in out.items() if name != "loss"}
    return out, {}


CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # optimizer steps already done in that epoch
    global_step: int = 0
    tokens: int = 0  # training tokens consumed (targets), over all ranks


@dataclass(frozen=True)
class TrainPlan:
    num_windows: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    micro_batch: int  # windows per rank per micro-step


def make_plan(train: TrainConfig, num_windows: int, world_size: int) -> TrainPlan:
    geometry = BatchGeometry.of(
        num_windows, train.batch_size, world_size=world_size, grad_accum_steps=train.grad_accum_steps
    )
    if geometry.steps_per_epoch < 1:
        raise ConfigError(
            f"Expected at least one batch of {train.batch_size} windows. The training split holds "
            f"{num_windows} windows: lower train.batch_size or use more data."
        )
    total = geometry.steps_per_epoch * train.epochs
    if train.max_steps > 0:
        total = min(total, train.max_steps) if train.epochs > 0 else train.max_steps
    return TrainPlan(
        num_windows=num_windows,
        batch_size=train.batch_size,
        steps_per_epoch=geometry.steps_per_epoch,
        total_steps=total,
        micro_batch=geometry.micro_batch,
    )


def lr_factor(step: int, train: TrainConfig, total_steps: int) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps (warmup, then decay)."""
    if train.warmup_steps and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps))
    if train.schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * decay


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps
    )


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    out_dir: Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    keep: int,
    fingerprint: str,
) -> Path:
    """Write ``out_dir/checkpoints/step-N`` atomically (temp folder + rename); keep the last ``keep``.

    A failed write (a full disk: ``OSError`` or safetensors' own error) removes the temp folder,
    keeps every earlier checkpoint, and raises a one-line :class:`StageError` saying how to resume.
    """
    root = out_dir / CHECKPOINT_DIR
    final = root / f"step-{state.global_step:08d}"
    tmp = root / f".step-{state.global_step:08d}.tmp"
    try:
        _write_checkpoint(tmp, model, optimizer, state, fingerprint)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
        kept = [p.name for p in checkpoints_newest_first(out_dir)]
        raise StageError(
            f"Could not write the checkpoint {final} ({reason}). "
            + (f"The last good checkpoint {kept[0]} is kept" if kept else "No earlier checkpoint exists")
            + ": free disk space and rerun the same command to "
            + ("resume from it." if kept else "start again.")
        ) from None
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(
    tmp: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer, state: TrainState, fingerprint: str
) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    trainer_state = {"train_state": asdict(state), "optimizer": meta, "fingerprint": str(fingerprint)}
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    _fsync_tree(tmp)  # the files are on disk before the rename makes the checkpoint visible


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def checkpoints_newest_first(out_dir: Path) -> list[Path]:
    root = out_dir / CHECKPOINT_DIR
    return sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    steps = [p for p in checkpoints_newest_first(out_dir) if (p / "trainer_state.json").is_file()]
    return steps[0] if steps else None


def resume_from_checkpoints(
    out_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    fingerprint: str,
    *,
    warn: Callable[[str], None],
) -> TrainState:
    """Load the newest intact checkpoint of ``out_dir`` (a fresh state when there is none).

    A damaged checkpoint (a file missing, truncated or unreadable: what a crash or a full disk
    can leave) is skipped with a warning naming it, and the next older one is tried. A checkpoint
    of another config is an error, as is having only damaged ones (with what to do).
    """
    damaged = []
    for path in checkpoints_newest_first(out_dir):
        try:
            state = load_checkpoint(path, model, optimizer, fingerprint)
        except StageError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
            damaged.append(path)
            warn(
                f"warning: checkpoint {path} is damaged ({type(exc).__name__}: {str(exc)[:120]}); trying an older one"
            )
            continue
        if damaged:
            warn(f"resuming from {path.name}, the newest intact checkpoint")
        return state
    if damaged:
        raise StageError(
            f"Every checkpoint in {out_dir / CHECKPOINT_DIR} is damaged. Remove that folder to start this "
            "model over."
        )
    return TrainState()


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str
) -> TrainState:
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    if not fingerprint_matches(fingerprint, trainer_state.get("fingerprint")):
        raise StageError(
            f"The checkpoint {path} was made with a different config. Remove {path.parent} to start "
            "over, or use another run directory."
        )
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied output weights are saved once; anything else missing is a real mismatch.
    if unexpected or any("lm_head" not in name for name in missing):
        raise StageError(
            f"The checkpoint {path} does not match the model (missing {missing}, unexpected {unexpected})."
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    optimizer.load_state_dict(
        _optimizer_from_files(load_file(str(path / "optimizer.safetensors")), trainer_state["optimizer"])
    )
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return TrainState(**trainer_state["train_state"])


def _truncate_metrics(path: Path, global_step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone), and a
    torn line that a crash mid-write can leave (it does not parse)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= global_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------------
# The loop


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    ctx: DistContext,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) over all windows, sharded over ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (sum of losses, token count)
    for start in range(ctx.rank * batch_size, windows.shape[0], batch_size * ctx.world_size):
        input_ids = windows[start : start + batch_size].to(ctx.device, dtype=torch.long)  # (B, T)
        with autocast or contextlib.nullcontext():
            logits = model(input_ids=input_ids).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum"
        )
        total += torch.stack(
            [loss.double(), torch.tensor(input_ids[:, 1:].numel(), device=ctx.device).double()]
        )
    ctx.all_reduce_sum(total)
    model.train(was_training)
    return float(total[0] / total[1])


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch of full windows (the teachers' loss)."""
    input_ids = batch["input_ids"]  # (B, T)
    logits = model(input_ids=input_ids).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


class StepClock:
    """Wall time spent in training steps: runs between ``start()`` and ``stop()``.

    The loop stops it around dev evaluation and checkpoint saving, so ``tokens_per_s`` measures
    training alone. On CUDA, ``stop()`` and ``seconds()`` synchronise first, so that queued GPU
    work is charged to the steps that launched it.
    """

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._total = 0.0
        self._since: float | None = None

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        if self._since is None:
            self._since = self._now()

    def stop(self) -> None:
        if self._since is not None:
            self._total += self._now() - self._since
            self._since = None

    def seconds(self) -> float:
        running = self._now() - self._since if self._since is not None else 0.0
        return self._total + running


def _next_batch(batches: Iterator[Batch]) -> Batch:
    """The next micro-batch. A user error raised in a DataLoader worker (a damaged cache chunk)
    comes back with the worker's traceback in its message: it is raised again as itself, one line."""
    try:
        return next(batches)
    except LogitcacheError as exc:
        message = str(exc)
        if "Original Traceback" not in message:
            raise
        raise type(exc)(error_line(message)) from None


def train_model(
    model: PreTrainedModel,
    *,
    train: TrainConfig,
    dataset: Dataset[Batch],
    seq_len: int,
    loss_fn: LossFn,
    dev_windows: torch.Tensor,
    out_dir: Path,
    seed: int,
    fingerprint: str,
    ctx: DistContext,
    progress: bool | None = None,
    desc: str = "train",
    order: OrderFn = epoch_order,
    workers: int | Literal["auto"] = 0,
    prefetch_factor: int = 2,
    wrap: Callable[[PreTrainedModel], torch.nn.Module] | None = None,
    report_to: Sequence[str] = (),
    tracked: TrackedModel | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place, resuming from the last checkpoint in ``out_dir`` if there is one.

    ``dataset``: the training windows (``len(dataset)`` of them) with whatever the loss needs;
    its ``__getitems__(indices)`` returns one micro-batch as a dict of batched CPU tensors
    (:class:`~logitcache.pipeline.data_order.WindowsDataset` for the teachers). ``order`` gives
    each epoch's window order (default :func:`~logitcache.pipeline.data_order.epoch_order`);
    ``workers`` and ``prefetch_factor`` configure the DataLoader (0 workers: read in this
    process; ``"auto"``: :func:`~logitcache.pipeline.data_order.loader_workers`); batches are pinned when training on CUDA and copied without blocking.
    ``wrap(model)`` builds the module that is compiled, DDP-wrapped and handed to ``loss_fn``
    (e.g. the model plus its loss), sharing the model's parameters. Returns a summary (steps,
    tokens, final dev loss). Only rank 0 writes files. Metrics go to ``out_dir/metrics.jsonl`` and
    to the trackers of ``report_to`` (:mod:`~logitcache.pipeline.tracking`; ``tracked`` names the model there).
    """
    num_windows = len(dataset)  # type: ignore[arg-type]
    plan = make_plan(train, num_windows, ctx.world_size)
    model.to(ctx.device)
    optimizer = make_optimizer(model, train)
    state = resume_from_checkpoints(
        out_dir,
        model,
        optimizer,
        fingerprint,
        warn=lambda line: print(line, file=sys.stderr, flush=True) if ctx.is_main else None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train, plan.total_steps), last_epoch=state.global_step - 1
    )
    metrics_path = out_dir / METRICS_FILE
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, state.global_step)
    ctx.barrier()

    use_cuda = ctx.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    train_module: torch.nn.Module = wrap(model) if wrap is not None else model
    if train.compile:
        train_module = torch.compile(train_module)
    if ctx.distributed:
        train_module = DistributedDataParallel(
            train_module, device_ids=[ctx.device.index] if use_cuda else None
        )
    model.train()
    sampler = MicroBatchSampler(
        num_windows, batch_size=train.batch_size, seed=seed, order=order,
        grad_accum_steps=train.grad_accum_steps, rank=ctx.rank, world_size=ctx.world_size,
    )  # fmt: skip
    loader = make_loader(
        dataset,
        sampler,
        workers=loader_workers(workers, ctx.device),
        prefetch_factor=prefetch_factor,
        pin_memory=use_cuda,
    )

    tokens_per_step = plan.batch_size * (seq_len - 1)
    bar = progress_bar(
        total=plan.total_steps, initial=state.global_step, desc=desc, progress=progress, is_main=ctx.is_main
    )
    clock = StepClock(ctx.device)  # training steps only: dev evaluation and checkpoints excluded
    start_step = state.global_step
    dev_loss = math.nan
    metrics = MetricsLog(metrics_path, report_to=report_to, model=tracked) if ctx.is_main else None
    try:
        while state.global_step < plan.total_steps:
            # The rest of this epoch from the step we are at (a resumed run: from its checkpoint).
            stop = min(plan.steps_per_epoch, state.step_in_epoch + plan.total_steps - state.global_step)
            sampler.set_epoch(state.epoch, start_step=state.step_in_epoch, stop_step=stop)
            clock.start()
            micro_batches = iter(loader)
            while state.step_in_epoch < stop:
                step_loss = torch.zeros((), device=ctx.device)
                step_parts: dict[str, torch.Tensor] = {}  # mean over the micro-batches, like the loss
                for micro in range(train.grad_accum_steps):
                    batch = {
                        name: value.to(ctx.device, non_blocking=True)
                        for name, value in _next_batch(micro_batches).items()
                    }
                    last = micro == train.grad_accum_steps - 1
                    sync = contextlib.nullcontext() if last or not ctx.distributed else train_module.no_sync()
                    with sync:
                        with autocast:
                            loss, parts = _split_loss(loss_fn(train_module, batch))
                            loss = loss / train.grad_accum_steps
                        loss.backward()
                    step_loss += loss.detach()
                    for name, value in parts.items():
                        share = value.detach().float() / train.grad_accum_steps
                        step_parts[name] = step_parts[name] + share if name in step_parts else share
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise StageError(
                        f"{desc}: non-finite gradient at step {state.global_step}; lower train.lr or check the data."
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step_in_epoch += 1
                state.global_step += 1
                state.tokens += tokens_per_step
                # one collective for the loss and its parts (every rank has the same part names)
                reduced = ctx.all_reduce_sum(torch.stack([step_loss.float(), *step_parts.values()]))
                step_loss, *part_values = reduced / ctx.world_size
                step_parts = dict(zip(step_parts, part_values, strict=True))
                bar.update(1)
                if state.global_step % train.log_every == 0 or state.global_step == plan.total_steps:
                    train_s = clock.seconds()
                    tps = (state.global_step - start_step) * tokens_per_step / max(train_s, 1e-9)
                    record = {
                        "step": state.global_step,
                        "epoch": state.epoch,
                        "loss": float(step_loss),
                        **{name: float(value) for name, value in step_parts.items()},
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "tokens": state.tokens,
                        "tokens_per_s": tps,
                        "train_s": train_s,
                    }
                    shown = {name: f"{record[name]:.3f}" for name in ("loss", *step_parts)}
                    bar.set_postfix(**shown, tok_s=f"{tps:,.0f}")
                    if metrics is not None:
                        metrics.write(record)
                if state.global_step % train.checkpoint_every == 0 and state.global_step < plan.total_steps:
                    clock.stop()
                    if ctx.is_main:
                        save_checkpoint(out_dir, model, optimizer, state, train.keep_checkpoints, fingerprint)
                    ctx.barrier()
                    clock.start()
            clock.stop()
            epoch_done = state.step_in_epoch >= plan.steps_per_epoch
            dev_loss = evaluate_loss(model, dev_windows, train.eval_batch_size, ctx, autocast)
            if metrics is not None:
                metrics.write({"step": state.global_step, "epoch": state.epoch, "dev_loss": dev_loss})
            if epoch_done:
                state.epoch += 1
                state.step_in_epoch = 0
            if ctx.is_main and state.global_step < plan.total_steps:
                save_checkpoint(out_dir, model, optimizer, state, train.keep_checkpoints, fingerprint)
            ctx.barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if math.isnan(dev_loss):  # resumed after the last step: evaluate once for the summary
        dev_loss = evaluate_loss(model, dev_windows, train.eval_batch_size, ctx, autocast)
    train_s = clock.seconds()
    return {
        "steps": state.global_step,
        "tokens": state.tokens,
        # this process's training throughput (steps since it started or resumed; evaluation and
        # checkpoints excluded), the figure `pipe run` reports per model
        "tokens_per_s": (state.global_step - start_step) * tokens_per_step / train_s if train_s > 0 else None,
        "train_s": train_s,
        "dev_loss": dev_loss,
        "dev_perplexity": math.exp(dev_loss) if dev_loss < 700 else math.inf,
        "plan": asdict(plan),
    }
