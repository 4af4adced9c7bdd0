"""A prompt's exact model input: the chat-templated text and its token ids, and the span ids
of the authors' message-mean path. One rendering for generation and for ``print_prompt``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from deltamem_jax.data.tokenizer import Tokenizer
from deltamem_jax.evaluation.generate import Prompt

__all__ = ["format_prompt", "prompt_ids", "prompt_text", "span_prompt"]

Messages = Sequence[Mapping[str, str]]


def prompt_text(tokenizer: Tokenizer, messages: Messages, generation_prompt: bool = True) -> str:
    """The text the model reads (chat template + generation prompt); byte-level tokenizers
    show their role markers as ``<|role|>`` / ``<|end|>``."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return hf.apply_chat_template([{"role": m["role"], "content": m["content"]}
                                       for m in messages], tokenize=False,
                                      add_generation_prompt=generation_prompt,
                                      **tokenizer.template_kwargs)
    out = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
    return out + ("<|assistant|>" if generation_prompt else "")


def prompt_ids(tokenizer: Tokenizer, messages: Messages, generation_prompt: bool = True
               ) -> np.ndarray:
    """Token ids of :func:`prompt_text` (encoded without adding special tokens)."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return np.asarray(tokenizer.encode(prompt_text(tokenizer, messages, generation_prompt)),
                          np.int32)
    return np.asarray(tokenizer.render_chat(list(messages),
                                            add_generation_prompt=generation_prompt).ids, np.int32)


def span_prompt(tokenizer: Tokenizer, messages: Messages) -> Prompt:
    """A prompt with the authors' write-span ids: the tokens the template emits for the k-th
    non-system message get id k (template tokens included), system messages and the
    generation-prompt suffix −1."""
    msgs = list(messages)
    chat = tokenizer.render_chat(msgs, add_generation_prompt=True)
    of_msg = np.full((len(msgs) + 1,), -1, np.int32)
    nonsys = [j for j, m in enumerate(msgs) if m["role"] != "system"]
    of_msg[nonsys] = np.arange(len(nonsys), dtype=np.int32)
    message_ids = of_msg[chat.message_index]          # index −1 picks the trailing −1
    return Prompt(np.asarray(chat.ids, np.int32), message_ids)


def format_prompt(title: str, text: str, n_tokens: int) -> str:
    bar = "=" * 78
    return f"{bar}\n{title} ({n_tokens} tokens)\n{bar}\n{text}\n"
