"""Tokenizers and chat rendering with per-message token attribution.

Episodes (SPEC §3) need, for every token of a rendered conversation, the
message it belongs to (message ids, labels) and where each message's content
sits (sentence ids). :meth:`Tokenizer.render_chat` returns exactly that as a
:class:`ChatTokens`. Two implementations: :class:`ByteTokenizer` (no files,
for the CPU demo) and :class:`HFTokenizer` (a local Hugging Face tokenizer
with a chat template, from a directory or a GGUF file; never downloads).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ChatTokens",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "TemplateError",
    "load_tokenizer",
    "save_byte_tokenizer_marker",
    "BYTE_TOKENIZER_MARKER",
    "MAX_TEMPLATE_ROLLBACK",
    "THINKING_OFF_FAMILIES",
    "family_template_kwargs",
]

Message = Mapping[str, str]

#: How many already-rendered tokens a later message may rewrite (as the authors allow).
MAX_TEMPLATE_ROLLBACK = 16


class TemplateError(ValueError):
    """The chat template cannot be rendered message by message."""


@dataclass(frozen=True)
class ChatTokens:
    """A rendered conversation.

    ids: int32 [T] token ids.
    message_index: int32 [T] index (into the messages passed) of the message
        each token belongs to, template tokens included; −1 for tokens of no
        message (e.g. the generation prompt).
    content_spans: per message, ``(start, end)`` of its content tokens in
        ``ids`` (end exclusive), or None when the content could not be located
        among the message's tokens.
    """

    ids: np.ndarray
    message_index: np.ndarray
    content_spans: tuple[tuple[int, int] | None, ...]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def message_span(self, i: int) -> tuple[int, int]:
        """``(start, end)`` of all tokens attributed to message ``i`` (possibly empty)."""
        hits = np.flatnonzero(self.message_index == i)
        if hits.size == 0:
            return (0, 0)
        return int(hits[0]), int(hits[-1]) + 1


class Tokenizer(abc.ABC):
    """What the data layer needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end an assistant reply during decoding."""
        return (self.eos_id,)

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special tokens added."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens skipped."""

    @abc.abstractmethod
    def render_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> ChatTokens:
        """Render ``messages`` with the chat format, attributing tokens to messages."""


def _find_subsequence(haystack: Sequence[int], needle: Sequence[int]) -> int:
    """First start index of ``needle`` in ``haystack``, or −1."""
    n = len(needle)
    if n == 0:
        return -1
    first = needle[0]
    for s in range(len(haystack) - n + 1):
        if haystack[s] == first and list(haystack[s : s + n]) == list(needle):
            return s
    return -1


# --------------------------------------------------------------------------- bytes


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer with a minimal chat format.

    Ids: 0 pad, 1 bos, 2 eos, 3 ``<|system|>``, 4 ``<|user|>``,
    5 ``<|assistant|>``, 6 ``<|end|>``, 7 reserved; byte b is ``b + 8``.
    vocab_size = 264 (a multiple of 8). A message renders as
    ``<|role|> content-bytes <|end|>``; the generation prompt is ``<|assistant|>``.
    """

    PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END = 0, 1, 2, 3, 4, 5, 6
    OFFSET = 8
    ROLE_IDS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

    vocab_size = 264
    pad_id = PAD
    bos_id = BOS
    eos_id = EOS

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.END, self.EOS)

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")

    def render_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> ChatTokens:
        ids: list[int] = []
        owner: list[int] = []
        spans: list[tuple[int, int] | None] = []
        for i, m in enumerate(messages):
            role = m["role"]
            if role not in self.ROLE_IDS:
                raise ValueError(f"ByteTokenizer: unknown role {role!r} "
                                 f"(expected one of {sorted(self.ROLE_IDS)})")
            content = self.encode(m["content"])
            ids.append(self.ROLE_IDS[role])
            spans.append((len(ids), len(ids) + len(content)))
            ids.extend(content)
            ids.append(self.END)
            owner.extend([i] * (len(content) + 2))
        if add_generation_prompt:
            ids.append(self.ASSISTANT)
            owner.append(-1)
        return ChatTokens(
            ids=np.asarray(ids, dtype=np.int32),
            message_index=np.asarray(owner, dtype=np.int32),
            content_spans=tuple(spans),
        )


# --------------------------------------------------------------------------- Hugging Face


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer whose chat template renders conversations.

    ``path`` is a tokenizer directory or a ``.gguf`` file, whose vocabulary,
    merges, special tokens and chat template transformers converts into the
    same fast tokenizer it uses when loading that GGUF.

    Message i's tokens are ``render(msgs[:i+1])`` minus its common prefix with
    ``render(msgs[:i])``; the earlier render may lose up to
    ``max_rollback`` tail tokens (those then belong to message i). Otherwise the
    template is not prefix-stable and :class:`TemplateError` is raised.
    ``template_kwargs`` go to ``apply_chat_template`` (e.g.
    ``{"enable_thinking": False}`` for unified Qwen3 models).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        template_kwargs: Mapping[str, Any] | None = None,
        max_rollback: int = MAX_TEMPLATE_ROLLBACK,
    ):
        from transformers import AutoTokenizer  # lazy: only this class needs transformers

        path = os.fspath(path)
        gguf = _is_gguf(path)
        if gguf and not os.path.isfile(path):
            raise FileNotFoundError(f"HFTokenizer: GGUF file {path!r} does not exist")
        if not gguf and not os.path.isdir(path):
            raise FileNotFoundError(f"HFTokenizer: {path!r} is not a directory")
        try:
            if gguf:
                tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                    gguf_file=os.path.basename(path),
                                                    local_files_only=True)
            else:
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:   # transformers' GGUF reader raises what numpy raises
            raise ValueError(f"HFTokenizer: no usable tokenizer in {path!r}: "
                             f"{type(e).__name__}: {e}") from e
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"HFTokenizer: the tokenizer in {path!r} has no chat template")
        self._tok = tok
        self.path = path
        self.template_kwargs = dict(template_kwargs or {})
        self.max_rollback = int(max_rollback)
        self.vocab_size = len(tok)
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        if pad is None:
            raise ValueError(f"HFTokenizer: the tokenizer in {path!r} has neither a pad "
                             "nor an eos token")
        self.pad_id = int(pad)
        self.eos_id = int(eos) if eos is not None else self.pad_id
        self.bos_id = tok.bos_token_id

    @property
    def hf_tokenizer(self):
        """The wrapped ``transformers`` tokenizer."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _render_ids(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        if not messages and not add_generation_prompt:
            return []
        text = self._tok.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )
        return self.encode(text)

    def _extend(self, ids: list[int], owner: list[int], new: list[int], who: int,
                what: str) -> None:
        common = 0
        limit = min(len(ids), len(new))
        while common < limit and ids[common] == new[common]:
            common += 1
        rollback = len(ids) - common
        if rollback > self.max_rollback:
            raise TemplateError(
                f"HFTokenizer({self.path!r}): chat template is not prefix-stable: adding {what} "
                f"rewrites {rollback} earlier tokens (at most {self.max_rollback} allowed)"
            )
        del ids[common:], owner[common:]
        ids.extend(new[common:])
        owner.extend([who] * (len(new) - common))

    def render_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> ChatTokens:
        ids: list[int] = []
        owner: list[int] = []
        for i in range(len(messages)):
            self._extend(ids, owner, self._render_ids(messages[: i + 1], False), i, f"message {i}")
        if add_generation_prompt:
            self._extend(ids, owner, self._render_ids(messages, True), -1, "the generation prompt")
        owner_arr = np.asarray(owner, dtype=np.int32)
        spans: list[tuple[int, int] | None] = []
        for i, m in enumerate(messages):
            hits = np.flatnonzero(owner_arr == i)
            content = self.encode(m["content"])
            if hits.size == 0 or not content:
                spans.append(None)
                continue
            lo, hi = int(hits[0]), int(hits[-1]) + 1
            at = _find_subsequence(ids[lo:hi], content)
            spans.append(None if at < 0 else (lo + at, lo + at + len(content)))
        return ChatTokens(
            ids=np.asarray(ids, dtype=np.int32), message_index=owner_arr, content_spans=tuple(spans)
        )


#: Model families whose chat templates default to a thinking mode that the δ-mem authors turn
#: off (``enable_thinking=False``) in training and evaluation alike.
THINKING_OFF_FAMILIES = ("qwen3", "qwen3_moe", "smollm3")


def family_template_kwargs(model_type: str | None) -> dict[str, Any]:
    """The chat-template keywords the authors pass for a backbone family (from its config's
    ``model_type``, not its path): thinking off for Qwen3 and SmolLM3, nothing otherwise.

    Templates that do not read ``enable_thinking`` (Qwen3-*-Instruct-2507) render the same
    text with or without it, which is what the authors' path-based rule gives them. Their
    rule passes nothing for Qwen3 *Thinking* checkpoints: override with ``{}`` there.
    """
    return {"enable_thinking": False} if model_type in THINKING_OFF_FAMILIES else {}


#: A model directory holding this file (``{"type": "byte"}``) uses :class:`ByteTokenizer`.
BYTE_TOKENIZER_MARKER = "deltamem_tokenizer.json"


def save_byte_tokenizer_marker(model_dir: str | os.PathLike) -> None:
    """Mark a model directory as using the built-in byte-level tokenizer."""
    with open(os.path.join(os.fspath(model_dir), BYTE_TOKENIZER_MARKER), "w") as f:
        f.write('{"type": "byte"}\n')


def _is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def load_tokenizer(spec: str | os.PathLike, **kwargs: Any) -> Tokenizer:
    """``"byte"`` → :class:`ByteTokenizer`; a directory or ``.gguf`` file → its tokenizer.

    A directory marked with :data:`BYTE_TOKENIZER_MARKER` gives the byte-level
    tokenizer; any other directory, or a GGUF file, is read as a Hugging Face
    tokenizer (kwargs passed on).
    """
    if isinstance(spec, str) and spec == "byte":
        if kwargs:
            raise ValueError(f"load_tokenizer('byte') takes no options, got {sorted(kwargs)}")
        return ByteTokenizer()
    if _is_gguf(os.fspath(spec)):
        return HFTokenizer(spec, **kwargs)
    if os.path.isdir(os.fspath(spec)):
        if os.path.isfile(os.path.join(os.fspath(spec), BYTE_TOKENIZER_MARKER)):
            return ByteTokenizer()
        return HFTokenizer(spec, **kwargs)
    raise ValueError(f"load_tokenizer: {spec!r} is neither 'byte', an existing tokenizer "
                     f"directory nor a .gguf file")
