"""gpt2-serve over HTTP with the official openai client, one server per module on 127.0.0.1 (a free
port) over a tiny random model exported in the test: completions and streaming equal gpt2-generate
(greedy, seeded sampling, n > 1 and prompt lists, stop strings), logprobs equal the model's
log-softmax, continuous batching across requests, every bad input's status and error body with no
row left running, the metrics, the playground in a real headless browser, SIGTERM. (A bad model path:
tests/test_cli_contract.py.)"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from helpers import REPO
from test_generate import _model

from data_pipeline.tokenizer import get_tokenizer
from pretrain.inference.generate import generate
from pretrain.model.hf import export_hf
from pretrain.model.weights import load_model

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

CAP = 48  # --max-tokens of the module's server
LOGPROB_TOL = 1e-4  # the served log-probabilities against the model's log-softmax (fp32; another layout)
PROMPT = "Hello, I'm a language model,"


def _until(cond, timeout=30.0, what="condition"):
    deadline = time.perf_counter() + timeout
    while not cond():
        assert time.perf_counter() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from pretrain.serve.app import create_app
    from pretrain.serve.engine import Engine

    export = export_hf(_model(), tmp_path_factory.mktemp("serve") / "export")
    engine = Engine(load_model(export), max_batch=4, max_queue=8)
    engine.start()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny", CAP), host="127.0.0.1", port=0,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    _until(lambda: srv.started, what="the server")
    port = srv.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, engine=engine, ref=load_model(export), export=export,
                          client=openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0))
    srv.should_exit = True
    thread.join(30)
    engine.shutdown(1.0)


def _ids(text):
    return get_tokenizer().encode(text)


def _text(ids):
    return get_tokenizer().decode(ids)


def _idle(server):
    _until(lambda: server.engine.running == 0 and server.engine.waiting == 0, what="the rows to be freed")


def test_completion_and_stream_equal_gpt2_generate_greedy(server):
    want = generate(server.ref, [_ids(PROMPT)], max_new_tokens=20, temperature=0)[0]
    r = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    c = r.choices[0]
    assert c.text == _text(want) and len(want) > 5
    assert c.finish_reason == ("length" if len(want) == 20 else "stop")
    assert r.usage.prompt_tokens == len(_ids(PROMPT)) and r.usage.completion_tokens == len(want)
    chunks = list(server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0,
                                                   stream=True))
    assert len(chunks) > 3  # one event per token (whole characters)
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    assert chunks[-1].choices[0].finish_reason == c.finish_reason
    echo = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPT + c.text
    _idle(server)


def test_sampled_n_and_prompt_lists_equal_gpt2_generate_with_the_seed(server):
    prompts = [PROMPT, "The quick brown fox"]
    r = server.client.completions.create(model="tiny", prompt=prompts, max_tokens=12, n=3, temperature=1.0,
                                         seed=11, extra_body={"top_k": 40})
    rows = [_ids(p) for p in prompts for _ in range(3)]  # gpt2-generate --num-samples 3 --seed 11
    want = generate(server.ref, rows, max_new_tokens=12, temperature=1.0, top_k=40, seed=11)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [_text(w) for w in want]
    assert len({c.text for c in r.choices}) > 2  # the samples differ
    nucleus = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.8,
                                               top_p=0.9, seed=5)
    assert nucleus.choices[0].text == _text(generate(server.ref, [_ids(PROMPT)], max_new_tokens=12,
                                                     temperature=0.8, top_p=0.9, seed=5)[0])
    _idle(server)


def test_stop_ends_the_text_before_the_stop_string(server):
    free = _text(generate(server.ref, [_ids(PROMPT)], max_new_tokens=30, temperature=0, eot_id=None)[0])
    stop = free[8:11]
    for stream in (False, True):
        r = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0,
                                             stop=[stop, "never appears"], stream=stream)
        parts = list(r) if stream else [r]
        text = "".join(p.choices[0].text for p in parts)
        assert text == free[: free.index(stop)]
        assert parts[-1].choices[0].finish_reason == "stop"
    _idle(server)


def test_logprobs_equal_the_models_log_softmax(server):
    r = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    toks = generate(server.ref, [_ids(PROMPT)], max_new_tokens=8, temperature=0)[0]
    seq = torch.tensor([_ids(PROMPT) + toks])
    with torch.no_grad():
        lp = server.ref(seq)[0][0, :, : server.ref.config.vocab_size].float().log_softmax(-1)  # (T, V)
    n = len(_ids(PROMPT))
    got = r.choices[0].logprobs
    assert len(got.token_logprobs) == len(toks)
    for i, t in enumerate(toks):
        assert abs(got.token_logprobs[i] - lp[n - 1 + i, t].item()) < LOGPROB_TOL
        top = torch.topk(lp[n - 1 + i], 3)
        assert sorted(got.top_logprobs[i].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=LOGPROB_TOL)
        assert got.tokens[i] == _text([t])
    # echo + logprobs (lm-eval's loglikelihood request): the prompt's tokens scored, the first None
    e = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    scored = e.choices[0].logprobs.token_logprobs
    assert scored[0] is None and len(scored) == n
    assert scored[1:] == pytest.approx([lp[i, _ids(PROMPT)[i + 1]].item() for i in range(n - 1)], abs=LOGPROB_TOL)
    _idle(server)


def test_a_later_short_request_finishes_first_and_rows_are_reused(server):
    before = server.engine.counters.reused
    stream = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=CAP, temperature=0,
                                              stream=True, extra_body={"stop": None})
    events = iter(stream)
    first = next(events)
    short = server.client.completions.create(model="tiny", prompt="The", max_tokens=2, temperature=0)
    assert short.choices[0].finish_reason in ("length", "stop")
    # Rows go lowest first: the short one may have had a row no request had used yet (this test run
    # alone); the next one gets a row an earlier sequence left (the short one's, or the long one's).
    again = server.client.completions.create(model="tiny", prompt="The", max_tokens=2, temperature=0)
    assert again.choices[0].text == short.choices[0].text
    rest = list(events)  # the long one was still running when the short one finished
    assert rest and rest[-1].choices[0].finish_reason is not None
    assert first.choices[0].finish_reason is None
    assert server.engine.counters.reused > before
    _idle(server)


BAD = [
    ("invalid JSON", b'{"prompt": "x",', 400, "body"),
    ("body not an object", [1, 2], 400, None),
    ("missing prompt", {"max_tokens": 3}, 400, "prompt"),
    ("temperature < 0", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("temperature a string", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("top_p 0", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("n 0", {"prompt": "x", "n": 0}, 400, "n"),
    ("logprobs 99", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("stop a number", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("prompt longer than the context", {"prompt": [11] * 65}, 400, "prompt"),
    ("token id outside the vocabulary", {"prompt": [50257]}, 400, "prompt"),
    ("max_tokens above the cap", {"prompt": "x", "max_tokens": CAP + 1}, 400, "max_tokens"),
    ("max_tokens negative", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("penalty", {"prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("another model", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_the_apis_error_body_naming_the_field(server, case):
    _, body, status, param = case
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"].endswith("error")
    if param not in (None, "body"):
        assert param in err["message"] or param == "prompt"
    assert server.engine.running == 0 and server.engine.waiting == 0


def test_openai_client_raises_its_bad_request_error(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.completions.create(model="tiny", prompt="x", max_tokens=CAP + 1)
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def _open_stream(server, first=True, **body):
    """A raw streaming request: (the socket, its reader), after its first event when ``first``."""
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30)
    data = json.dumps({"prompt": PROMPT, "max_tokens": CAP, "temperature": 0, "stream": True, **body}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    f = sock.makefile("rb")
    if not first:
        return sock, f
    status = f.readline()
    assert b" 200 " in status, status
    while not f.readline().startswith(b"data: "):
        pass
    return sock, f


@contextlib.contextmanager
def _held(engine):
    """The engine holds still (before its next iteration; at most the current one finishes) inside."""
    gate, iterate = threading.Event(), engine.iterate

    def gated(admit):
        gate.wait(60)
        iterate(admit)

    engine.iterate = gated
    try:
        yield
    finally:
        gate.set()
        del engine.iterate


def test_a_full_queue_gets_429_with_retry_after(server):
    engine = server.engine
    running = _open_stream(server, n=4)  # the 4 rows
    with _held(engine):
        _until(lambda: engine.running == 4, what="4 rows")
        waiting = _open_stream(server, n=8, first=False)  # 8 sequences waiting: the queue is full
        try:
            _until(lambda: engine.waiting == 8, what="a full queue")
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        finally:
            for sock, f in (running, waiting):
                f.close()
                sock.close()
    _idle(server)


@pytest.mark.parametrize("stream", [True, False])
def test_a_disconnecting_client_frees_its_row_within_one_step(server, stream):
    engine = server.engine
    cancelled = engine.counters.cancelled
    sock, f = _open_stream(server, stream=stream, first=stream)
    _until(lambda: engine.running == 1, what="the row")
    with _held(engine):
        f.close()
        sock.close()
        _until(lambda: all(r.cancelled for r in engine.rows if r is not None), what="the cancel")
        assert engine.running == 1  # cancelled by the server while its row was still running
    _idle(server)
    assert engine.counters.cancelled == cancelled + 1
    assert engine.counters.cancel_lag <= 1  # decode steps between the cancel and the row's release


def test_models_health_metrics_and_the_playground_page(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("gpt2_serve_requests_total", "gpt2_serve_generation_tokens_total", "gpt2_serve_queue_depth",
                 "gpt2_serve_running_rows", "gpt2_serve_time_to_first_token_seconds_bucket",
                 "gpt2_serve_inter_token_latency_seconds_bucket", "gpt2_serve_rows_reused_total"):
        assert name in text, name
    assert 'gpt2_serve_requests_total{status="200"}' in text
    page = httpx.get(server.url + "/").text
    assert 'id="generate"' in page and "http://" not in page and "https://" not in page  # nothing fetched elsewhere


def _browser() -> tuple[str, str] | None:
    """(chromium, chromedriver), installed from Debian by package name where missing and possible."""
    def found():
        b = shutil.which("chromium") or shutil.which("chromium-browser")
        d = shutil.which("chromedriver")
        return (b, d) if b and d else None

    if found() is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], capture_output=True,
                       timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return found()


def test_the_playground_streams_in_a_real_browser(server):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    found = _browser()
    if found is None:
        pytest.skip("no browser: Debian's chromium and chromium-driver are not installed and cannot be here")
    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=found[1]))
    try:
        driver.get(server.url + "/")
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(PROMPT)
        for name, value in [("max_tokens", "40"), ("temperature", "0")]:
            el = driver.find_element(By.ID, name)
            el.clear()
            el.send_keys(value)
        # Every text the completion showed, as the page replaced it chunk by chunk (a poll could miss them:
        # the tiny model streams 40 tokens in a few milliseconds).
        driver.execute_script("""
            window.seen = [];
            new MutationObserver((records) => { for (const r of records) for (const n of r.addedNodes)
                window.seen.push(n.textContent); }).observe(document.getElementById("output"),
                {childList: true, subtree: true});""")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        seen = [t for t in driver.execute_script("return window.seen") if t and t != PROMPT]
        want = _text(generate(server.ref, [_ids(PROMPT)], max_new_tokens=40, temperature=0)[0])
        assert driver.find_element(By.ID, "completion").text == want.strip() or \
            driver.find_element(By.ID, "completion").get_attribute("textContent") == want
        assert len(seen) >= 2 and len(set(map(len, seen))) >= 2, seen  # the text grew while it streamed
        assert want.startswith(seen[0]) and len(seen[0]) < len(want)
    finally:
        driver.quit()
    _idle(server)


def _serve(*args):
    return subprocess.Popen([sys.executable, "-m", "pretrain.serve.main", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigterm_stops_admitting_finishes_in_flight_and_exits_0(server):
    with socket.socket() as probe:  # a free port (the child binds it a moment later)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    p = _serve("--model", str(server.export), "--port", str(port), "--grace", "2", "--name", "tiny")
    try:
        url = f"http://127.0.0.1:{port}"
        _until(lambda: _ok(url), timeout=180, what="the child server")  # ~18 s on a loaded 2-core machine
        got = {}

        def long():
            got["r"] = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 60,
                                                                 "temperature": 0}, timeout=60)

        t = threading.Thread(target=long)
        t.start()
        time.sleep(0.3)
        t0 = time.perf_counter()
        p.send_signal(signal.SIGTERM)
        try:  # no longer admitting: refused (503) or the socket already closed
            late = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=10)
            assert late.status_code == 503, late.text
        except httpx.TransportError:
            pass
        assert p.wait(30) == 0
        assert time.perf_counter() - t0 < 15
        t.join(30)
        assert got["r"].status_code in (200, 503)  # finished within the grace, or cancelled after it
        assert "stopped" in p.stderr.read()
    finally:
        p.kill()


def _ok(url):
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
