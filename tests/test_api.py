"""The public Python API (docs/api.md): exports, the dataset of a cache, the loss, building a cache,
saved models usable elsewhere, moved runs, and a second reader of the format (tensorstore)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import logitcache
from logitcache.cache import open_cache
from logitcache.kernels import sparse_kd_loss_reference
from logitcache.pipeline.cache_logits import cache_logits, verify
from logitcache.pipeline.cli import main as pipe_main
from logitcache.pipeline.config import load_config
from logitcache.pipeline.errors import CacheError, ConfigError, DataError, StageError, TeacherError
from logitcache.pipeline.models import build_model
from logitcache.pipeline.prepare import PreparedData, prepare_data
from logitcache.pipeline.student import LossOptions, StudentObjective, train_student
from logitcache.pipeline.teachers import train_teacher

from .conftest import CORPUS, REPO, TINY_LLAMA, corpus_slice, write_config

API_RUN = f"""
[cache]
k = 16
batch_size = 64

[student.model]
{TINY_LLAMA}

[student.train]
lr = 3e-3
batch_size = 16
warmup_steps = 2
checkpoint_every = 3
log_every = 1
eval_batch_size = 64

[student.loader]
shuffle_block = 16
shuffle_buffer_blocks = 4
"""
TEACHER_STEPS = ["teachers.llama.train.max_steps=8", "teachers.gpt.train.max_steps=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Config path of a run with prepared data, two briefly trained teachers and their cache (k=16)."""
    root = tmp_path_factory.mktemp("api")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in sorted(p.name for p in CORPUS.glob("*.txt.gz"))[:4]:
        (corpus / name.removesuffix(".gz")).write_text(corpus_slice(name, 30_000))
    path = write_config(root / "api.toml", corpus, root / "run", extra=API_RUN)
    config = load_config(path, TEACHER_STEPS)
    prepare_data(config)
    for name in config.teachers:
        train_teacher(config, name, progress=False)
    cache_logits(config, progress=False)
    return path


def _config(run: Path, *overrides: str):
    return load_config(run, [*TEACHER_STEPS, *overrides])


# ----------------------------------------------------------------------------------------------
# Exports


def test_top_level_names_load_lazily_and_resolve():
    code = (
        "import sys, logitcache; "
        "print(sorted(m for m in ('torch', 'zarr', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # `import logitcache` costs nothing until a name is used
    assert sorted(logitcache.__all__) == sorted(logitcache._EXPORTS)
    for name in logitcache.__all__:
        assert getattr(logitcache, name) is not None, name
    assert logitcache.sparse_kd_loss is __import__("logitcache.kernels").kernels.sparse_kd_loss
    with pytest.raises(AttributeError):
        logitcache.not_a_name  # noqa: B018


# ----------------------------------------------------------------------------------------------
# The dataset


@pytest.mark.parametrize("tail", ["ghost", "renormalize"])
def test_dataset_items_are_the_windows_and_their_cache_rows(run: Path, tail: str):
    config = _config(run)
    data = PreparedData.open(config.run_dir / "data")
    windows = data.windows("train")
    reader = open_cache(config.run_dir / "cache" / "logits.zarr")
    dataset = logitcache.open_dataset(config.run_dir / "cache", tail=tail)  # RUN/data found beside it
    assert len(dataset) == windows.shape[0] == reader.num_windows
    weights = "ghost" if tail == "ghost" else "renormalized"
    rows = [5, 0, 77, 31]
    direct = reader.read_windows(rows, weights=weights)
    items = [dataset[i] for i in rows]
    for item, row, b in zip(items, rows, range(len(rows)), strict=True):
        expected_ids = torch.from_numpy(windows[row].astype(np.int64))
        assert torch.equal(item["input_ids"], expected_ids)
        assert torch.equal(item["labels"][1:], expected_ids[1:]) and item["labels"][0] == -100
        assert torch.equal(item["teacher_ids"].long(), direct.ids[b, :-1])  # (T-1, k)
        assert torch.equal(item["teacher_weights"], direct.weights[b, :-1])
        if tail == "ghost":
            assert torch.equal(item["teacher_tail"], direct.tail[b, :-1])
        else:
            assert "teacher_tail" not in item
    batch = logitcache.collate_batches(items)  # items stacked = the batch read at once
    at_once = dataset.__getitems__(rows)
    assert set(batch) == set(at_once)
    for name in batch:
        assert torch.equal(batch[name], at_once[name]), name
    assert logitcache.collate_batches(at_once) is at_once  # a DataLoader with __getitems__ passes it


def test_items_in_order_decompress_each_chunk_once(run: Path, monkeypatch: pytest.MonkeyPatch):
    config = _config(run)
    dataset = logitcache.open_dataset(config.run_dir / "cache")
    reader = dataset._cache()
    reads: list[slice] = []
    read_raw = reader.read_raw
    monkeypatch.setattr(reader, "read_raw", lambda where: reads.append(where) or read_raw(where))
    chunk = dataset.windows_per_chunk
    count = min(len(dataset), 3 * chunk + 5)
    for index in range(count):
        dataset[index]
    assert reads == [slice(c * chunk, min((c + 1) * chunk, len(dataset))) for c in range(-(-count // chunk))]


def test_dataset_of_other_windows_is_refused_in_one_line(run: Path):
    config = _config(run)
    windows = PreparedData.open(config.run_dir / "data").windows("train").copy()
    windows[3, 4] ^= 1
    with pytest.raises(CacheError, match="Expected the cache's dataset_sha256 to match") as info:
        logitcache.open_dataset(config.run_dir / "cache", windows=windows)
    assert "\n" not in str(info.value)
    with pytest.raises(StageError, match="Run `pipe prepare-data"):
        logitcache.open_dataset(config.run_dir / "cache", config.run_dir / "nowhere")
    with pytest.raises(CacheError, match="Expected tail 'ghost' or 'renormalize'. Got 'renormalized'"):
        logitcache.open_dataset(config.run_dir / "cache", tail="renormalized")
    with pytest.raises(StageError, match="Expected a logit cache at .*elsewhere"):
        logitcache.open_dataset(config.run_dir / "elsewhere", config.run_dir / "data")


# ----------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("tail", ["ghost", "renormalize"])
def test_distillation_loss_equals_the_students_own_loss(run: Path, tail: str):
    config = _config(run, f"student.distill.tail={tail}", "student.distill.alpha=0.7",
                     "student.distill.temperature=2.0")  # fmt: skip
    data = PreparedData.open(config.run_dir / "data")
    model = build_model(config.student.model, vocab_size=data.vocab_size, seq_len=data.seq_len, seed=3)
    batch = logitcache.open_dataset(config.run_dir / "cache", tail=tail).__getitems__([3, 40, 41, 7])
    own = StudentObjective(model, LossOptions.from_config(config))(batch)  # the pipeline's loss
    params = logitcache.SparseKDParams.from_alpha(0.7, temperature=2.0)
    logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
    api = logitcache.distillation_loss(logits, batch, params)
    hidden = model.base_model(input_ids=batch["input_ids"]).last_hidden_state  # (B, T, H)
    fused = logitcache.fused_distillation_loss(hidden, model.get_output_embeddings().weight, batch, params)
    reference = sparse_kd_loss_reference(  # independent: plain PyTorch, shift written out here
        logits[:, :-1].double(), batch["input_ids"][:, 1:], batch["teacher_ids"].long(),
        batch["teacher_weights"].double(),
        batch["teacher_tail"].double() if "teacher_tail" in batch else None,
        temperature=2.0, ce_weight=0.3, kl_weight=0.7,
    )  # fmt: skip
    # float32 losses of ~5 nats over 124 positions: a few ulp of accumulated rounding
    assert api.item() == pytest.approx(reference.item(), rel=1e-5)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-5)
    assert own.item() == pytest.approx(reference.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Building a cache from Python


def test_build_cache_from_python_equals_the_pipeline_cache(run: Path, tmp_path: Path):
    config = _config(run)
    teachers = {name: config.run_dir / "teachers" / name for name in config.teachers}
    pipeline_store = config.run_dir / "cache" / "logits.zarr"
    data = PreparedData.open(config.run_dir / "data")
    out = logitcache.build_cache(
        teachers, tmp_path / "api" / "logits.zarr", data=config.run_dir / "data", k=16, batch_size=64,
        progress=False,
    )  # fmt: skip
    # The same windows given as an array with their tokenizer: the same entries.
    out_windows = logitcache.build_cache(
        list(teachers.values()), tmp_path / "arr" / "logits.zarr", windows=data.windows("train"),
        tokenizer=config.run_dir / "data", k=16, batch_size=64, progress=False,
    )  # fmt: skip
    ours, theirs, other = open_cache(out), open_cache(pipeline_store), open_cache(out_windows)
    for field in ("vocab_size", "tokenizer_sha256", "dataset_sha256", "k", "mode", "ensemble", "encoding"):
        assert (
            getattr(ours.metadata, field) == getattr(theirs.metadata, field) == getattr(other.metadata, field)
        )
    everything = slice(0, theirs.num_windows)
    for name, array in theirs.read_raw(everything).items():
        assert np.array_equal(ours.read_raw(everything)[name], array), name
        assert np.array_equal(other.read_raw(everything)[name], array), name
    assert verify(out, data_dir=config.run_dir / "data", recompute=2)["ok"]
    dataset = logitcache.open_dataset(out_windows, windows=data.windows("train"))
    assert torch.equal(dataset[4]["teacher_ids"], logitcache.open_dataset(pipeline_store)[4]["teacher_ids"])


def test_build_cache_refuses_bad_input_before_writing(run: Path, tmp_path: Path):
    config = _config(run)
    teachers = [config.run_dir / "teachers" / "llama"]
    out = tmp_path / "never" / "logits.zarr"
    windows = PreparedData.open(config.run_dir / "data").windows("train")
    cases = [
        (dict(windows=windows), StageError, "Expected the tokenizer"),
        (dict(windows=windows, tokenizer=config.run_dir / "data", k=0), ConfigError, "cache.k"),
        (dict(data=config.run_dir / "data", kk=3), ConfigError, "cache.kk"),
        (dict(windows=windows.astype(np.int64) + 10_000, tokenizer=config.run_dir / "data"), DataError,
         r"Expected token ids in \[0, "),
        (dict(data=config.run_dir / "data", windows=windows), StageError, "Got both"),
        (dict(data=config.run_dir / "data", mode="nope"), ConfigError, "cache.mode"),
    ]  # fmt: skip
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            logitcache.build_cache(teachers, out, progress=False, **kwargs)
    with pytest.raises(TeacherError, match=r"Expected a model directory at .*missing\. Got nothing"):
        logitcache.build_cache([tmp_path / "missing"], out, data=config.run_dir / "data", progress=False)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(teachers[0] / name, no_tokenizer / name)
    with pytest.raises(TeacherError, match=r"has no tokenizer \(tokenizer.json\)"):
        logitcache.build_cache([no_tokenizer], out, data=config.run_dir / "data", progress=False)
    assert not out.parent.exists()


# ----------------------------------------------------------------------------------------------
# Saved models work elsewhere; moved runs still verify


def test_saved_student_loads_and_generates_with_transformers_alone(run: Path):
    config = _config(run, "student.train.max_steps=7", "student.name=saved")
    out = train_student(config, progress=False)
    assert not (out / "checkpoints").exists()  # checkpoints at steps 3 and 6 were made, then removed
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
for folder in ({str(out)!r}, {str(config.run_dir / "teachers" / "gpt")!r}):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer("Mr. Darcy", return_tensors="pt")
    if model.config.model_type == "llama":  # rotary positions: goes on past the window
        out = model.generate(**prompt, max_new_tokens=2 * tokenizer.model_max_length, do_sample=False)
    else:  # learned positions: generate() stops at the last one
        out = model.generate(**prompt, do_sample=False, min_new_tokens=40)
    print(model.config.model_type, tokenizer.model_max_length, out.shape[1], prompt["input_ids"].shape[1])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    (llama, gpt) = [line.split() for line in done.stdout.strip().splitlines()]
    seq_len = str(config.data.seq_len)
    assert llama[:2] == ["llama", seq_len] and int(llama[2]) == int(llama[3]) + 2 * config.data.seq_len
    assert gpt[:2] == ["gpt2", seq_len] and gpt[2] == seq_len


def test_verify_recompute_works_on_a_moved_run(run: Path, capsys: pytest.CaptureFixture[str]):
    config = _config(run)
    root = config.run_dir
    stored = [t.path for t in open_cache(root / "cache" / "logits.zarr").metadata.teachers]
    assert stored == ["teachers/llama", "teachers/gpt"]  # relative to the run directory
    moved = root.with_name("moved-run")
    os.rename(root, moved)  # the old teacher paths no longer exist
    try:
        report = verify(moved / "cache", recompute=3)
        assert report["ok"] and report["recompute"]["ok"], report
        pipe_main(["verify-cache", str(moved / "cache"), "--recompute", "2"])  # exits only on failure
        assert capsys.readouterr().out.strip().endswith(f"OK: {moved / 'cache' / 'logits.zarr'}")
    finally:
        os.rename(moved, root)


# ----------------------------------------------------------------------------------------------
# A second reader


def test_tensorstore_reads_every_array_as_zarr_python_does(run: Path):
    ts = pytest.importorskip("tensorstore")  # optional: pip install "logitcache[tensorstore]"
    root = _config(run).run_dir
    checked = []
    for store in (root / "cache" / "logits.zarr", root / "data" / "windows.zarr"):
        group = zarr.open_group(store, mode="r")
        for name, array in group.arrays():
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / name)}}
            other = ts.open(spec, read=True).result()
            assert tuple(other.shape) == array.shape and other.dtype.numpy_dtype == array.dtype, name
            assert np.array_equal(other.read().result(), array[...]), f"{store.name}/{name}"
            checked.append(f"{store.name}/{name}")
    assert {"logits.zarr/ids", "logits.zarr/values", "logits.zarr/done", "windows.zarr/train"} <= set(checked)


# ----------------------------------------------------------------------------------------------
# Hugging Face Trainer


def _trainer(model, dataset, out: Path, **arguments):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=1, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        save_strategy="no", report_to="none", use_cpu=True, seed=5, disable_tqdm=True,
    )  # fmt: skip
    return logitcache.DistillationTrainer(
        model=model, args=TrainingArguments(**{**settings, **arguments}), train_dataset=dataset
    )


def test_trainer_loss_and_accumulation_equal_the_projects_loss(run: Path, tmp_path: Path):
    """Trainer's loss on a batch = `pipe train-student`'s; one SGD step with 2 accumulated
    micro-batches = one step with the whole batch = the step computed by hand with our loss."""
    pytest.importorskip("accelerate")  # transformers.Trainer needs it (extra "hf")
    config = _config(run)  # alpha 0.5, temperature 1, tail ghost: the trainer's defaults
    data = PreparedData.open(config.run_dir / "data")
    dataset = logitcache.open_dataset(config.run_dir / "cache")

    def student():
        return build_model(config.student.model, vocab_size=data.vocab_size, seq_len=data.seq_len, seed=3)

    model = student()
    trainer = _trainer(model, dataset, tmp_path / "probe")
    batch = next(iter(trainer.get_train_dataloader()))  # (8, T) and the cache rows of its windows
    assert set(batch) == {"input_ids", "labels", "teacher_ids", "teacher_weights", "teacher_tail"}
    own = StudentObjective(model, LossOptions.from_config(config))(batch)
    positions = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
    assert trainer.compute_loss(model, batch).item() == pytest.approx(own.item(), rel=1e-6)
    normalised = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(positions))
    assert normalised.item() == pytest.approx(own.item(), rel=1e-6)

    by_hand = student()
    StudentObjective(by_hand, LossOptions.from_config(config))(batch).backward()
    expected = {name: p.detach() - 0.5 * p.grad for name, p in by_hand.named_parameters()}
    for accumulation in (1, 2):
        model = student()
        trained = _trainer(
            model, dataset, tmp_path / f"ga{accumulation}", per_device_train_batch_size=8 // accumulation,
            gradient_accumulation_steps=accumulation,
        )  # fmt: skip
        trained.train()
        for name, value in model.named_parameters():
            # float32 sums in another order (two micro-batches): rounding at ~1e-6 of the update
            torch.testing.assert_close(value.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)

    # Evaluation goes through the same loss: 16 windows in two batches of 8 = our loss on all 16.
    held_out = torch.utils.data.Subset(dataset, range(100, 116))
    metrics = trained.evaluate(eval_dataset=held_out)
    with torch.no_grad():
        whole = StudentObjective(model, LossOptions.from_config(config))(
            dataset.__getitems__(range(100, 116))
        )
    assert metrics["eval_loss"] == pytest.approx(whole.item(), rel=1e-5)


def test_example_script_trains_the_student_and_the_loss_decreases(run: Path, tmp_path: Path):
    pytest.importorskip("accelerate")
    root = _config(run).run_dir
    out = tmp_path / "hf-student"
    args = [sys.executable, str(REPO / "examples" / "hf_trainer.py"), "--run", str(root), "--out", str(out),
            "--max-steps", "12", "--log-steps", "1"]  # fmt: skip
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).model_max_length == model.config.max_position_embeddings


def test_dataloader_as_documented_yields_chunk_shuffled_batches(run: Path):
    from torch.utils.data import DataLoader

    from logitcache.integrations.hf_trainer import ChunkShuffleSampler
    from logitcache.pipeline.data_order import block_shuffled_order

    dataset = logitcache.open_dataset(_config(run).run_dir / "cache")
    sampler = ChunkShuffleSampler(len(dataset), block=dataset.windows_per_chunk, seed=0)
    sampler.set_epoch(1)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, collate_fn=logitcache.collate_batches)
    order = block_shuffled_order(len(dataset), 0, 1, block=dataset.windows_per_chunk, buffer_blocks=4)
    assert sorted(order.tolist()) == list(range(len(dataset)))
    for step, batch in zip(range(3), loader, strict=False):
        expected = dataset.__getitems__(order[step * 8 : (step + 1) * 8].tolist())
        assert set(batch) == set(expected)
        for name in batch:
            assert torch.equal(batch[name], expected[name]), name


DDP_TRAINER = """
import sys
from pathlib import Path

from transformers import TrainingArguments

import logitcache
from logitcache.pipeline.config import load_config
from logitcache.pipeline.models import build_model
from logitcache.pipeline.prepare import PreparedData

config_path, out = sys.argv[1], sys.argv[2]
config = load_config(config_path, sys.argv[3:])
data = PreparedData.open(config.run_dir / "data")
model = build_model(config.student.model, vocab_size=data.vocab_size, seq_len=data.seq_len, seed=3)
args = TrainingArguments(
    output_dir=out, per_device_train_batch_size=4, max_steps=1, optim="sgd", learning_rate=0.5,
    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
    save_strategy="no", report_to="none", use_cpu=True, seed=5, disable_tqdm=True,
)
trainer = logitcache.DistillationTrainer(
    model=model, args=args, train_dataset=logitcache.open_dataset(config.run_dir / "cache")
)
trainer.train()
trainer.save_model(out)
"""


def test_trainer_under_torchrun_equals_one_step_on_the_whole_batch(run: Path, tmp_path: Path):
    """2 DDP processes x 4 windows: the same SGD update as our loss on the 8 windows by hand."""
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    from logitcache.integrations.hf_trainer import ChunkShuffleSampler

    config = _config(run)
    data = PreparedData.open(config.run_dir / "data")
    dataset = logitcache.open_dataset(config.run_dir / "cache")
    sampler = ChunkShuffleSampler(len(dataset), block=dataset.windows_per_chunk, seed=5)
    batch = dataset.__getitems__(list(sampler)[:8])  # the first global batch of 2 processes x 4
    by_hand = build_model(config.student.model, vocab_size=data.vocab_size, seq_len=data.seq_len, seed=3)
    StudentObjective(by_hand, LossOptions.from_config(config))(batch).backward()
    expected = {name: p.detach() - 0.5 * p.grad for name, p in by_hand.named_parameters()}

    script = tmp_path / "ddp_trainer.py"
    script.write_text(DDP_TRAINER)
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29547",
            str(script), str(run), str(out), *TEACHER_STEPS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = load_file(str(out / "model.safetensors"))
    for name, value in expected.items():
        if name in trained:  # a tied output layer is saved once
            # two half-batches and an all-reduce: float32 rounding at ~1e-6 of the update
            torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert len(trained) >= len(expected) - 1
