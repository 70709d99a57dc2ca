"""Inference: sampling from a GPT, apart from its architecture (``pretrain/model/``).

``generate.py`` -- ``generate()`` (batched prompts of any lengths, per-row random streams, stop
strings) and the ``gpt2-generate`` CLI; ``decode.py`` -- the fixed-shape decode step
(:class:`~pretrain.inference.decode.Decoder`, kept per shape), the decode-time LM heads (full,
int8 / bf16 screened) and the CPU weight layout; ``cache.py`` -- the KV caches (dynamic and
fixed-shape), which the model attends through its ``AttentionCache`` protocol; ``cpu.py`` -- the CPU backend, the one module
that calls torch's private CPU ops (oneDNN packed weights, the int8 kernel), each guarded with a
portable fallback. Importing any of them does no work and registers no op.
"""
