"""lm-evaluation-harness's model interface over the project's ``GPT``: any harness task, scored
in memory (no export round trip), with the harness's own token boundaries.

    lm = GPTLM(model, batch_size=32)                    # a GPT from pretrain.model.weights.load_model
    lm_eval.simple_evaluate(model=lm, tasks=[...])      # what evals/tasks.py run_tasks does

The three request types, each as the harness's Hugging Face model (``HFLM``, lm-eval 0.4.x) computes it:

- ``loglikelihood`` ((context, continuation) -> (sum of log p, is_greedy)): the pair is split
  into tokens by :func:`evals.hellaswag.encode_pair` (the one home of the harness's boundaries:
  trailing spaces of the context move to the continuation; an empty context becomes
  ``<|endoftext|>``), left-truncated to ``block_size + 1`` tokens, and scored by
  :func:`evals.hellaswag.score_sequences` (batched; each distinct context runs once and the LM head
  runs through ``GPT.token_logprobs`` -- never a forward hook). ``is_greedy``: every continuation
  token is the argmax (the first maximum, as ``logits.argmax()``).
- ``loglikelihood_rolling`` (text -> sum of log p over all its tokens): the harness's own
  disjoint rolling windows (``lm_eval.utils.get_rolling_token_windows`` with the end-of-text
  token as prefix, ``max_seq_len`` = ``block_size``, ``context_len`` 1), scored as above.
- ``generate_until`` ((context, gen_kwargs) -> text): the harness's ``normalize_gen_kwargs`` and
  stop strings (``until`` plus ``<|endoftext|>``), the context left-truncated to
  ``block_size - max_gen_toks`` tokens, greedy unless ``do_sample``; tokens come from
  ``pretrain.inference.generate.generate`` (KV cache, batched). That function stops a row at
  ``<|endoftext|>`` only, so stop strings are applied here: rows are generated in rounds of
  16, 32, 64, ... new tokens, and a row whose text holds a stop string leaves the batch; the text
  is cut at the first stop string (the harness's ``postprocess_generated_text``).

Ranks: with a process group up, the harness gives each rank every ``world_size``-th document and
gathers the per-example metrics to rank 0 (``all_gather`` / ``gather_object`` below, over
``pretrain.dist.all_gather_object``).

This module imports ``lm_eval`` (the optional extra ``.[lm-eval]``): import it through
``evals/tasks.py``, which says what to install when it is missing.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from evals.common import eval_mode
from evals.hellaswag import encode_pair, model_block_size, model_vocab_size, score_sequences
from pretrain import dist


class GPTLM(LM):
    """An ``lm_eval`` model over a ``GPT`` (or anything ``score_sequences`` scores) and the GPT-2
    tokenizer. ``batch_size``: candidate rows per scoring forward and prompts per generation batch.
    ``requests`` counts the requests served and ``seconds`` the time spent, by type (the
    benchmark's requests/s)."""

    def __init__(self, model, tokenizer=None, *, batch_size: int = 32, device: str | torch.device | None = None,
                 max_gen_toks: int = 256) -> None:
        super().__init__()
        if tokenizer is None:
            from data_pipeline.tokenizer import get_tokenizer

            tokenizer = get_tokenizer()
        self.model, self.tok = model, tokenizer
        self.block_size = model_block_size(model)
        self.vocab_size = model_vocab_size(model)
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        self._rank, self._world_size = dist.rank(), dist.world_size()
        self.requests: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    # ---- the three request types ------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        t0 = time.perf_counter()
        pairs = [encode_pair(self.tok.encode, ctx, cont, self.tok.eot_id) for ctx, cont in (r.args for r in requests)]
        out = self._score([c for c, _ in pairs], [k for _, k in pairs])
        self._count("loglikelihood", len(requests), t0)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        t0 = time.perf_counter()
        ctx, cont, owner = [], [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(token_list=self.tok.encode(text), prefix_token=self.tok.eot_id,
                                                max_seq_len=self.block_size, context_len=1)
            for c, k in map(make_disjoint_window, windows):
                ctx.append(c)
                cont.append(k)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._score(ctx, cont)):
            totals[i] += lp
        self._count("loglikelihood_rolling", len(requests), t0)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        t0 = time.perf_counter()
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}  # same settings, one batch (the harness groups by gen_kwargs too)
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tok.decode([self.tok.eot_id])
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.block_size - max_gen
            if max_ctx <= 0:
                raise ValueError(f"a task asks for {max_gen} new tokens (max_gen_toks) but the model's context is "
                                 f"{self.block_size} tokens; nothing is left for the prompt")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts = [self.tok.encode(requests[i].args[0])[-max_ctx:] or [self.tok.eot_id] for i in members]
            texts = self._generate(prompts, max_gen, until, temperature, kwargs.get("top_k"), kwargs.get("top_p"))
            for i, text in zip(members, texts):
                out[i] = postprocess_generated_text(text, until, None)
        self._count("generate_until", len(requests), t0)
        return out

    def _count(self, kind: str, n: int, t0: float) -> None:
        self.requests[kind] += n
        self.seconds[kind] += time.perf_counter() - t0

    # ---- scoring and generation -------------------------------------------------------------

    def _score(self, context: list[list[int]], continuation: list[list[int]]) -> list[tuple[float, bool]]:
        """(sum of log p, is_greedy) of each continuation after its context (tokens)."""
        with eval_mode(self.model):
            sums, _, greedy = score_sequences(self.model, context, continuation, block_size=self.block_size,
                                              batch_size=self.batch_size, vocab_size=self.vocab_size,
                                              device=self._device, greedy=True)
        return [(float(s), bool(g)) for s, g in zip(sums, greedy)]

    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str], temperature: float,
                  top_k: int | None, top_p: float | None) -> list[str]:
        """Each prompt's continuation, as text, up to ``max_new`` tokens, ``<|endoftext|>`` or the
        token that completes the first of ``until`` (the text may run past the stop string; the
        caller cuts it): one call of the project's batched sampler (prompts of any lengths in one
        left-padded batch of ``batch_size`` rows, each row as it would be alone)."""
        from pretrain.inference.generate import generate

        new = generate(self.model, prompts, max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                       top_p=top_p, stop=[s for s in until if s] or None, batch_size=self.batch_size)
        return [self.tok.decode(t) for t in new]

    # ---- ranks (lm_eval.evaluator.evaluate calls these when world_size > 1) -----------------

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor, concatenated (as ``accelerate``'s gather the harness expects)."""
        parts = dist.all_gather_object(tensor.detach().cpu(), "harness all_gather")
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        everyone = dist.all_gather_object(obj, "harness gather_object")
        return everyone if self.rank == dst else None

    def barrier(self) -> None:
        dist.barrier("harness requests done")
