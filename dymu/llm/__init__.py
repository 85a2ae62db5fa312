"""The LLM side: VTU prefill, a KV cache made for pruning, and DyRate-style progressive pruning.

Typical use, on a Hugging Face ``*ForCausalLM`` or LLaVA model::

    sequence = build_sequence(model, [before_ids, merged_tokens, after_ids])
    result = generate(model, sequence, GenerateConfig(max_new_tokens=256, prune=PruneConfig(enabled=True)),
                      tokenizer=tokenizer, on_token=print)

Modules: ``sequence`` (the input: unique rows + mapping), ``decoder`` with ``qwen2`` / ``llama`` /
``qwen_vl`` (the HF modules the loop runs on; Qwen2.5-VL / Qwen3-VL text decoders with M-RoPE), ``mrope``
(their stock (t, h, w) positions and prompts built from token ids), ``vtu`` (prefill), ``kv_cache`` / ``grouped_cache`` (caches), ``generate`` (the
loop), ``prune`` (DyRate-style pruning), ``rate_model`` (a small learned rate predictor), ``config``.
"""
import importlib
import sys
from types import ModuleType
from typing import Any

# Each public name and the submodule it lives in. Imported on first use, so that `from dymu.llm.config import ...`
# (the typed config, read by every CLI command before anything starts) does not pull in torch.
_SUBMODULE = {
    "GenerateConfig": "config",
    "PruneConfig": "config",
    "Decoder": "decoder",
    "load_decoder": "decoder",
    "Generation": "generate",
    "GenerationResult": "generate",
    "decode_step": "generate",
    "generate": "generate",
    "new_cache": "generate",
    "GroupedKVCache": "grouped_cache",
    "KVCache": "kv_cache",
    "AttentionFallRule": "prune",
    "AttentionStats": "prune",
    "LinearSchedule": "prune",
    "Probe": "prune",
    "Pruner": "prune",
    "RatePredictor": "prune",
    "AttentionTrace": "rate_model",
    "LearnedRate": "rate_model",
    "keep_targets": "rate_model",
    "record_trace": "rate_model",
    "VirtualSequence": "sequence",
    "build_sequence": "sequence",
    "PrefillOutput": "vtu",
    "prefill": "vtu",
}

__all__ = sorted(_SUBMODULE)


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module 'dymu.llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dymu.llm.{_SUBMODULE[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(ModuleType):
    """Importing the submodule ``dymu.llm.generate`` makes Python set the package's attribute ``generate`` to
    that module; the public name is the function, as it was when everything was imported eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and name in _SUBMODULE:
            return  # the submodule stays reachable through sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
