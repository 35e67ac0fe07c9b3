"""Every bad input is refused before anything is touched (issue 17), through the real CLI.

One run directory is built per module (prepared data, two tiny teachers, their k=16 cache, a
cache-mode student). Each case of :data:`CASES` prepares a bad input (beside the run, or in a
run copy) and runs ``pipe ...`` in this process (``cli.main``, the console script's entry
point). It asserts: a non-zero exit, exactly one ``error:`` line, that line naming the problem
(the case's pattern) and saying what to do, no traceback, and that every file and folder of
the run and of the case's own folder is byte-identical afterwards (no file created, changed or
deleted; fault cases, which fail mid-work, may only add files). docs/refusals.md lists the same
cases for users.

Then the faults that need more than one command: a chunk corrupted mid-epoch through
``train_student`` (the error, the last checkpoint intact, the rerun resuming to the same
weights), disk full at a checkpoint and while writing a cache (rerun resumes), the lock of a
live process and a stale one, and verify-cache's exit codes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from logitcache.cache import open_cache
from logitcache.pipeline import cli
from logitcache.pipeline.config import load_config
from logitcache.pipeline.preflight import StageLock, lock_path
from logitcache.pipeline.prepare import PreparedData

from .conftest import CORPUS, REPO, TINY_LLAMA, corpus_slice, write_config

EXTRA = f"""
[cache]
k = 16
batch_size = 64
windows_per_shard = 64

[student.model]
{TINY_LLAMA}

[student.train]
lr = 3e-3
batch_size = 16
epochs = 1
max_steps = 8
warmup_steps = 2
checkpoint_every = 2
keep_checkpoints = 2
log_every = 1
eval_batch_size = 64

[student.loader]
workers = 0
shuffle_block = 16
shuffle_buffer_blocks = 2
"""
TEACHER_STEPS = ["teachers.llama.train.max_steps=4", "teachers.gpt.train.max_steps=4"]
NOBODY = 65534  # the unprivileged user root's commands are run as where file modes must bind


@dataclass
class Base:
    """The module's run: ``config`` (TOML), ``run`` (its run dir), bad model folders beside it."""

    root: Path
    config: Path
    run: Path
    models: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    from logitcache.pipeline.cache_logits import cache_logits
    from logitcache.pipeline.models import build_model
    from logitcache.pipeline.prepare import prepare_data
    from logitcache.pipeline.student import train_student
    from logitcache.pipeline.teachers import train_teacher

    root = tmp_path_factory.mktemp("bad-inputs")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in sorted(p.name for p in CORPUS.glob("*.txt.gz"))[:4]:
        (corpus / name.removesuffix(".gz")).write_text(corpus_slice(name, 30_000))
    path = write_config(root / "bad.toml", corpus, root / "run", extra=EXTRA)
    path.write_text(
        path.read_text().replace("[teachers.llama.train]", "[teachers.llama.train]\nmax_steps = 4")
    )
    path.write_text(path.read_text().replace("[teachers.gpt.train]", "[teachers.gpt.train]\nmax_steps = 4"))
    config = load_config(path)
    prepare_data(config)
    for name in config.teachers:
        train_teacher(config, name, progress=False)
    cache_logits(config, progress=False)
    train_student(config, progress=False)
    b = Base(root, path, config.run_dir)

    teacher = b.run / "teachers" / "gpt"
    models = root / "models"
    pickled = models / "pickled"  # pickle weights only: written by torch.save, never read back
    shutil.copytree(teacher, pickled, ignore=shutil.ignore_patterns("checkpoints"))
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    alien = models / "alien"  # the same model, two token ids swapped in its tokenizer
    shutil.copytree(teacher, alien, ignore=shutil.ignore_patterns("checkpoints"))
    vocab = json.loads((alien / "tokenizer.json").read_text())
    tokens = vocab["model"]["vocab"]
    first, second = sorted(tokens)[100:102]
    tokens[first], tokens[second] = tokens[second], tokens[first]
    (alien / "tokenizer.json").write_text(json.dumps(vocab))
    truncated = models / "truncated"  # a copy cut short: the header promises more bytes
    shutil.copytree(teacher, truncated, ignore=shutil.ignore_patterns("checkpoints"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    small = models / "small-vocab"  # the data's tokenizer, but only 100 output logits
    small_model = build_model(config.teachers["gpt"].model, vocab_size=100, seq_len=32, seed=0)
    small_model.save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(teacher / name, small / name)
    b.models = {"pickled": pickled, "alien": alien, "truncated": truncated, "small": small}
    return b


# ----------------------------------------------------------------------------------------------
# Helpers


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (SHA-256) and folder under ``roots``, symlinks as their targets, by path."""
    found: dict[str, str] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                path = Path(folder, name)
                found[str(path)] = f"link {os.readlink(path)}" if path.is_symlink() else "dir"
            for name in files:
                path = Path(folder, name)
                if path.is_symlink():
                    found[str(path)] = f"link {os.readlink(path)}"
                else:
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def pipe(argv: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``pipe ARGV`` in this process; (exit status, stderr). An uncaught exception fails the test."""
    capsys.readouterr()
    try:
        cli.main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def run_copy(
    b: Base, dest: Path, *, cache: bool = True, teachers: bool = True, students: bool = False
) -> Path:
    """A run folder beside the base: data (and teachers) linked, the cache copied (it may be damaged)."""
    dest.mkdir(parents=True)
    (dest / "data").symlink_to(b.run / "data")
    if teachers:
        (dest / "teachers").symlink_to(b.run / "teachers")
    if cache:
        shutil.copytree(b.run / "cache", dest / "cache")
    if students:
        shutil.copytree(b.run / "students", dest / "students")
    return dest


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """``folder`` read-only for the command run inside. File modes do not bind root, so as root the
    command runs with the effective ids of ``nobody`` (a world-readable path is needed up to it)."""
    folder.chmod(0o555)
    try:
        if os.geteuid() != 0:
            yield
            return
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)
    finally:
        folder.chmod(0o755)


def public_dir() -> Path:
    """A folder every user can read and enter (pytest's own are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="logitcache-public-"))
    folder.chmod(0o755)
    return folder


def flip_byte_in_chunk(shard_file: Path, chunk: int, chunks_per_shard: int) -> None:
    """Flip one byte in the middle of inner chunk ``chunk`` of a zarr v3 shard (index at the end:
    (offset, nbytes) uint64 pairs, then a crc32c), leaving the index and its checksum intact."""
    raw = bytearray(shard_file.read_bytes())
    index = np.frombuffer(bytes(raw[-(16 * chunks_per_shard + 4) : -4]), dtype="<u8").reshape(-1, 2)
    offset, nbytes = (int(x) for x in index[chunk])
    raw[offset + nbytes // 2] ^= 0x10
    shard_file.write_bytes(bytes(raw))


HOLDER = """
import sys, time
from pathlib import Path
from logitcache.pipeline.preflight import StageLock
StageLock(Path(sys.argv[1]), "the test").acquire()
print("ready", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def lock_held_by_another_process(stage_dir: Path) -> Iterator[subprocess.Popen[str]]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(stage_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        lock_path(stage_dir).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The cases


@dataclass
class Bench:
    """What a case gets: the base run, its own empty folder, monkeypatch, and a stack for cleanups."""

    base: Base
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    stack: contextlib.ExitStack
    roots: list[Path] = field(default_factory=list)  # extra folders to snapshot
    run_inside: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    fault: bool = False  # fails mid-work: files may be added, none that existed changed


Case = Callable[[Bench], list[str | Path]]
CASES: dict[str, tuple[str, Case]] = {}


def case(command: str, expected: str) -> Callable[[Case], Case]:
    """Register a case: ``expected`` is a regex the one error line must match."""

    def register(fn: Case) -> Case:
        CASES[f"{command}-{fn.__name__}"] = (expected, fn)
        return fn

    return register


# prepare-data --------------------------------------------------------------------------------


@case("prepare-data", r"Expected a TOML config file\. Got '.*missing\.toml', which does not exist")
def missing_config(b: Bench):
    return ["prepare-data", b.tmp / "missing.toml"]


@case("prepare-data", r"Unknown config key 'data\.vocab'\. Did you mean 'vocab_size'")
def unknown_key(b: Bench):
    return ["prepare-data", b.base.config, "--set", "data.vocab=5"]


@case("prepare-data", r"data\.seq_len")
def seq_len_zero(b: Bench):
    return ["prepare-data", b.base.config, "--set", "data.seq_len=0", "--run-dir", b.tmp / "run"]


@case("prepare-data", r"corpus")
def corpus_missing(b: Bench):
    return [
        "prepare-data",
        b.base.config,
        "--set",
        f"data.corpus='{b.tmp / 'nowhere'}'",
        "--run-dir",
        b.tmp / "run",
    ]


@case("prepare-data", r"corpus|\.txt")
def corpus_empty(b: Bench):
    (b.tmp / "empty").mkdir()
    return [
        "prepare-data",
        b.base.config,
        "--set",
        f"data.corpus='{b.tmp / 'empty'}'",
        "--run-dir",
        b.tmp / "run",
    ]


@case("prepare-data", r"UTF-8|decode")
def corpus_undecodable(b: Bench):
    corpus = b.tmp / "binary"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"fine words " * 500 + b"\xff\xfe\xfa broken" + b" more words" * 500)
    return ["prepare-data", b.base.config, "--set", f"data.corpus='{corpus}'", "--run-dir", b.tmp / "run"]


@case(
    "prepare-data",
    r"The (train|dev) split holds \d+ tokens, fewer than one window of data\.seq_len=4096\. Use a larger corpus",
)
def corpus_too_small(b: Bench):
    corpus = b.tmp / "tiny"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"document {i} " + "some words " * 40 + "\n\n" for i in range(12)))
    # the tokenizer is trained and the windows packed before the split turns out too small:
    # .data.tmp must not be left behind (the snapshot of b.tmp would show it)
    return [
        "prepare-data", b.base.config, "--set", f"data.corpus='{corpus}'", "--set", "data.seq_len=4096",
        "--set", "data.vocab_size=64", "--run-dir", b.tmp / "run",
    ]  # fmt: skip


@case("prepare-data", r"holds prepared data made from a different config.*--overwrite")
def other_config_without_overwrite(b: Bench):
    return ["prepare-data", b.base.config, "--set", "data.vocab_size=600"]


@case("prepare-data", r"corpus|\.txt")
def overwrite_with_a_bad_corpus(b: Bench):
    (b.tmp / "empty").mkdir()
    return ["prepare-data", b.base.config, "--overwrite", "--set", f"data.corpus='{b.tmp / 'empty'}'"]


@case(
    "prepare-data",
    r"Expected a writable folder for the prepared data at .*Permission denied.*another --run-dir",
)
def read_only_run_dir(b: Bench):
    public = public_dir()
    b.stack.callback(shutil.rmtree, public, True)
    config = public / "c.toml"
    shutil.copyfile(b.base.config, config)
    (public / "run").mkdir()
    b.roots.append(public)
    b.run_inside = lambda: unwritable(public / "run")
    return ["prepare-data", config, "--run-dir", public / "run"]


# train-teacher -------------------------------------------------------------------------------


@case("train-teacher", r"Unknown teacher 'nope'\. The config defines: llama, gpt")
def unknown_teacher(b: Bench):
    return ["train-teacher", b.base.config, "--teacher", "nope"]


@case("train-teacher", r"num_heads")
def zero_heads(b: Bench):
    return ["train-teacher", b.base.config, "--teacher", "llama", "--set", "teachers.llama.model.num_heads=0"]


@case("train-teacher", r"Expected at least one batch of 100000 windows.*lower train\.batch_size")
def overwrite_with_a_batch_larger_than_the_data(b: Bench):
    """--overwrite of a complete teacher with an option that cannot work: the teacher stays."""
    return [
        "train-teacher", b.base.config, "--teacher", "llama", "--overwrite",
        "--set", "teachers.llama.train.batch_size=100000",
    ]  # fmt: skip


@case("train-teacher", r"Expected prepared data in .*pipe prepare-data")
def no_prepared_data(b: Bench):
    return ["train-teacher", b.base.config, "--teacher", "llama", "--run-dir", b.tmp / "run"]


@case("train-teacher", r"Expected safetensors weights in .*pickled\. Found only pickle weights")
def adopting_a_pickle_only_teacher(b: Bench):
    return [
        "train-teacher",
        b.base.config,
        "--teacher",
        "gpt",
        "--set",
        f"teachers.gpt.path='{b.base.models['pickled']}'",
    ]


# cache-logits --------------------------------------------------------------------------------


@case("cache-logits", r"cache\.batch_size")
def overwrite_with_batch_size_zero(b: Bench):
    """The issue's case: a bad option with --overwrite used to delete a complete cache's marker."""
    return ["cache-logits", b.base.config, "--overwrite", "--set", "cache.batch_size=0"]


@case("cache-logits", r"Expected safetensors weights in .*pickled\. Found only pickle weights .*Convert")
def pickle_only_teacher(b: Bench):
    return ["cache-logits", b.base.config, "--set", f"teachers.gpt.path='{b.base.models['pickled']}'"]


@case("cache-logits", r"uses a different tokenizer than the prepared data.*token ids differ")
def teacher_with_another_tokenizer(b: Bench):
    return ["cache-logits", b.base.config, "--set", f"teachers.gpt.path='{b.base.models['alien']}'"]


@case("cache-logits", r"Got an output layer of 100 tokens")
def teacher_with_fewer_logits(b: Bench):
    return ["cache-logits", b.base.config, "--set", f"teachers.gpt.path='{b.base.models['small']}'"]


@case("cache-logits", r"Expected complete safetensors weights in .*truncated.*damaged")
def truncated_teacher_weights(b: Bench):
    return ["cache-logits", b.base.config, "--set", f"teachers.gpt.path='{b.base.models['truncated']}'"]


@case("cache-logits", r"Teacher 'llama' is not trained yet\. Run `pipe train-teacher")
def untrained_teacher(b: Bench):
    run = run_copy(b.base, b.tmp / "run", cache=False, teachers=False)
    return ["cache-logits", b.base.config, "--run-dir", run]


@case("cache-logits", r"\bk\b|cache\.k|vocab")
def k_not_below_the_vocabulary(b: Bench):
    return ["cache-logits", b.base.config, "--overwrite", "--set", "cache.k=100000"]


@case("cache-logits", r"Expected no other process working on the cache\. Got one: pid \d+ on host .* Wait")
def locked_by_a_live_process(b: Bench):
    b.stack.enter_context(lock_held_by_another_process(b.base.run / "cache"))
    return ["cache-logits", b.base.config, "--overwrite"]


@case("cache-logits", r"Expected a writable folder for the cache at .*Permission denied")
def read_only_run(b: Bench):
    public = public_dir()
    b.stack.callback(shutil.rmtree, public, True)
    config = public / "c.toml"
    shutil.copyfile(b.base.config, config)
    (public / "run").mkdir()
    b.roots.append(public)
    b.run_inside = lambda: unwritable(public / "run")
    return ["cache-logits", config, "--run-dir", public / "run"]


@case("cache-logits", r"Expected to write shard \d+ of the cache .*the disk is full.*rerun to resume")
def disk_full_mid_cache(b: Bench):
    from zarr.storage import LocalStore

    run = run_copy(b.base, b.tmp / "run", cache=False)
    real_set = LocalStore.set

    async def full_after_first_shard(self, key, value):  # noqa: ANN001, ANN202
        if key.startswith("values/c/") and not key.startswith("values/c/0/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    b.monkeypatch.setattr(LocalStore, "set", full_after_first_shard)
    b.fault = True
    return ["cache-logits", b.base.config, "--run-dir", run]


# verify-cache --------------------------------------------------------------------------------


@case("verify-cache", r"Expected a logit cache at .*nowhere.*pipe cache-logits")
def no_such_cache(b: Bench):
    return ["verify-cache", b.tmp / "nowhere"]


@case("verify-cache", r"Expected --quick or --recompute\. Got both")
def quick_and_recompute(b: Bench):
    return ["verify-cache", b.base.run / "cache", "--quick", "--recompute", "2"]


@case("verify-cache", r"Expected a cache folder\. Got the file")
def cache_path_is_a_file(b: Bench):
    (b.tmp / "file").write_text("not a cache")
    return ["verify-cache", b.tmp / "file"]


# train-student -------------------------------------------------------------------------------


@case("train-student", r"Expected a logit cache at .*pipe cache-logits")
def no_cache(b: Bench):
    run = run_copy(b.base, b.tmp / "run", cache=False)
    return ["train-student", b.base.config, "--run-dir", run]


@case("train-student", r"Got other values for cache\.k \(config 32, cache 16\).*Rebuild")
def cache_made_with_other_settings(b: Bench):
    return ["train-student", b.base.config, "--name", "other", "--set", "cache.k=32"]


@case("train-student", r"Expected an intact cache at .*ids.*damaged shards \[0\].*pipe verify-cache")
def emptied_cache_shard(b: Bench):
    run = run_copy(b.base, b.tmp / "run")
    (run / "cache" / "logits.zarr" / "ids" / "c" / "0" / "0" / "0").write_bytes(b"")
    return ["train-student", b.base.config, "--run-dir", run]


@case("train-student", r"Expected safetensors weights in .*pickled\. Found only pickle weights")
def online_pickle_only_teacher(b: Bench):
    return [
        "train-student", b.base.config, "--mode", "online", "--name", "o",
        "--set", f"teachers.gpt.path='{b.base.models['pickled']}'",
    ]  # fmt: skip


@case("train-student", r"uses a different tokenizer than the prepared data.*token ids differ")
def online_teacher_with_another_tokenizer(b: Bench):
    return [
        "train-student", b.base.config, "--mode", "online", "--name", "o",
        "--set", f"teachers.gpt.path='{b.base.models['alien']}'",
    ]  # fmt: skip


@case("train-student", r"Got an output layer of 100 tokens")
def online_teacher_with_fewer_logits(b: Bench):
    return [
        "train-student", b.base.config, "--mode", "online", "--name", "o",
        "--set", f"teachers.gpt.path='{b.base.models['small']}'",
    ]  # fmt: skip


@case("train-student", r"Teacher 'llama' is not trained yet")
def online_without_teachers(b: Bench):
    run = run_copy(b.base, b.tmp / "run", cache=False, teachers=False)
    return ["train-student", b.base.config, "--mode", "online", "--run-dir", run]


@case("train-student", r"Expected at least one batch of 100000 windows")
def overwrite_student_with_a_batch_larger_than_the_data(b: Bench):
    """--overwrite of a complete student with an option that cannot work: the student stays."""
    return ["train-student", b.base.config, "--overwrite", "--set", "student.train.batch_size=100000"]


@case("train-student", r"max_steps")
def negative_max_steps(b: Bench):
    return ["train-student", b.base.config, "--name", "x", "--set", "student.train.max_steps=-5"]


@case("train-student", r"Expected no other process working on the student 'busy'\. Got one: pid \d+")
def student_locked_by_a_live_process(b: Bench):
    b.stack.enter_context(lock_held_by_another_process(b.base.run / "students" / "busy"))
    return ["train-student", b.base.config, "--name", "busy"]


@case("train-student", r"Expected a writable folder for the student 'cache' at .*Permission denied")
def read_only_students(b: Bench):
    public = public_dir()
    b.stack.callback(shutil.rmtree, public, True)
    config = public / "c.toml"
    shutil.copyfile(b.base.config, config)
    (public / "run" / "students").mkdir(parents=True)
    b.roots.append(public)
    b.run_inside = lambda: unwritable(public / "run" / "students")
    return ["train-student", config, "--run-dir", public / "run"]


@case("train-student", r"Expected prepared data in")
def student_without_data(b: Bench):
    return ["train-student", b.base.config, "--mode", "ce", "--run-dir", b.tmp / "run"]


@case(
    "train-student",
    r"Could not write the checkpoint .*step-00000004 \(No space left on device\)\. The last good checkpoint step-00000002 is kept",
)
def disk_full_at_a_checkpoint(b: Bench):
    from logitcache.pipeline import training

    real_save = training.save_file
    calls = []

    def full_from_the_second_checkpoint(tensors, path, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(path)
        if len(calls) > 2:  # optimizer + rng of step 2 went through
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, *args, **kwargs)

    b.monkeypatch.setattr(training, "save_file", full_from_the_second_checkpoint)
    b.fault = True
    return ["train-student", b.base.config, "--name", "full", "--run-dir", run_copy(b.base, b.tmp / "run")]


@case(
    "train-student",
    r"^error: Cache windows \d+-\d+ \(shard \d+(-\d+)?\) of .* could not be read\. .*pipe verify-cache",
)
def chunk_failing_in_a_loader_worker(b: Bench):
    """A chunk failing its checksum inside a DataLoader worker: one line, not the worker's traceback."""
    run = run_copy(b.base, b.tmp / "run")
    layout = open_cache(run / "cache" / "logits.zarr").layout
    for shard in sorted((run / "cache" / "logits.zarr" / "values" / "c").iterdir()):
        flip_byte_in_chunk(shard / "0" / "0", 0, layout.windows_per_shard // layout.windows_per_chunk)
    b.fault = True
    return [
        "train-student",
        b.base.config,
        "--name",
        "w",
        "--run-dir",
        run,
        "--set",
        "student.loader.workers=1",
    ]


# evaluate ------------------------------------------------------------------------------------


@case("evaluate", r"Expected a model directory at .*nowhere\. Got nothing")
def no_such_model(b: Bench):
    return ["evaluate", b.tmp / "nowhere", "--data", b.base.run / "data"]


@case(
    "evaluate",
    r"Expected safetensors weights in .*pickled\. Found only pickle weights \(pytorch_model\.bin\).*Convert",
)
def pickle_only_model(b: Bench):
    return ["evaluate", b.base.models["pickled"], "--data", b.base.run / "data"]


@case("evaluate", r"Expected safetensors weights in .*pickled\. Found only pickle weights")
def pickle_only_model_without_data(b: Bench):
    return ["evaluate", b.base.models["pickled"], "--blimp", REPO / "tests" / "fixtures" / "blimp_mini"]


@case("evaluate", r"Expected complete safetensors weights in .*truncated")
def truncated_model(b: Bench):
    return ["evaluate", b.base.models["truncated"], "--data", b.base.run / "data"]


@case("evaluate", r"uses a different tokenizer than the prepared data.*token ids differ")
def model_with_another_tokenizer(b: Bench):
    return [
        "evaluate",
        b.base.run / "teachers" / "llama",
        b.base.models["alien"],
        "--data",
        b.base.run / "data",
    ]


@case("evaluate", r"Got an output layer of 100 tokens")
def model_with_fewer_logits(b: Bench):
    return ["evaluate", b.base.models["small"], "--data", b.base.run / "data"]


@case("evaluate", r"Expected --data .* or --blimp .*Got neither")
def nothing_to_evaluate_on(b: Bench):
    return ["evaluate", b.base.run / "teachers" / "llama"]


@case("evaluate", r"Invalid value for '--out'.* is a directory.*See 'pipe evaluate --help'")
def out_is_a_folder(b: Bench):
    return ["evaluate", b.base.run / "teachers" / "llama", "--data", b.base.run / "data", "--out", b.tmp]


@case("evaluate", r"Expected prepared data in")
def data_not_prepared(b: Bench):
    return ["evaluate", b.base.run / "teachers" / "llama", "--data", b.tmp]


@case("evaluate", r"Expected a writable folder for the evaluation results at .*Permission denied")
def read_only_out(b: Bench):
    public = public_dir()
    b.stack.callback(shutil.rmtree, public, True)
    (public / "eval").mkdir()
    b.roots.append(public)
    b.run_inside = lambda: unwritable(public / "eval")
    return [
        "evaluate",
        b.base.run / "teachers" / "llama",
        "--data",
        b.base.run / "data",
        "--out",
        public / "eval" / "r.json",
    ]


@case(
    "evaluate",
    r"Could not write the evaluation results to .*r\.json \(No space left on device\)\. Any earlier results file there is unchanged",
)
def disk_full_writing_results(b: Bench):
    """The file system fills up as the results are written: the earlier results file stays whole."""
    (b.tmp / "r.json").write_text('{"earlier": "results"}\n')
    real_fsync = os.fsync

    def full(descriptor: int) -> None:
        if Path(f"/proc/self/fd/{descriptor}").resolve().name.startswith(".r.json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    b.monkeypatch.setattr(os, "fsync", full)
    return [
        "evaluate",
        b.base.run / "teachers" / "llama",
        "--data",
        b.base.run / "data",
        "--out",
        b.tmp / "r.json",
    ]


@case("evaluate", r"Expected trained models in .*Found none")
def run_without_models(b: Bench):
    run = run_copy(b.base, b.tmp / "run", cache=False, teachers=False)
    return ["evaluate", "--run-dir", run]


# report --------------------------------------------------------------------------------------


@case("report", r"nowhere")
def report_of_no_run(b: Bench):
    return ["report", b.tmp / "nowhere"]


@case("report", r"Expected a writable folder for the report at .*eval\. Got: Permission denied")
def read_only_eval(b: Bench):
    public = public_dir()
    b.stack.callback(shutil.rmtree, public, True)
    (public / "run" / "teachers" / "llama").mkdir(parents=True)
    shutil.copyfile(
        b.base.run / "teachers" / "llama" / "metrics.jsonl",
        public / "run" / "teachers" / "llama" / "metrics.jsonl",
    )
    (public / "run" / "eval").mkdir()
    b.roots.append(public)
    b.run_inside = lambda: unwritable(public / "run" / "eval")
    return ["report", public / "run"]


ADVICE = re.compile(
    r"\b(run|rerun|use|pass|remove|convert|rebuild|free|make|lower|raise|wait|move|choose|name|"
    r"copy|set|point|evaluate|prepare|train|check|did you mean)\b",
    re.IGNORECASE,
)


def test_there_are_at_least_30_cases_over_every_command():
    assert len(CASES) >= 30
    commands = {name.split("-")[0] for name in CASES} | {"-".join(n.split("-")[:2]) for n in CASES}
    for command in (
        "prepare-data",
        "train-teacher",
        "cache-logits",
        "verify-cache",
        "train-student",
        "evaluate",
        "report",
    ):
        assert command in commands


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_in_one_line_touching_nothing(
    name: str, base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    expected, make = CASES[name]
    with contextlib.ExitStack() as stack:
        bench = Bench(base, tmp_path, monkeypatch, stack)
        argv = make(bench)
        roots = [base.root, tmp_path, *bench.roots]
        before = snapshot(*roots)
        with bench.run_inside():
            code, err = pipe(argv, capsys)
        after = snapshot(*roots)
        monkeypatch.undo()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    assert re.search(expected, errors[0]), errors[0]
    assert ADVICE.search(errors[0].split(". ", 1)[-1]), f"no advice in: {errors[0]}"
    if bench.fault:  # failed mid-work: what it wrote may stay; nothing that existed changed
        assert {path: digest for path, digest in after.items() if path in before} == before
    else:
        assert after == before


# ----------------------------------------------------------------------------------------------
# Faults over more than one command


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    left, right = _weights(a), _weights(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_chunk_corrupted_mid_epoch_stops_in_one_line_and_the_last_checkpoint_resumes(
    base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A chunk that fails its checksum is first read at step s > 2 of the epoch (the quick verify at
    start reads no chunk data, so it passes): train-student stops there with one line naming the
    windows and shard; the checkpoint of step 2 * floor((s - 1) / 2) is intact; once the cache is
    repaired, the rerun resumes from it and ends with the weights of an uninterrupted run."""
    from logitcache.pipeline.data_order import MicroBatchSampler
    from logitcache.pipeline.student import make_order, student_seed
    from logitcache.pipeline.training import CHECKPOINT_DIR, checkpoints_newest_first

    run = run_copy(base, tmp_path / "run")
    config = load_config(base.config, [], run)
    store = run / "cache" / "logits.zarr"
    layout = open_cache(store).layout
    train = config.student.train
    data = PreparedData.open(run / "data")
    sampler = MicroBatchSampler(
        layout.num_windows, batch_size=train.batch_size, seed=student_seed(config),
        order=make_order(config, layout.num_windows, data.seq_len),
    )  # fmt: skip
    sampler.set_epoch(0, stop_step=train.max_steps)
    first_step: dict[int, int] = {}  # chunk -> the first step (1-based) that reads it
    for step, windows in enumerate(sampler, start=1):
        for chunk in sorted({w // layout.windows_per_chunk for w in windows}):
            first_step.setdefault(chunk, step)
    late = [chunk for chunk, step in first_step.items() if step > 2]
    assert late, f"every chunk is read by step 2: {first_step}"
    chunk = min(late, key=lambda c: first_step[c])
    step = first_step[chunk]
    per_shard = layout.windows_per_shard // layout.windows_per_chunk
    shard, inner = divmod(chunk, per_shard)
    victim = store / "values" / "c" / str(shard) / "0" / "0"
    pristine = victim.read_bytes()
    flip_byte_in_chunk(victim, inner, per_shard)

    argv = ["train-student", base.config, "--name", "mid", "--run-dir", run]
    code, err = pipe(argv, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    low = chunk * layout.windows_per_chunk
    assert re.search(
        rf"Cache windows {low}-\d+ \(shard {shard}\) of .*logits\.zarr could not be read", errors[0]
    )
    assert "pipe verify-cache" in errors[0]

    student = run / "students" / "mid"
    last = 2 * ((step - 1) // 2)  # the checkpoint written before the failing step
    assert [p.name for p in checkpoints_newest_first(student)][0] == f"step-{last:08d}"
    assert not list((student / CHECKPOINT_DIR).glob(".*tmp"))
    victim.write_bytes(pristine)  # the cache repaired (rebuilt)
    code, err = pipe(argv, capsys)
    assert code == 0, err
    assert "damaged" not in err  # the checkpoint was intact: no fallback to an older one
    _assert_same_weights(student, base.run / "students" / "cache")


def test_disk_full_during_an_overwrite_keeps_the_old_student_and_the_rerun_resumes(
    base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """--overwrite of a complete student; the disk fills up at the second checkpoint: one line, the
    old student waits whole in students/cache.replaced, the new one keeps its first checkpoint.
    The rerun (space freed) resumes from it, finishes with the weights of an uninterrupted run, and
    only then deletes the old student."""
    from logitcache.pipeline import training

    run = run_copy(base, tmp_path / "run", students=True)
    old = snapshot(run / "students" / "cache")
    real_save = training.save_file
    calls = []

    def full_from_the_second_checkpoint(tensors, path, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(training, "save_file", full_from_the_second_checkpoint)
    code, err = pipe(["train-student", base.config, "--overwrite", "--run-dir", run], capsys)
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err, err
    assert "No space left on device" in err and "step-00000002 is kept" in err
    replaced = run / "students" / "cache.replaced"
    assert snapshot(replaced) == {
        k.replace(str(run / "students" / "cache"), str(replaced)): v for k, v in old.items()
    }
    new = run / "students" / "cache"
    assert [p.name for p in (new / "checkpoints").iterdir()] == ["step-00000002"]  # no temp folder left

    code, err = pipe(["train-student", base.config, "--run-dir", run], capsys)
    assert code == 0, err
    assert not replaced.exists()
    _assert_same_weights(new, base.run / "students" / "cache")


def test_disk_full_in_cache_logits_keeps_written_shards_and_the_rerun_finishes(
    base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from zarr.storage import LocalStore

    run = run_copy(base, tmp_path / "run", cache=False)
    real_set = LocalStore.set

    async def full_after_first_shard(self, key, value):  # noqa: ANN001, ANN202
        if key.startswith("values/c/") and not key.startswith("values/c/0/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_after_first_shard)
    code, err = pipe(["cache-logits", base.config, "--run-dir", run], capsys)
    monkeypatch.undo()
    assert code == 2 and "the disk is full" in err and "Traceback" not in err, err
    first = snapshot(run / "cache" / "logits.zarr" / "ids" / "c" / "0")
    code, err = pipe(["cache-logits", base.config, "--run-dir", run], capsys)
    assert code == 0, err
    assert snapshot(run / "cache" / "logits.zarr" / "ids" / "c" / "0") == first  # shard 0 was not redone
    code, out = pipe(["verify-cache", run / "cache"], capsys)
    assert code == 0
    ours, theirs = open_cache(run / "cache" / "logits.zarr"), open_cache(base.run / "cache" / "logits.zarr")
    for name, array in ours.read_raw(slice(None)).items():
        np.testing.assert_array_equal(array, theirs.read_raw(slice(None))[name], err_msg=name)


def test_stale_locks_are_taken_over_with_a_note(tmp_path: Path):
    """A lock whose owner died (kill -9: the kernel dropped its flock) or whose file names a dead pid
    on this host is taken over, saying whose it was; a live owner's lock is refused."""
    from logitcache.pipeline.errors import StageError

    stage = tmp_path / "cache"
    with lock_held_by_another_process(stage) as holder:
        with pytest.raises(StageError, match=rf"pid {holder.pid} on host"):
            StageLock(stage, "the cache").acquire()
        holder.kill()
        holder.wait()
        notes: list[str] = []
        with StageLock(stage, "the cache", log=notes.append):
            owner = json.loads(lock_path(stage).read_text())
            assert owner["pid"] == os.getpid()
        assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "no longer running" in notes[0]
        assert not lock_path(stage).exists()  # released: removed

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock_path(stage).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    notes = []
    with StageLock(stage, "the cache", log=notes.append):
        pass
    assert "no longer running" in notes[0]


def test_a_lock_dies_with_its_owner_even_when_a_forked_worker_lives_on(tmp_path: Path):
    """A DataLoader worker is a fork of the trainer: it must not keep the trainer's lock alive after
    the trainer is killed (kill -9 leaves the workers running for a while)."""
    stage = tmp_path / "students" / "s"
    script = f"""
import os, signal, sys, time
from pathlib import Path
from logitcache.pipeline.preflight import StageLock
lock = StageLock(Path({str(stage)!r}), "the student")
lock.acquire()
worker = os.fork()
if worker == 0:  # the worker: outlives its parent
    os.write(1, b"ready\\n")  # past the fork hooks (one write: lines do not interleave)
    time.sleep(60)
    os._exit(0)
os.write(1, f"{{worker}}\\n".encode())
os.kill(os.getpid(), signal.SIGKILL)
"""
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    lines = {owner.stdout.readline().strip() for _ in range(2)}  # the worker's pid and "ready"
    worker = int(next(line for line in lines if line != "ready"))
    owner.wait()
    worker_alive = [worker] if Path(f"/proc/{worker}").exists() else []
    try:
        assert worker_alive, "the forked worker should still be running"
        notes: list[str] = []
        with StageLock(stage, "the student", log=notes.append):  # taken over, not refused
            pass
        assert len(notes) == 1 and f"pid {owner.pid}" in notes[0]
    finally:
        for pid in worker_alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def test_verify_cache_exit_codes_match_the_readme(
    base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """README: exit 1 when the cache fails a check, 2 on a user error (bad path or option), 0 when clean."""
    readme = (REPO / "README.md").read_text()
    assert "exit 1 when the cache fails a check, 2 on a user error" in readme
    code, _ = pipe(["verify-cache", base.run / "cache"], capsys)
    assert code == 0
    run = run_copy(base, tmp_path / "run")
    layout = open_cache(run / "cache" / "logits.zarr").layout
    per_shard = layout.windows_per_shard // layout.windows_per_chunk
    flip_byte_in_chunk(run / "cache" / "logits.zarr" / "tail" / "c" / "0" / "0", 0, per_shard)
    code, _ = pipe(["verify-cache", run / "cache", "--quick"], capsys)
    assert code == 0  # --quick reads no chunk data
    code, out = pipe(["verify-cache", run / "cache"], capsys)
    assert code == 1
    code, _ = pipe(["verify-cache", tmp_path / "nowhere"], capsys)
    assert code == 2


def test_the_python_api_refuses_what_the_cli_refuses(base: Base, tmp_path: Path):
    """The library entry points apply the same refusals: a damaged cache to ``open_cache`` and
    ``StudentDataset`` (before any read), a pickle-only model to ``evaluate_models`` (before any
    model is loaded, the intact one listed first included)."""
    from logitcache.pipeline.errors import CacheError, TeacherError
    from logitcache.pipeline.evaluation import EvalOptions, evaluate_models
    from logitcache.pipeline.student_data import StudentDataset

    run = run_copy(base, tmp_path / "run")
    store = run / "cache" / "logits.zarr"
    (store / "values" / "c" / "0" / "0" / "0").write_bytes(b"")
    with pytest.raises(CacheError, match=r"Expected an intact cache at .*values.*damaged shards \[0\]"):
        open_cache(store)
    windows = PreparedData.open(run / "data").windows("train")
    with pytest.raises(CacheError, match="Expected an intact cache"):
        StudentDataset(windows, store)
    options = EvalOptions(data_dir=base.run / "data")
    with pytest.raises(TeacherError, match="Found only pickle weights"):
        evaluate_models([base.run / "teachers" / "llama", base.models["pickled"]], options=options)
