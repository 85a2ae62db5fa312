"""dymu: training-free visual-token reduction for vision-language models, in pure PyTorch.

DToMe merges similar visual tokens inside the vision encoder, temporal merging merges tokens that stay
the same across frames, VTU lets the LLM compute as if nothing was merged, and progressive pruning drops
visual KV entries while an answer is written. Nothing here knows about Ray or Redis.
"""
from dymu.errors import DymuError
from dymu.tokens import InvalidTokens, MergedTokens

__all__ = ["DymuError", "MergedTokens", "InvalidTokens"]
