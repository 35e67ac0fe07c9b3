"""Shared fixtures: small slices of the embedded real corpus and tiny configs that train in seconds."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import logitcache  # noqa: F401  (first of ours: in this checkout `import kernels` must not find ./kernels)

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("LOGITCACHE_TEST_CORPUS", REPO / "corpus"))  # override to test on another corpus

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one intra-op thread is fastest, and several threads per process spin
# against each other when tests run subprocesses (DDP ranks, resumed runs) side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def corpus_slice(name: str, chars: int) -> str:
    """The first ``chars`` characters of an embedded corpus source, cut at a paragraph break."""
    text = gzip.decompress((CORPUS / name).read_bytes()).decode("utf-8")
    cut = text.rfind("\n\n", 0, chars)
    return text[: cut if cut > 0 else chars]


@pytest.fixture(scope="session")
def corpus_sources() -> list[str]:
    names = sorted(p.name for p in CORPUS.glob("*.txt.gz"))
    assert len(names) >= 5, f"expected the embedded corpus in {CORPUS}"
    return names


@pytest.fixture
def small_corpus(tmp_path: Path, corpus_sources: list[str]) -> Path:
    """A directory of four real text files, ~60k characters each (about 50k tokens in all)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for name in corpus_sources[:4]:
        (root / name.removesuffix(".gz")).write_text(corpus_slice(name, 60_000), encoding="utf-8")
    return root


# The tiny Llama of the tests' teachers and students (the body of a [*.model] table).
TINY_LLAMA = """family = "llama"
hidden_size = 32
num_layers = 2
num_heads = 4
num_kv_heads = 2
intermediate_size = 64"""

TINY_TEACHERS = f"""
[teachers.llama.model]
{TINY_LLAMA}

[teachers.llama.train]
lr = 3e-3
batch_size = 16
epochs = 1
warmup_steps = 2
checkpoint_every = 1000
log_every = 1
eval_batch_size = 64

[teachers.gpt.model]
family = "gpt2"
hidden_size = 32
num_layers = 2
num_heads = 4
intermediate_size = 64

[teachers.gpt.train]
lr = 3e-3
batch_size = 16
epochs = 1
log_every = 1
checkpoint_every = 1000
"""


def write_config(
    path: Path, corpus: Path, run_dir: Path, *, vocab: int = 512, seq_len: int = 32, extra: str = ""
) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""
            [run]
            dir = "{run_dir}"
            seed = 7

            [data]
            corpus = "{corpus}"
            vocab_size = {vocab}
            seq_len = {seq_len}
            document_words = 64
            dev_fraction = 0.1
            test_fraction = 0.05
            """
        )
        + TINY_TEACHERS
        + extra
    )
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, small_corpus: Path) -> Path:
    return write_config(tmp_path / "tiny.toml", small_corpus, tmp_path / "run")


def kill_when(args: list[str], ready: Callable[[], bool], *, timeout: float = 240) -> None:
    """Start ``args``, wait until ``ready()`` holds, then kill -9 it (a crash at that moment).

    Fails the test if the process ends on its own first (nothing was interrupted).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the process ended before it could be killed: {log.read()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
