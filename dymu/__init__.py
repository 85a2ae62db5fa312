"""dymu: training-free visual-token reduction for vision-language models, in pure PyTorch.

DToMe merges similar visual tokens inside the vision encoder, temporal merging merges tokens that stay
the same across frames, VTU lets the LLM compute as if nothing was merged, and progressive pruning drops
visual KV entries while an answer is written. Nothing here knows about Ray or Redis.
"""
from dymu.errors import DymuError

__all__ = ["DymuError", "InvalidTokens", "MergedTokens"]


def __getattr__(name: str):
    # Lazy, so that `import dymu.errors` (e.g. in a feed-reader process) does not pull in torch.
    if name in ("MergedTokens", "InvalidTokens"):
        from dymu import tokens

        return getattr(tokens, name)
    raise AttributeError(f"module 'dymu' has no attribute {name!r}")
