"""The data layer: tokenizers, chat records, episodes, batching, synthetic data.

numpy only (plus ``datasets``/``transformers`` for loading); it never imports
the model, memory or training code.
"""

from deltamem_jax.data.collate import (
    BATCH_KEYS,
    VIEW_CODES,
    bucket_length,
    collate,
    geometric_buckets,
)
from deltamem_jax.data.episodes import (
    IGNORE_INDEX,
    VIEWS,
    Episode,
    EpisodeConfig,
    EpisodeError,
    EpisodeSet,
    build_episode,
    build_episodes,
    split_prefix,
    target_indices,
)
from deltamem_jax.data.loader import EpisodeLoader, EpisodeSource
from deltamem_jax.data.records import (
    ROLES,
    clean_records,
    load_records,
    normalise_record,
    record_messages,
    record_problem,
)
from deltamem_jax.data.sentences import chat_sentence_ids, content_sentence_ids, split_sentences
from deltamem_jax.data.synthetic import (
    SyntheticConfig,
    chance_accuracy,
    generate_conversation,
    generate_split,
    write_synthetic_dataset,
)
from deltamem_jax.data.tokenizer import (
    ByteTokenizer,
    ChatTokens,
    HFTokenizer,
    TemplateError,
    Tokenizer,
    load_tokenizer,
    save_byte_tokenizer_marker,
)

__all__ = [
    "BATCH_KEYS", "VIEW_CODES", "bucket_length", "collate", "geometric_buckets",
    "IGNORE_INDEX", "VIEWS", "Episode", "EpisodeConfig", "EpisodeError", "EpisodeSet",
    "build_episode", "build_episodes", "split_prefix", "target_indices",
    "EpisodeLoader", "EpisodeSource",
    "ROLES", "clean_records", "load_records", "normalise_record", "record_messages",
    "record_problem",
    "chat_sentence_ids", "content_sentence_ids", "split_sentences",
    "SyntheticConfig", "chance_accuracy", "generate_conversation", "generate_split",
    "write_synthetic_dataset",
    "ByteTokenizer", "ChatTokens", "HFTokenizer", "TemplateError", "Tokenizer", "load_tokenizer",
    "save_byte_tokenizer_marker",
]
