"""logitcache: offline knowledge distillation of language models from a cached teacher top-k.

The public Python API (docs/api.md). Names load their module on first use, so ``import
logitcache`` stays cheap (no torch, zarr or transformers until a name is used)::

    import logitcache as lc

    lc.build_cache({"llama": "teachers/llama"}, "cache/logits.zarr", data="run/data", k=64)
    dataset = lc.open_dataset("run/cache")                 # a torch Dataset, one window per item
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, collate_fn=lc.collate_batches)
    params = lc.SparseKDParams.from_alpha(0.5, temperature=2.0)
    loss = lc.distillation_loss(model(input_ids=batch["input_ids"]).logits, batch, params)

Hugging Face ``Trainer``: :class:`DistillationTrainer` and :class:`DistillationCollator`
(``logitcache.integrations.hf_trainer``; needs ``accelerate``, as ``Trainer`` does).
"""

import importlib
from typing import TYPE_CHECKING, Any

from logitcache import _source_tree

_source_tree.install()  # in a source checkout: ./kernels is logitcache.kernels, never `kernels`

if TYPE_CHECKING:
    from logitcache.cache import CacheReader, open_cache
    from logitcache.integrations.hf_trainer import DistillationCollator, DistillationTrainer
    from logitcache.kernels import SparseKDParams, fused_linear_sparse_kd_loss, sparse_kd_loss
    from logitcache.pipeline.cache_logits import build_cache
    from logitcache.pipeline.cache_logits import verify as verify_cache
    from logitcache.pipeline.config import CacheConfig
    from logitcache.pipeline.errors import LogitcacheError
    from logitcache.pipeline.student import distillation_loss, fused_distillation_loss
    from logitcache.pipeline.student_data import DistillationDataset, collate_batches, open_dataset

_EXPORTS = {  # public name -> (module, name there)
    "CacheConfig": ("logitcache.pipeline.config", "CacheConfig"),
    "CacheReader": ("logitcache.cache", "CacheReader"),
    "DistillationCollator": ("logitcache.integrations.hf_trainer", "DistillationCollator"),
    "DistillationDataset": ("logitcache.pipeline.student_data", "DistillationDataset"),
    "DistillationTrainer": ("logitcache.integrations.hf_trainer", "DistillationTrainer"),
    "LogitcacheError": ("logitcache.pipeline.errors", "LogitcacheError"),
    "SparseKDParams": ("logitcache.kernels", "SparseKDParams"),
    "build_cache": ("logitcache.pipeline.cache_logits", "build_cache"),
    "collate_batches": ("logitcache.pipeline.student_data", "collate_batches"),
    "distillation_loss": ("logitcache.pipeline.student", "distillation_loss"),
    "fused_distillation_loss": ("logitcache.pipeline.student", "fused_distillation_loss"),
    "fused_linear_sparse_kd_loss": ("logitcache.kernels", "fused_linear_sparse_kd_loss"),
    "open_cache": ("logitcache.cache", "open_cache"),
    "open_dataset": ("logitcache.pipeline.student_data", "open_dataset"),
    "sparse_kd_loss": ("logitcache.kernels", "sparse_kd_loss"),
    "verify_cache": ("logitcache.pipeline.cache_logits", "verify"),
}


def __getattr__(name: str) -> Any:
    """Import the module of ``name`` on first use (PEP 562)."""
    if name == "__version__":
        from logitcache.pipeline import __version__

        return __version__
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "CacheConfig",
    "CacheReader",
    "DistillationCollator",
    "DistillationDataset",
    "DistillationTrainer",
    "LogitcacheError",
    "SparseKDParams",
    "build_cache",
    "collate_batches",
    "distillation_loss",
    "fused_distillation_loss",
    "fused_linear_sparse_kd_loss",
    "open_cache",
    "open_dataset",
    "sparse_kd_loss",
    "verify_cache",
]
