"""A batched LLM engine: continuous batching over a paged KV pool, VTU prefill, DyRate pruning per
sequence inside the batch, and a visual-prefix cache (pure PyTorch, no Ray).

Modules: ``block_manager`` (the pool of KV blocks and their reference counts), ``sequence_kv`` (one
sequence's blocks and entries; the pruner's view of them), ``request`` (one answer in flight),
``prefix_cache`` (cached visual prefixes), ``scheduler`` (admission, preemption, prefill chunks),
``runner`` (the model work), ``engine`` (the loop and its API).
"""
from dymu.engine.engine import Engine, EngineConfig
from dymu.engine.request import StepOutput

__all__ = ["Engine", "EngineConfig", "StepOutput"]
