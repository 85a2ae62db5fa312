"""Write the answer to a question about merged visual tokens: the chat prompt around the visual block,
VTU prefill and (optionally pruned) decoding, with the text streamed as it is written."""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

from dymu.errors import DymuError
from dymu.families.base import VLMFamily
from dymu.llm.config import GenerateConfig
from dymu.llm.generate import GenerationResult, generate
from dymu.llm.sequence import VirtualSequence, build_sequence
from dymu.tokens import MergedTokens


class TextStream:
    """Turns token ids into text pieces as they arrive.

    Decoding token by token breaks multi-byte characters, so the whole answer is decoded each time and
    only the new, complete suffix is emitted.
    """

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.emit = emit
        self.tokens: list[int] = []
        self.sent = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its next byte
            return
        if len(text) > self.sent:
            self.emit(text[self.sent :])
            self.sent = len(text)


def check_question_fits(tokenizer: Any, question: str, context: int, used: int) -> None:
    """Raise ``DymuError`` when ``question`` alone has more tokens than the ``context - used`` positions the
    media leave, tokenizing no more of it than proves that: a prefix of about 4 characters a token, doubled
    until it holds more tokens than that or is the whole question. A 10 MB text is refused after reading a few
    hundred KB of it, not all of it (whose tokens took GBs and tens of seconds). A question that passes gets
    the exact check, with the prompt around it, later."""
    room = context - used
    size = 4 * max(room, 1)
    while True:
        prefix = question[:size]
        if size < len(question):  # cut at a space, so that no word is split into more tokens than it has
            space = prefix.rfind(" ")
            prefix = prefix[:space] if space > 0 else prefix
        count = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        if count > room:
            raise DymuError(f"the question has at least {count} tokens, more than the {max(room, 0)} positions "
                            f"the model's context of {context} has left beside the media's {used}")
        if size >= len(question):
            return
        size *= 2


def question_sequence(family: VLMFamily, tokens: MergedTokens, question: str, kind: str) -> VirtualSequence:
    """The LLM input: the prompt's text, with the merged visual block where the placeholder was. A family
    that lays out its own prompt (Qwen-VL: placeholders per merger output, M-RoPE positions) builds it."""
    if hasattr(family, "question_sequence"):
        return family.question_sequence(tokens, question, kind)
    prompt = family.prompt(question, kind)
    return build_sequence(family.model, [prompt.before, tokens, prompt.after])


def visual_prefix_key(tokens: MergedTokens, before: list[int] | torch.Tensor,
                      positions: torch.Tensor | None = None) -> str:
    """Names the KV of a prompt up to the end of its visual block: a digest of the merged tokens themselves
    (rows, mapping and the settings hash that made them), of the prompt's text before the block's end (its
    ids, or the rows of its text positions) and of the prefix's M-RoPE positions when it has them (the same
    rows over a longer time sit at other temporal positions: other keys)."""
    digest = hashlib.sha256(tokens.config_hash.encode())
    text = before if isinstance(before, torch.Tensor) else torch.tensor(before, dtype=torch.long)
    for tensor in (tokens.embeds, tokens.mapping, text) + (() if positions is None else (positions,)):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def answer_request(family: VLMFamily, tokens: MergedTokens, question: str,
                   kind: str) -> tuple[VirtualSequence, str, int]:
    """What the engine needs for one question: the sequence, its visual prefix's key and length."""
    if hasattr(family, "question_sequence"):
        # The family lays out its own prompt (Qwen-VL: timestamps between slots, M-RoPE): the prefix ends at the
        # last visual position, and the text rows inside it and its positions are part of its name.
        sequence = family.question_sequence(tokens, question, kind)
        end = int(sequence.visual.nonzero()[-1]) + 1
        text_rows = sequence.mapping[:end][~sequence.visual[:end]]
        positions = None if sequence.positions is None else sequence.positions[:, :end]
        return sequence, visual_prefix_key(tokens, sequence.rows.index_select(0, text_rows), positions), end
    prompt = family.prompt(question, kind)
    sequence = build_sequence(family.model, [prompt.before, tokens, prompt.after])
    return sequence, visual_prefix_key(tokens, prompt.before), len(prompt.before) + tokens.num_positions


def write_answer(
    family: VLMFamily,
    tokens: MergedTokens,
    question: str,
    kind: str,
    config: GenerateConfig,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Answer ``question`` about ``tokens`` (a video or an image, per ``kind``)."""
    sequence = question_sequence(family, tokens, question, kind)
    stream = TextStream(family.tokenizer, on_text) if on_text else None
    result = generate(family.model, sequence, config, tokenizer=family.tokenizer, on_token=stream)
    if result.text is not None:
        result.text = result.text.strip()
    return result
