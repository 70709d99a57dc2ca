"""The model: the architecture (``gpt.py``) and its LM head's chunked paths (``head.py``), loading
weights from anywhere (``weights.py``), the Hugging Face conversion table and export (``hf.py``).
Sampling lives in ``pretrain/inference/``."""

from pretrain.model.gpt import ARCH_FIELDS, GPT, PRESETS, VOCAB_ROW_PARAMS, GPTConfig, KVCache, StaticKVCache

__all__ = ["ARCH_FIELDS", "GPT", "PRESETS", "VOCAB_ROW_PARAMS", "GPTConfig", "KVCache", "StaticKVCache"]
