"""The sample logged at each in-loop evaluation: a short continuation of ``eval.sample_prompt``.

An evaluator like the others (``name``, ``__call__(model, step)``): ``{"sample/text": ...}``,
seeded by ``train.seed + step`` (reproducible; the trainer runs evaluators under ``fork_rng``, so
sampling never shifts the training RNG streams). Every rank runs it (an FSDP model's forward is
collective); rank 0 logs it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch


class SampleEvaluator:
    """``SampleEvaluator(prompt, tokens, top_k, seed, autocast)``; ``evaluator(model, step) ->
    {"sample/text": prompt + continuation}``, or ``{}`` when the model cannot hold the prompt
    (a toy vocabulary or context). ``autocast``: a context factory for the precision to sample in
    (the trainer's: ``pretrain.training.parallel.training_autocast``); None = as the model is."""

    name = "sample"

    def __init__(self, prompt: str, tokens: int, top_k: int, seed: int,
                 autocast: Callable[[], AbstractContextManager] | None = None) -> None:
        from data_pipeline.tokenizer import get_tokenizer

        self.tok = get_tokenizer()
        self.prompt = self.tok.encode(prompt)
        self.tokens, self.top_k, self.seed, self.autocast = tokens, top_k, seed, autocast or nullcontext

    def unfit(self, config) -> str | None:
        """Why a model of ``config`` cannot continue the prompt (the run notes it once), or None."""
        if len(self.prompt) >= config.block_size:
            return f"{len(self.prompt)} tokens, but the context holds {config.block_size} (with room for one more)"
        if any(t >= config.vocab_size for t in self.prompt):
            return f"token ids beyond the model's vocabulary of {config.vocab_size} (a toy vocabulary)"
        return None

    def __call__(self, model, step: int | None = None) -> dict[str, str]:
        from pretrain.inference.generate import generate

        if self.unfit(model.config):
            return {}  # a toy vocabulary / context cannot hold the prompt
        # Eager: sampling's growing shapes would make a compiled model recompile every token.
        with torch.compiler.set_stance("force_eager"), self.autocast():
            new = generate(model, [self.prompt], max_new_tokens=self.tokens, temperature=1.0, top_k=self.top_k,
                           seed=self.seed + (step or 0), eot_id=None)[0]
        return {"sample/text": self.tok.decode(self.prompt + new)}
