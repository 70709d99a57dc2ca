"""The HTTP side of gpt2-serve: OpenAI's completions API over the engine (FastAPI).

Routes: ``POST /v1/completions`` (OpenAI's fields; ``top_k`` as vLLM's extra field; ``stream``: Server-Sent
Events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text),
``GET /`` (the playground page). ``/v1/chat/completions`` is not offered: a base GPT-2 has no chat template,
and inventing one would give answers no chat model would; it answers 404 saying to use completions.

A request with P prompts and ``n`` samples each is P * n engine sequences; choice ``i = p * n + j`` samples
with ``seed + i`` (``gpt2-generate --num-samples n --seed SEED``'s rows), so its tokens are that command's.
Text leaves a sequence as soon as it is certain: whole UTF-8 characters, and never the beginning of a stop
string until it is known not to be one (the stop string itself is not returned, as OpenAI specifies).

Errors are OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 naming the field for bad
JSON or parameters, a prompt longer than the context or ``max_tokens`` above ``--max-tokens``; 404 for
another model name; 429 with ``Retry-After`` when the queue is full; 503 while shutting down. A client that
disconnects has its sequences cancelled at once (a task waits for the disconnect: uvicorn's ASGI 2.4 tells
a streaming response only at its next write), so their rows are free at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from data_pipeline.tokenizer import get_tokenizer
from pretrain.serve.engine import Engine, GenerationError, NotAccepting, QueueFull, Sequence
from pretrain.serve.metrics import Metrics

MAX_N = 16  # samples per prompt
MAX_LOGPROBS = 20  # alternatives per token (OpenAI: 5; vLLM: 20)
MAX_STOP = 4  # stop strings (OpenAI's limit)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


# ---- the request -------------------------------------------------------------------------------


def _int(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ApiError(400, f"'{name}' must be {bound}, got {v!r}", name)
    return v


def _number(body: dict, name: str, default: float, ok, what: str) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise ApiError(400, f"'{name}' must be {what}, got {v!r}", name)
    return float(v)


def _prompts(body: dict, tok) -> list[list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids or a list of such lists."""
    p = body.get("prompt")
    if isinstance(p, str):
        p = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        p = [p]
    if not isinstance(p, list) or not p or not all(
            isinstance(x, str) or (isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in x)) for x in p):
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                            "lists of token ids", "prompt")
    return [(tok.encode(x) if isinstance(x, str) else list(x)) or [tok.eot_id] for x in p]


def parse_completion(body, tok, max_tokens_cap: int, context: int, vocab: int) -> dict:
    """The request's settings, checked: an :class:`ApiError` (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None)
    prompts = _prompts(body, tok)
    for i, p in enumerate(prompts):
        if len(p) > context:
            raise ApiError(400, f"prompt {i} has {len(p)} tokens but the model's context is {context} tokens; "
                                "shorten the prompt", "prompt")
        if any(not 0 <= t < vocab for t in p):
            raise ApiError(400, f"prompt {i} holds token ids outside [0, {vocab})", "prompt")
    max_tokens = _int(body, "max_tokens", 16, 0)
    if max_tokens > max_tokens_cap:
        raise ApiError(400, f"'max_tokens' is {max_tokens}, above this server's limit of {max_tokens_cap} "
                            "(gpt2-serve --max-tokens)", "max_tokens")
    top_k = body.get("top_k")
    top_k = None if top_k in (None, -1, 0) else _int(body, "top_k", None, 1)
    top_p = _number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    for name in ("stream", "echo"):
        if not isinstance(body.get(name, False), bool):
            raise ApiError(400, f"'{name}' must be true or false", name)
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}' is not supported by this server; leave it 0", name)
    if body.get("logit_bias"):
        raise ApiError(400, "'logit_bias' is not supported by this server", "logit_bias")
    if body.get("suffix") is not None:
        raise ApiError(400, "'suffix' is not supported by this server", "suffix")
    n = _int(body, "n", 1, 1, MAX_N)
    if body.get("best_of") not in (None, n):
        raise ApiError(400, "'best_of' is not supported by this server (leave it unset or equal to n)", "best_of")
    seed = _int(body, "seed", None, -(2**63), 2**64 - 1)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return dict(
        prompts=prompts, max_tokens=max_tokens, n=n, stop=stop or [], top_k=top_k, seed=seed,
        temperature=_number(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
        top_p=None if top_p == 1.0 else top_p, stream=body.get("stream", False), echo=body.get("echo", False),
        logprobs=_int(body, "logprobs", None, 0, MAX_LOGPROBS),
        include_usage=bool((opts or {}).get("include_usage", False)),
    )


# ---- a choice's text ---------------------------------------------------------------------------


class Choice:
    """One sequence's output as OpenAI returns it: the text released so far (whole characters, stop
    strings cut off and never half-sent), and the logprobs."""

    def __init__(self, index: int, stop: list[str], tok, want_logprobs: bool) -> None:
        self.index, self.stop, self.tok = index, stop, tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.tokens, self.finish = "", 0, 0, None
        self.base = 0  # where the completion begins in ``text`` (after an echoed prompt)
        self.stopped_at: int | None = None  # the text ends here (a stop string begins)
        self.lp_sent = 0  # logprobs entries already streamed
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} if want_logprobs else None

    def _add_logprob(self, token: int, lp, top, offset: int) -> None:
        self.lp["tokens"].append(self.tok.decode([token]))
        self.lp["token_logprobs"].append(lp)
        self.lp["top_logprobs"].append(None if top is None else {self.tok.decode([t]): v for t, v in top})
        self.lp["text_offset"].append(offset)

    def echo(self, prompt: list[int], prompt_lp) -> None:
        offset = 0
        for i, t in enumerate(prompt):
            if self.lp is not None:
                lp, top = prompt_lp[i] if prompt_lp and prompt_lp[i] is not None else (None, None)
                self._add_logprob(t, lp, top, offset)
            offset += len(self.tok.decode([t]))
        self.text = self.tok.decode(prompt)
        self.base = len(self.text)

    def add(self, token: int, lp=None, top=None) -> None:
        if self.stopped_at is not None:
            return
        self.tokens += 1
        if self.lp is not None:
            self._add_logprob(token, lp, top, len(self.text))
        self.text += self.decoder.decode(self.tok.decode_bytes([token]))
        cuts = [i for s in self.stop if (i := self.text.find(s, self.base)) >= 0]
        if cuts:
            self.stopped_at = min(cuts)

    def end(self, reason: str) -> None:
        if self.stopped_at is None:
            self.text += self.decoder.decode(b"", final=True)
        self.finish = reason if reason in ("stop", "length") else "abort"

    def released(self) -> str:
        """Text certain to be returned and not sent yet (marks it sent)."""
        end = self.stopped_at if self.stopped_at is not None else len(self.text)
        if self.finish is None and self.stopped_at is None:  # hold back a possible stop string's start
            for s in self.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        new, self.sent = self.text[self.sent : end], max(self.sent, end)
        return new

    def final_text(self) -> str:
        return self.text[: self.stopped_at] if self.stopped_at is not None else self.text

    def json(self, text: str, finish, new_logprobs: bool = False) -> dict:
        """The choice's JSON; ``new_logprobs``: only the logprobs entries not sent yet (a stream chunk)."""
        lp = self.lp
        if lp is not None and new_logprobs:
            lp = {key: v[self.lp_sent :] for key, v in lp.items()}
            self.lp_sent = len(self.lp["tokens"])
        return {"text": text, "index": self.index, "logprobs": lp, "finish_reason": finish}


# ---- one request -------------------------------------------------------------------------------


class Completion:
    """One completion request: its sequences in the engine (``prompt i // n``, seed ``seed + i``), the
    events they send (through the event loop), and the response, whole or streamed."""

    def __init__(self, engine: Engine, metrics: Metrics, tok, model_name: str, req: dict) -> None:
        self.engine, self.metrics, self.req = engine, metrics, req
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        n, self.prompts = req["n"], req["prompts"]
        seed = req["seed"] if req["seed"] is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little")
        self.seqs, self.choices = [], []
        for i in range(len(self.prompts) * n):
            p = self.prompts[i // n]
            self.choices.append(Choice(i, req["stop"], tok, req["logprobs"] is not None))
            if req["echo"] and req["logprobs"] is None:
                self.choices[-1].echo(p, None)

            def deliver(ev, i=i):
                loop.call_soon_threadsafe(self.events.put_nowait, (i, ev))

            self.seqs.append(Sequence(prompt=p, max_tokens=req["max_tokens"], on_event=deliver,
                                      temperature=req["temperature"], top_k=req["top_k"], top_p=req["top_p"],
                                      seed=seed + i, stop=req["stop"], logprobs=req["logprobs"],
                                      echo_logprobs=req["echo"] and req["logprobs"] is not None))
        self.head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                     "model": model_name}
        self.left = len(self.seqs)  # sequences not finished yet

    async def respond(self, request: Request):
        try:
            self.engine.submit(self.seqs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", None, "rate_limit_error",
                           {"Retry-After": "1"}) from None
        except NotAccepting as e:
            raise ApiError(503, str(e), None, "server_error") from None
        except GenerationError as e:
            raise ApiError(400, str(e), "prompt") from None
        self.metrics.requests.labels(status="200").inc()
        self.metrics.prompt_tokens.inc(sum(map(len, self.prompts)))
        if self.req["stream"]:
            return StreamingResponse(self.stream(request), media_type="text/event-stream")
        watch = asyncio.create_task(self.watch(request))
        try:
            while self.left:
                await self.next()
        finally:
            self.close(watch)
        if any(c.finish == "abort" for c in self.choices):
            raise ApiError(503, "the server stopped before this completion finished; retry", None, "server_error")
        return {**self.head, "choices": [c.json(c.final_text(), c.finish) for c in self.choices],
                "usage": self.usage()}

    async def next(self) -> tuple[Choice, bool]:
        """The next event, applied to its choice: (the choice, whether it finished it)."""
        i, ev = await self.events.get()
        c = self.choices[i]
        if ev.prompt_logprobs is not None:
            c.echo(self.seqs[i].prompt, ev.prompt_logprobs)
        if ev.token is not None:
            c.add(ev.token, ev.logprob, ev.top)
        if ev.finish is not None:
            c.end(ev.finish)
            self.left -= 1
        return c, ev.finish is not None

    def usage(self) -> dict:
        prompt, done = sum(map(len, self.prompts)), sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    async def watch(self, request: Request) -> None:
        """Cancel the sequences as soon as the client disconnects (not at the next write: a waiting
        request writes nothing)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(self.seqs)

    def close(self, watch: asyncio.Task) -> None:
        watch.cancel()
        if self.left:  # the client went away (or the server is stopping): free the rows
            self.engine.cancel(self.seqs)

    async def stream(self, request: Request):
        """Server-Sent Events: a chunk per choice whenever it has new text (or ends), then ``[DONE]``."""
        watch = asyncio.create_task(self.watch(request))
        try:
            first = [c for c in self.choices if c.text]  # echo without logprobs: the prompt first
            if first:
                yield _sse({**self.head, "choices": [c.json(c.released(), None) for c in first]})
            while self.left:
                c, ended = await self.next()
                text = c.released()
                if text or ended:
                    yield _sse({**self.head, "choices": [c.json(text, c.finish, new_logprobs=True)]})
            if self.req["include_usage"]:
                yield _sse({**self.head, "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.close(watch)


# ---- the app -----------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str, max_tokens_cap: int, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app over a started ``engine``."""
    tok = get_tokenizer()
    cfg = engine.model.config
    metrics = metrics or Metrics(engine)
    app = FastAPI(title="gpt2-serve", docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        metrics.requests.labels(status=str(e.status)).inc()
        return error_response(e)

    @app.get("/health")
    async def health():
        ok = engine.error is None and engine.accepting
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "gpt2-pretrain", "max_model_len": cfg.block_size}]}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("pretrain.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat():
        raise ApiError(404, "chat completions are not offered: this is a base model with no chat template; "
                            "use /v1/completions", None, "not_found_error")

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", "body") from None
        if isinstance(body, dict) and body.get("model") not in (None, model_name):
            raise ApiError(404, f"the model {body['model']!r} does not exist; this server serves {model_name!r}",
                           "model", "not_found_error")
        req = parse_completion(body, tok, max_tokens_cap, cfg.block_size, cfg.vocab_size)
        return await Completion(engine, metrics, tok, model_name, req).respond(request)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return error_response(ApiError(404, f"no route {request.url.path}", None, "not_found_error"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc):
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}", None))

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
