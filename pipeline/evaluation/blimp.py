"""BLiMP minimal pairs: read the native JSONL files, score sentences with a causal LM, count accuracy.

Data: a directory of ``*.jsonl`` files in BLiMP's native format (Warstadt et al., 2020; the BabyLM
evaluation data uses the same), one pair per line with at least the fields ``sentence_good``,
``sentence_bad``, ``UID`` (the paradigm), ``linguistics_term`` (the phenomenon) and ``field``; other
fields (``pairID``, ...) are kept out of the way. Lines that are blank are skipped.

Score of a sentence s tokenized as ``x_1..x_L`` (the tokenizer's own ids, no special tokens) with
``x_0`` = the BOS token prepended::

    score(s) = sum_{i=1..L} log p(x_i | x_0 .. x_{i-1})

a sum, not length-normalised, and no end-of-sentence token. A pair is right when
``score(good) > score(bad)`` strictly: a tie counts as wrong (lm-evaluation-harness 0.4+ takes
``np.argmax([good, bad])``, which counts a tie as right: a model that scores every pair equal gets 0
here and 1 there).

Accuracy of a paradigm = right pairs / pairs. Per phenomenon and per field the accuracy is the
unweighted mean of the accuracies of their paradigms, and overall is the unweighted mean over all
paradigms (in BLiMP every paradigm has the same number of pairs, so these equal pooled counts).

Sentences are scored in batches, right-padded with an attention mask: a causal model's prediction at
a real position depends only on the positions before it, so padding after the sentence changes no
score (:func:`sentence_log_probs_reference` scores one sentence at a time, for the tests).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logitcache.pipeline.errors import DataError, TeacherError
from logitcache.pipeline.evaluation.loading import max_positions, output_vocab_size
from logitcache.pipeline.progress import progress_bar

REQUIRED_FIELDS = ("sentence_good", "sentence_bad", "UID", "field", "linguistics_term")


@dataclass(frozen=True)
class BlimpPair:
    good: str
    bad: str
    paradigm: str  # UID
    phenomenon: str  # linguistics_term
    field: str
    source: str  # "file:line", for messages


def read_blimp(directory: str | Path) -> list[BlimpPair]:
    """Every pair of every ``*.jsonl`` (or ``*.jsonl.gz``) file of ``directory`` (name order, lines in order)."""
    directory = Path(directory)
    if not directory.is_dir():
        got = "a file" if directory.exists() else "nothing there"
        raise DataError(f"Expected a directory of BLiMP .jsonl files at {directory}. Got {got}.")
    files = sorted(p for p in directory.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")) and p.is_file())
    if not files:
        raise DataError(
            f"Expected BLiMP .jsonl files in {directory}. Got none: point --blimp at the folder that holds them."
        )
    pairs: list[BlimpPair] = []
    paradigm_seen: dict[str, tuple[str, str, str]] = {}  # UID -> (phenomenon, field, first source)
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                pair = _parse_line(line, f"{path}:{lineno}")
                known = paradigm_seen.setdefault(pair.paradigm, (pair.phenomenon, pair.field, pair.source))
                if known[:2] != (pair.phenomenon, pair.field):
                    raise DataError(
                        f"{pair.source}: expected paradigm {pair.paradigm!r} to keep linguistics_term "
                        f"{known[0]!r} and field {known[1]!r} (as at {known[2]}). "
                        f"Got {pair.phenomenon!r} and {pair.field!r}."
                    )
                pairs.append(pair)
    if not pairs:
        raise DataError(f"Expected BLiMP pairs in the .jsonl files of {directory}. Got only empty files.")
    return pairs


def subset_per_paradigm(pairs: list[BlimpPair], per_paradigm: int, *, seed: int = 0) -> list[BlimpPair]:
    """At most ``per_paradigm`` pairs of each paradigm (0 = all), the same ones on every machine.

    Each paradigm keeps the pairs with the smallest SHA-256 of (seed, paradigm, position in the
    paradigm): a uniform sample that does not depend on the other paradigms, in file order.
    """
    if per_paradigm <= 0:
        return pairs
    by_paradigm: dict[str, list[int]] = {}
    for index, pair in enumerate(pairs):
        by_paradigm.setdefault(pair.paradigm, []).append(index)

    def rank(paradigm: str, position: int) -> bytes:
        return hashlib.sha256(f"blimp-subset:{seed}:{paradigm}:{position}".encode()).digest()

    keep: set[int] = set()
    for paradigm, indices in by_paradigm.items():
        ranked = sorted(range(len(indices)), key=lambda position: rank(paradigm, position))
        keep.update(indices[position] for position in ranked[:per_paradigm])
    return [pair for index, pair in enumerate(pairs) if index in keep]


def _parse_line(line: str, source: str) -> BlimpPair:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: expected a JSON object. Got invalid JSON ({exc.msg}).") from None
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object. Got {type(record).__name__}.")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise DataError(
            f"{source}: expected the fields {', '.join(REQUIRED_FIELDS)}. Missing {', '.join(missing)}."
        )
    wrong = [name for name in REQUIRED_FIELDS if not isinstance(record[name], str)]
    if wrong:
        raise DataError(f"{source}: expected {', '.join(wrong)} to be strings. Got {record[wrong[0]]!r}.")
    return BlimpPair(
        good=record["sentence_good"],
        bad=record["sentence_bad"],
        paradigm=record["UID"],
        phenomenon=record["linguistics_term"],
        field=record["field"],
        source=source,
    )


# ----------------------------------------------------------------------------------------------
# Scoring


def bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token put before every sentence: BOS, or EOS for tokenizers without one (GPT-2)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise TeacherError(
        f"Expected the tokenizer {tokenizer.name_or_path} to define a BOS (or EOS) token to start sentences. Got neither."
    )


def encode_sentences(tokenizer: PreTrainedTokenizerBase, sentences: list[str]) -> list[list[int]]:
    """``[BOS] + tokens`` of each sentence (tokens without special tokens)."""
    bos = bos_token_id(tokenizer)
    encoded = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    return [[bos, *ids] for ids in encoded]


@torch.no_grad()
def sentence_log_probs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: list[str],
    *,
    batch_size: int = 64,
    progress: bool | None = None,
    sources: list[str] | None = None,
) -> np.ndarray:
    """(S,) float64: ``sum_{i>=1} log p(x_i | x_<i)`` of each sentence, ``x_0`` = BOS (batched)."""
    encoded = encode_sentences(tokenizer, sentences)
    _check_fits(model, encoded, sources)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    scores = np.zeros(len(encoded), dtype=np.float64)
    was_training = model.training
    model.eval()
    for start in progress_bar(range(0, len(order), batch_size), progress=progress, desc="BLiMP", leave=False):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
        for r, i in enumerate(rows):
            input_ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
            attention_mask[r, : len(encoded[i])] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        logits = logits.float()  # (B, L-1, V)
        # log p(x_i | x_<i) = z_{x_i} - logsumexp(z), without materialising a (B, L-1, V) log-softmax.
        target = logits.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, L-1)
        target = target - torch.logsumexp(logits, dim=-1)  # (B, L-1)
        # where(), not a product: whatever a padded position holds (even NaN) must not leak in.
        target = torch.where(attention_mask[:, 1:].bool(), target.double(), 0.0)  # (B, L-1)
        scores[rows] = target.sum(dim=-1).cpu().numpy()
    model.train(was_training)
    return scores


@torch.no_grad()
def sentence_log_probs_reference(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sentence: str
) -> float:
    """The score of one sentence, unbatched and unpadded (the plain path the batched one must match)."""
    ids = torch.tensor([encode_sentences(tokenizer, [sentence])[0]], device=next(model.parameters()).device)
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)  # (L-1, V)
    return float(log_probs.gather(-1, ids[0, 1:, None]).sum())


def _check_fits(model: PreTrainedModel, encoded: list[list[int]], sources: list[str] | None) -> None:
    limit = max_positions(model)
    vocab = output_vocab_size(model)
    for i, ids in enumerate(encoded):
        where = sources[i] if sources else f"sentence {i}"
        if limit is not None and len(ids) > limit:
            raise DataError(
                f"{where}: expected sentences of at most {limit} tokens with BOS (the model's limit). Got {len(ids)}."
            )
        if max(ids) >= vocab:
            raise TeacherError(
                f"{where}: expected token ids below the model's vocabulary ({vocab}). Got id {max(ids)}: "
                "the tokenizer does not belong to this model."
            )


# ----------------------------------------------------------------------------------------------
# Accuracy


@dataclass(frozen=True)
class ParadigmResult:
    phenomenon: str
    field: str
    pairs: int
    correct: int
    ties: int  # counted as wrong

    @property
    def accuracy(self) -> float:
        return self.correct / self.pairs


@dataclass(frozen=True)
class BlimpResult:
    overall: float  # unweighted mean over paradigms
    fields: dict[str, float]  # mean over the field's paradigms
    phenomena: dict[str, float]  # mean over the phenomenon's paradigms
    paradigms: dict[str, ParadigmResult]
    good_scores: np.ndarray = dataclasses.field(repr=False)  # (P,) float64, in pair order
    bad_scores: np.ndarray = dataclasses.field(repr=False)  # (P,) float64

    @property
    def pairs(self) -> int:
        return int(self.good_scores.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "pairs": self.pairs,
            "fields": self.fields,
            "phenomena": self.phenomena,
            "paradigms": {
                uid: {
                    "accuracy": p.accuracy,
                    "pairs": p.pairs,
                    "correct": p.correct,
                    "ties": p.ties,
                    "linguistics_term": p.phenomenon,
                    "field": p.field,
                }
                for uid, p in self.paradigms.items()
            },
        }


def blimp_accuracy(pairs: list[BlimpPair], good_scores: np.ndarray, bad_scores: np.ndarray) -> BlimpResult:
    """Accuracies from the scores of each pair's good and bad sentence (right iff good > bad)."""
    good = np.asarray(good_scores, dtype=np.float64)
    bad = np.asarray(bad_scores, dtype=np.float64)
    if good.shape != (len(pairs),) or bad.shape != (len(pairs),):
        raise ValueError(
            f"need one good and one bad score per pair: {len(pairs)} pairs, {good.shape}, {bad.shape}"
        )
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # UID -> [pairs, correct, ties]
    labels: dict[str, tuple[str, str]] = {}
    for pair, g, b in zip(pairs, good, bad, strict=True):
        c = counts[pair.paradigm]
        c[0] += 1
        c[1] += int(g > b)
        c[2] += int(g == b)
        labels.setdefault(pair.paradigm, (pair.phenomenon, pair.field))
    paradigms = {
        uid: ParadigmResult(labels[uid][0], labels[uid][1], n, right, ties)
        for uid, (n, right, ties) in sorted(counts.items())
    }

    def mean_by(key: str) -> dict[str, float]:
        groups: dict[str, list[float]] = defaultdict(list)
        for p in paradigms.values():
            groups[getattr(p, key)].append(p.accuracy)
        return {name: float(np.mean(accs)) for name, accs in sorted(groups.items())}

    return BlimpResult(
        overall=float(np.mean([p.accuracy for p in paradigms.values()])),
        fields=mean_by("field"),
        phenomena=mean_by("phenomenon"),
        paradigms=paradigms,
        good_scores=good,
        bad_scores=bad,
    )


def evaluate_blimp(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[BlimpPair],
    *,
    batch_size: int = 64,
    progress: bool | None = None,
) -> BlimpResult:
    """Score both sentences of every pair (in one batched pass) and count accuracies."""
    sentences = [p.good for p in pairs] + [p.bad for p in pairs]
    sources = [p.source for p in pairs] * 2
    scores = sentence_log_probs(
        model, tokenizer, sentences, batch_size=batch_size, progress=progress, sources=sources
    )
    return blimp_accuracy(pairs, scores[: len(pairs)], scores[len(pairs) :])
