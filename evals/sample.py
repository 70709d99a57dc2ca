"""The sample logged at each in-loop evaluation: a short continuation of ``eval.sample_prompt``.

An evaluator like the others (``name``, ``__call__(model, step)``): ``{"sample/text": ...}``,
seeded by ``train.seed + step`` (reproducible; the trainer runs evaluators under ``fork_rng``, so
sampling never shifts the training RNG streams). Every rank runs it (an FSDP model's forward is
collective); rank 0 logs it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


class SampleEvaluator:
    """``SampleEvaluator(prompt, tokens, top_k, seed, dtype)``; ``evaluator(model, step) ->
    {"sample/text": prompt + continuation}``, or ``{}`` when the model cannot hold the prompt
    (a toy vocabulary or context). ``dtype`` is train.dtype: bf16 samples under autocast, as
    the training step computes (except under FSDP's own bf16 parameters)."""

    name = "sample"

    def __init__(self, prompt: str, tokens: int, top_k: int, seed: int, dtype: str = "fp32") -> None:
        from data_pipeline.tokenizer import get_tokenizer

        self.tok = get_tokenizer()
        self.prompt = self.tok.encode(prompt)
        self.tokens, self.top_k, self.seed, self.dtype = tokens, top_k, seed, dtype

    def _autocast(self, model, device: torch.device):
        from pretrain.dist import is_fsdp

        if self.dtype == "bf16" and not (is_fsdp(model) and device.type == "cuda"):
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    def __call__(self, model, step: int | None = None) -> dict[str, str]:
        from pretrain.model.generate import generate

        config = model.config
        if any(t >= config.vocab_size for t in self.prompt) or len(self.prompt) >= config.block_size:
            return {}  # a toy vocabulary / context cannot hold the prompt
        device = next(model.parameters()).device
        # Eager: sampling's growing shapes would make a compiled model recompile every token.
        with torch.compiler.set_stance("force_eager"), self._autocast(model, device):
            new = generate(model, [self.prompt], max_new_tokens=self.tokens, temperature=1.0, top_k=self.top_k,
                           seed=self.seed + (step or 0), eot_id=None)[0]
        return {"sample/text": self.tok.decode(self.prompt + new)}
