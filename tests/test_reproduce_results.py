"""scripts/reproduce_results.py: how caches of equal storage are chosen, and how the storage levels
of the alpha = 1 comparison are read back from its experiments.json."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from types import SimpleNamespace

from .conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location(
        "reproduce_results", REPO / "scripts" / "reproduce_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_results"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


rr = _load()


class SizedExperiment(rr.Experiment):
    """An Experiment whose caches are not built: each has a given size (bytes per position)."""

    def __init__(self, sizes: dict[str, float], **args):
        defaults = {
            "sampled_candidates": "8,16,32,64",
            "hybrid_tail_candidates": "2,4,8,16",
            "run_dir": "unused",
            "estimate_sizes": False,
        }
        super().__init__(argparse.Namespace(**(defaults | args)))
        self.sizes, self.built = sizes, []

    def ensure_cache(self, variant):
        self.built.append(variant.name)
        self.cache_summaries[variant.cache_key()] = {"bytes_per_position": self.sizes[variant.name]}


def test_closest_in_size_builds_in_order_until_the_target_and_takes_the_closer():
    sizes = {"sampled-n8": 10.0, "sampled-n16": 18.0, "sampled-n32": 34.0, "sampled-n64": 66.0}
    exp = SizedExperiment(sizes)
    chosen = exp.sampled_variant(20.0)
    assert chosen.name == "sampled-n16"  # 18 is closer to 20 than 34
    assert chosen.cache == ("cache.mode=sampled", "cache.samples=16")
    assert exp.built == ["sampled-n8", "sampled-n16", "sampled-n32"]  # stops at the first >= 20
    assert SizedExperiment(sizes).sampled_variant(30.0).name == "sampled-n32"
    # larger than every candidate: the largest
    assert SizedExperiment(sizes).sampled_variant(500.0).name == "sampled-n64"


class EstimatedExperiment(SizedExperiment):
    """With --estimate-sizes: each candidate's size is the dry run's estimate; no cache is built."""

    def __init__(self, sizes: dict[str, float], **args):
        super().__init__(sizes, estimate_sizes=True, **args)
        self.estimated = []

    def config(self, run, overrides):
        return SimpleNamespace(run=run, overrides=tuple(overrides))

    def estimate(self, config):
        name = {v.cache: v.name for v in self.candidates()}[config.overrides]
        self.estimated.append((config.run.name, name))
        return SimpleNamespace(bytes_per_position=self.sizes[name])

    def candidates(self):
        return [
            rr.Variant(f"sampled-n{n}", ("cache.mode=sampled", f"cache.samples={n}"), ())
            for n in (8, 16, 32, 64)
        ]


def test_estimated_sizes_choose_the_same_cache_without_building_any(tmp_path):
    sizes = {"sampled-n8": 10.0, "sampled-n16": 18.0, "sampled-n32": 34.0, "sampled-n64": 66.0}
    exp = EstimatedExperiment(sizes, run_dir=str(tmp_path))
    assert exp.sampled_variant(20.0).name == "sampled-n16"
    assert exp.built == []  # the chosen cache is built when its students are trained
    # estimated in order until the first >= 20, in the base run (a dry run writes nothing)
    assert exp.estimated == [(tmp_path.name, n) for n in ("sampled-n8", "sampled-n16", "sampled-n32")]
    assert not (tmp_path / "experiments").exists()
    assert EstimatedExperiment(sizes, run_dir=str(tmp_path)).sampled_variant(30.0).name == "sampled-n32"


def test_storage_level_at_alpha_1():
    sizes = {"topk-k16": 25.0, "sampled-n8": 10.0, "sampled-n16": 18.0, "sampled-n32": 34.0}
    sizes |= {"hybrid-k8-m2": 15.0, "hybrid-k8-m4": 19.0, "hybrid-k8-m8": 27.0}
    sizes |= {"hybrid-k4-m2": 9.0, "hybrid-k4-m4": 12.0, "hybrid-k4-m8": 17.0, "hybrid-k4-m16": 26.0}
    level, variants = SizedExperiment(sizes).storage_level(16, [])
    assert level == {
        "k": 16,
        "bytes_per_position": 25.0,
        "topk": ["topk-k16-a1"],
        "sampled": ["sampled-n16-a1"],  # 18 is 7 from 25, 34 is 9
        "hybrid": ["hybrid-k8-m8-a1"],  # head 16 // 2 by default; 27 is 2 from 25, 19 is 6
    }
    assert [v.student for v in variants] == [rr.ALPHA_1] * 3
    assert variants[2].cache == ("cache.mode=hybrid", "cache.k=8", "cache.tail_samples=8")
    level, variants = SizedExperiment(sizes).storage_level(16, [4, 8])
    assert level["hybrid"] == ["hybrid-k4-m16-a1", "hybrid-k8-m8-a1"]
    assert len(variants) == 4


def test_storage_levels_read_back_from_the_document():
    config = SimpleNamespace(
        cache=SimpleNamespace(k=16, temperature=1.0),
        student=SimpleNamespace(distill=SimpleNamespace(temperature=1.0)),
    )
    trained = [
        "topk",
        "sampled-n128-a1",
        "hybrid-k16-m48-a1",
        "sweep-k64-T1-a1",
        "topk-k16-a1",
        "sampled-n16-a1",
    ]
    document = {
        "meta": {"topk_k": 64},
        "rows": [{"variant": name, "bytes_per_position": 90.0} for name in trained],
        "variants": {
            "main": ["ce", "topk", "sampled-n128", "sampled-n128-a1", "hybrid-k16-m48", "hybrid-k16-m48-a1"],
            "sweep": [
                {
                    "name": "sweep-k64-T1-a0.5",
                    "cache": ["cache.k=64", "cache.temperature=1.0"],
                    "student": ["student.distill.alpha=0.5"],
                },
                {
                    "name": "sweep-k64-T1-a1",
                    "cache": ["cache.k=64", "cache.temperature=1.0"],
                    "student": ["student.distill.alpha=1.0"],
                },
            ],
            "levels": [
                {
                    "k": 16,
                    "bytes_per_position": 25.0,
                    "topk": ["topk-k16-a1"],
                    "sampled": ["sampled-n16-a1"],
                    "hybrid": ["hybrid-k8-m8-a1"],
                }
            ],
        },
    }
    main, level = rr._storage_levels(document, config)
    assert main == {
        "k": 64,
        "bytes_per_position": 90.0,
        "topk": ["sweep-k64-T1-a1"],
        "sampled": ["sampled-n128-a1"],
        "hybrid": ["hybrid-k16-m48-a1"],
    }
    # a variant without rows (not trained yet) is left out
    assert level == {
        "k": 16,
        "bytes_per_position": 25.0,
        "topk": ["topk-k16-a1"],
        "sampled": ["sampled-n16-a1"],
        "hybrid": [],
    }
    # a document written before --storage-ks existed has the main level only
    del document["variants"]["levels"]
    assert len(rr._storage_levels(document, config)) == 1


def test_cache_labels():
    assert rr._cache_label("topk-k16-a1") == "top-16"
    assert rr._cache_label("sweep-k64-T1-a1") == "top-64"
    assert rr._cache_label("sampled-n24-a1") == "sampled, 24 draws"
    assert rr._cache_label("hybrid-k8-m4-a1") == "hybrid, top-8 head + 4 tail draws"


def test_storage_levels_parse_heads_and_skip_taken_variants():
    sizes = {"topk-k16": 25.0, "sampled-n8": 10.0, "sampled-n16": 18.0, "sampled-n32": 34.0}
    sizes |= {"hybrid-k8-m2": 15.0, "hybrid-k8-m4": 19.0, "hybrid-k8-m8": 27.0}
    sizes |= {"hybrid-k4-m2": 9.0, "hybrid-k4-m4": 12.0, "hybrid-k4-m8": 17.0, "hybrid-k4-m16": 26.0}
    levels, variants = SizedExperiment(sizes).storage_levels("16:4/8", taken={"sampled-n16-a1"})
    assert [level["hybrid"] for level in levels] == [["hybrid-k4-m16-a1", "hybrid-k8-m8-a1"]]
    assert [v.name for v in variants] == ["topk-k16-a1", "hybrid-k4-m16-a1", "hybrid-k8-m8-a1"]


def test_levels_only_section_has_the_table_and_a_verdict_per_hybrid():
    names = {
        "topk-k16-a1": 700.0,
        "sampled-n24-a1": 280.0,
        "hybrid-k2-m16-a1": 279.0,
        "hybrid-k8-m4-a1": 300.0,
    }
    rows = [
        {"variant": name, "seed": seed, "perplexity": ppl + seed, "ece": 0.02, "bytes_per_position": 28.0}
        for seed in (1, 2)
        for name, ppl in names.items()
    ]
    document = {
        "meta": {
            "command": "python scripts/reproduce_results.py --levels-only lv",
            "date": "2026-12-03",
            "commit": "abc1234",
            "device": "CPU",
            "wall_minutes": 3.0,
            "seeds": [1, 2],
            "config": "configs/small.toml",
        },
        "rows": rows,
        "levels": [
            {
                "k": 16,
                "bytes_per_position": 28.8,
                "topk": ["topk-k16-a1"],
                "sampled": ["sampled-n24-a1"],
                "hybrid": ["hybrid-k2-m16-a1", "hybrid-k8-m4-a1", "hybrid-k4-m8-a1"],  # the last not trained
            }
        ],
    }
    config = SimpleNamespace(
        teachers={"a": None, "b": None},
        student=SimpleNamespace(model=SimpleNamespace(family="llama", hidden_size=128, num_layers=4)),
    )
    text = rr.render_levels_only(document, config)
    assert text.startswith("## `small.toml`: cache modes at equal storage, alpha = 1, seeds 1, 2")
    table = [line for line in text.splitlines() if line.startswith("| top-16")]
    assert [line.split(" | ")[1] for line in table] == [
        "top-16",
        "sampled, 24 draws",
        "hybrid, top-2 head + 16 tail draws",
        "hybrid, top-8 head + 4 tail draws",
    ]
    assert "| 281.5 (281.0-282.0) |" in table[1]
    verdicts = [line for line in text.splitlines() if line.startswith("- At the storage of")]
    assert len(verdicts) == 2 and "hybrid, top-8 head + 4 tail draws" in verdicts[1]


def test_sections_are_replaced_in_place_and_name_their_option(tmp_path):
    out = tmp_path / "results.md"
    out.write_text("# Results\n\nhand-written text\n")
    rr.write_section("small", "first", out, "--one-run")
    rr.write_section("small-levels", "levels", out, "--levels-only")
    rr.write_section("small", "second", out, "--one-run")
    text = out.read_text()
    assert text.startswith("# Results\n\nhand-written text\n")
    assert "first" not in text and text.count("second") == 1 and text.count("levels\n") == 1
    assert (
        "<!-- section small-levels: begin (scripts/reproduce_results.py --levels-only small-levels) -->"
        in text
    )
    assert text.index("small: end") < text.index("small-levels: begin")  # the replaced one kept its place
