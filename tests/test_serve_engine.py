"""The serving engine without HTTP: continuous batching over the static cache gives each sequence
gpt2-generate's tokens (greedy and seeded sampling, stop strings, end-of-text), reuses rows, lets a
later short sequence finish before an earlier long one, and frees a cancelled row within one step."""

import copy
import threading
import time

import pytest
from test_generate import PROMPTS, _model

from pretrain.inference.generate import generate
from pretrain.serve.engine import Engine, QueueFull, Sequence


class Client:
    """A sequence's events, collected (and the order sequences finished in)."""

    def __init__(self, order=None):
        self.tokens, self.finish, self.done = [], None, threading.Event()
        self.order = order if order is not None else []

    def __call__(self, ev):
        if ev.token is not None:
            self.tokens.append(ev.token)
        if ev.finish is not None:
            self.finish = ev.finish
            self.order.append(self)
            self.done.set()


def _until(cond, timeout=30.0):
    deadline = time.perf_counter() + timeout
    while not cond():
        assert time.perf_counter() < deadline, "timed out"
        time.sleep(0.001)


def _seq(prompt, n, order=None, **kw):
    c = Client(order)
    return Sequence(prompt=list(prompt), max_tokens=n, on_event=c, **kw), c


@pytest.fixture(scope="module")
def models():
    model = _model()
    return model, copy.deepcopy(model)  # the engine lays its model out for decoding; the reference is apart


def _run(model, seqs, max_batch=2, stagger=0.0):
    engine = Engine(model, max_batch=max_batch, max_queue=16)
    engine.start()
    try:
        for s, _ in seqs:
            engine.submit([s])
            time.sleep(stagger)
        for _, c in seqs:
            assert c.done.wait(60)
    finally:
        engine.shutdown(1.0)
    return engine


def test_tokens_equal_generate_greedy_and_sampled_with_rows_reused(models):
    model, ref = models
    prompts = [*PROMPTS, [1, 2, 3, 4, 5, 6, 7], [50256]]
    kinds = [dict(temperature=0.0), dict(temperature=1.0, top_k=50, seed=7), dict(temperature=0.9, top_p=0.9, seed=3)]
    seqs = [_seq(p, 12 + i, **kinds[i % 3]) for i, p in enumerate(prompts)]
    engine = _run(model, seqs, max_batch=2, stagger=0.01)
    for (s, c), p in zip(seqs, prompts):
        want = generate(ref, [p], max_new_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k,
                        top_p=s.top_p, seed=s.seed, eot_id=50256)[0]
        assert c.tokens == want
        assert c.finish == ("length" if len(want) == s.max_tokens else "stop")
    n = engine.counters
    assert n.admitted == 5 and n.reused >= 3 and engine.running == 0 and n.finished == 5


def _greedy(ref, prompt, n):
    return generate(ref, [prompt], max_new_tokens=n, temperature=0, eot_id=50256)[0]


def test_a_later_short_sequence_finishes_first_and_columns_move(models):
    """A long row runs; a short one sent later finishes first; a prompt longer than the columns
    written so far moves the running rows right; a row outliving the others moves them left."""
    model, ref = models
    order = []
    first, c_first = _seq([50256], 40, order, temperature=0.0)
    long, c_long = _seq(PROMPTS[0], 60, order, temperature=0.0)  # 4 + 60 = the whole context
    short, c_short = _seq(PROMPTS[1], 3, order, temperature=0.0)
    late, c_late = _seq([1, 2, 3, 4, 5, 6, 7], 57, order, temperature=0.0)
    engine = Engine(model, max_batch=4, max_queue=4)
    engine.start()
    try:
        engine.submit([first])  # one prompt token: slot 1
        _until(lambda: len(c_first.tokens) >= 1)
        engine.submit([long])  # 4 > slot: the first row's columns move right
        _until(lambda: len(c_long.tokens) >= 5)
        engine.submit([short])
        assert c_short.done.wait(30)
        _until(lambda: len(c_long.tokens) >= 45)
        engine.submit([late])  # outlives the long row: the slot reaches the last column
        for c in (c_first, c_long, c_late):
            assert c.done.wait(60)
    finally:
        engine.shutdown(1.0)
    assert order.index(c_short) < order.index(c_long)
    for s, c in [(first, c_first), (long, c_long), (short, c_short), (late, c_late)]:
        assert c.tokens == _greedy(ref, s.prompt, s.max_tokens)
    assert engine.counters.compactions >= 2  # one move right, one (or more) left
    assert engine.running == 0


def test_stop_strings_end_a_row_as_generate_does(models):
    model, ref = models
    free = generate(ref, [PROMPTS[2]], max_new_tokens=20, temperature=0, eot_id=None)[0]
    from data_pipeline.tokenizer import get_tokenizer

    text = get_tokenizer().decode(free[5:7])
    want = generate(ref, [PROMPTS[2]], max_new_tokens=20, temperature=0, stop=[text])[0]
    s, c = _seq(PROMPTS[2], 20, temperature=0.0, stop=[text])
    _run(model, [(s, c)])
    assert c.tokens == want and len(want) < 20 and c.finish == "stop"


def test_cancel_frees_the_row_within_one_step_and_a_full_queue_refuses(models):
    model, _ = models
    engine = Engine(model, max_batch=1, max_queue=1)
    s, c = _seq(PROMPTS[0], 60, temperature=0.0)
    engine.start()
    try:
        engine.submit([s])
        _until(lambda: len(c.tokens) >= 3)
        queued, cq = _seq(PROMPTS[1], 2)
        engine.submit([queued])  # waits: the one row is busy
        with pytest.raises(QueueFull):
            engine.submit([_seq(PROMPTS[1], 2)[0]])
        engine.cancel([queued])  # leaves the queue at once
        assert engine.waiting == 0 and cq.finish == "cancelled"
        engine.cancel([s])
        assert c.done.wait(10) and c.finish == "cancelled"
        assert s.freed_step - s.cancel_step <= 1
    finally:
        engine.shutdown(1.0)
    assert engine.running == 0 and engine.counters.cancelled == 2


def test_shutdown_cancels_running_rows_after_the_grace(models):
    model, _ = models
    engine = Engine(model, max_batch=2, max_queue=2)
    s, c = _seq(PROMPTS[0], 60, temperature=0.0)
    engine.start()
    engine.submit([s])
    _until(lambda: c.tokens)
    t0 = time.perf_counter()
    engine.shutdown(0.0)
    assert time.perf_counter() - t0 < 5 and c.finish == "abort" and engine.running == 0
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit([_seq(PROMPTS[1], 2)[0]])
