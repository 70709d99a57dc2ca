"""The model: the architecture (``gpt.py``) and its LM head's chunked paths (``head.py``), loading
weights from anywhere (``weights.py``), the Hugging Face conversion table and export (``hf.py``).
Sampling, and the KV caches the model attends through (:class:`~pretrain.model.gpt.AttentionCache`),
live in ``pretrain/inference/``."""

from pretrain.model.gpt import ARCH_FIELDS, GPT, PRESETS, VOCAB_ROW_PARAMS, GPTConfig

__all__ = ["ARCH_FIELDS", "GPT", "PRESETS", "VOCAB_ROW_PARAMS", "GPTConfig"]
