"""gpt2-serve: an OpenAI-compatible completions server over continuous batching (``engine.py``: the
loop, no HTTP; ``app.py``: the routes; ``main.py``: the command)."""
