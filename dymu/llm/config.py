"""Options for generation and for progressive visual-KV pruning, as typed dataclasses with defaults.

Both validate themselves on construction and raise ``DymuError`` with the reason, so a bad YAML value or
CLI flag fails before any model work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dymu.errors import DymuError

PREFILL_MODES = ("vtu", "no_vtu")
KV_CACHE_KINDS = ("expanded", "grouped")


@dataclass
class PruneConfig:
    """When and how much of the visual KV cache to drop while an answer is written (DyRate-style).

    layer: the decoder layer whose attention is read; visual entries are dropped from the layers after it.
    start_step: first decode step (1 = the step that feeds the first generated token) that may prune.
    interval: re-decide the keep fraction every this many steps after ``start_step``.
    min_keep: never keep fewer than this fraction of the original visual entries.
    sharpness: the rule keeps ``(mass_now / mass_first) ** sharpness`` of the visual entries; >1 prunes
        harder for the same fall in visual attention.
    entropy_weight: in [0, 1]; blends in how spread the visual attention is (the effective fraction of entries
        that receive attention, exp(entropy) / count), so peaked attention prunes harder. 0 ignores it.
    predictor: path of a fitted learned predictor (`dymu-video fit-rate`); None = the training-free rule.
    """

    enabled: bool = False
    layer: int = 2
    start_step: int = 8
    interval: int = 8
    min_keep: float = 0.1
    sharpness: float = 1.0
    entropy_weight: float = 0.0
    predictor: str | None = None

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise DymuError(f"prune layer must be >= 0, got {self.layer}")
        if self.start_step < 1:
            raise DymuError(f"prune start_step must be >= 1, got {self.start_step}")
        if self.interval < 1:
            raise DymuError(f"prune interval must be >= 1, got {self.interval}")
        if not 0.0 <= self.min_keep <= 1.0:
            raise DymuError(f"prune min_keep must be in [0, 1], got {self.min_keep}")
        if self.sharpness <= 0:
            raise DymuError(f"prune sharpness must be > 0, got {self.sharpness}")
        if not 0.0 <= self.entropy_weight <= 1.0:
            raise DymuError(f"prune entropy_weight must be in [0, 1], got {self.entropy_weight}")

    def is_decision_step(self, step: int) -> bool:
        return step >= self.start_step and (step - self.start_step) % self.interval == 0


@dataclass
class GenerateConfig:
    """How to write an answer.

    prefill: "vtu" (every original position keeps its own RoPE position; the authors' method) or "no_vtu"
        (merged rows at consecutive positions, the baseline VTU must beat).
    kv_cache: "expanded" (every position's rotated K/V, as the authors do) or "grouped" (each merged row's K/V
        once, rotated per position when attending: ~U/N of the memory, more work per step).
    do_sample: False = greedy. Otherwise sample at ``temperature`` from the smallest set of tokens whose
        probability reaches ``top_p``; ``seed`` makes it reproducible.
    eos_token_ids: tokens that end the answer; None = the model's own (generation config, then config).
    stop_strings: the answer also ends once its decoded text contains one of these (needs a tokenizer).
    keep_logits: keep every step's next-token logits on the result (float32, on CPU), for fidelity checks.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    prefill: str = "vtu"
    kv_cache: str = "expanded"
    keep_logits: bool = False
    prune: PruneConfig = field(default_factory=PruneConfig)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise DymuError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise DymuError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise DymuError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.prefill not in PREFILL_MODES:
            raise DymuError(f"prefill must be one of {PREFILL_MODES}, got {self.prefill!r}")
        if self.kv_cache not in KV_CACHE_KINDS:
            raise DymuError(f"kv_cache must be one of {KV_CACHE_KINDS}, got {self.kv_cache!r}")
        if isinstance(self.stop_strings, str):
            raise DymuError("stop_strings must be a list of strings, not one string")
        if any(not s for s in self.stop_strings):
            raise DymuError("stop_strings must not contain an empty string")
        self.stop_strings = tuple(self.stop_strings)
        if self.eos_token_ids is not None:
            self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        if isinstance(self.prune, dict):
            self.prune = PruneConfig(**self.prune)
