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
from dymu.llm.config import GenerateConfig, PruneConfig
from dymu.llm.decoder import Decoder, load_decoder
from dymu.llm.generate import Generation, GenerationResult, decode_step, generate, new_cache
from dymu.llm.grouped_cache import GroupedKVCache
from dymu.llm.kv_cache import KVCache
from dymu.llm.prune import AttentionFallRule, AttentionStats, LinearSchedule, Probe, Pruner, RatePredictor
from dymu.llm.rate_model import AttentionTrace, LearnedRate, keep_targets, record_trace
from dymu.llm.sequence import VirtualSequence, build_sequence
from dymu.llm.vtu import PrefillOutput, prefill

__all__ = [
    "AttentionFallRule",
    "AttentionStats",
    "AttentionTrace",
    "Decoder",
    "GenerateConfig",
    "Generation",
    "GenerationResult",
    "GroupedKVCache",
    "KVCache",
    "LearnedRate",
    "LinearSchedule",
    "PrefillOutput",
    "Probe",
    "PruneConfig",
    "Pruner",
    "RatePredictor",
    "VirtualSequence",
    "build_sequence",
    "decode_step",
    "generate",
    "keep_targets",
    "load_decoder",
    "new_cache",
    "prefill",
    "record_trace",
]
