"""make bench, serving: `deepfleet serve` against `make infer` on the same prompts.

Two lab machines at one core each (as the infer figure runs them), one model trained for
the purpose. Side by side in one run:

    serve_tokens_per_s   completion tokens/s of CONCURRENCY openai clients on the service
    infer_wall_tokens_per_s   the same prompts through `deepfleet infer`, launch included
    serve_vs_infer       the first over the second
    ttft_s               time to the first streamed token, one client on an idle service
    ttft_loaded_s        the same while CONCURRENCY clients are being answered

scripts/bench.py calls measure() with its lab up.
"""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

RUN = "serve-bench"
PORT = 8791
CONCURRENCY = 8
MAX_NEW = 32
PROMPTS = [f"{w} the lighthouse keeper" for w in ("The", "A", "Then", "Later")] * 8
GENERATED = re.compile(r"generated (\d+) tokens in ([\d.]+)s")


def _client():
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none", max_retries=0,
                         timeout=600)  # fmt: skip


def _ttft(client) -> float:
    began = time.monotonic()
    stream = client.completions.create(model=RUN, prompt="The sea", max_tokens=8, stream=True)
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.monotonic() - began
    return first if first is not None else float("nan")


def _serve_round(client) -> tuple[int, float]:
    def ask(prompt: str) -> int:
        got = client.completions.create(model=RUN, prompt=prompt, max_tokens=MAX_NEW)
        return got.usage.completion_tokens

    began = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        tokens = sum(pool.map(ask, PROMPTS))
    return tokens, time.monotonic() - began


def measure(deepfleet, df: str, root, logs, set_limits) -> dict:
    deepfleet("train", "--run", RUN, "--steps", "4", "--log-every", "2", log="serve-train")
    prompts = logs / "serve-prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    for index in (1, 2):  # one core each: two real machines would not share this one's
        set_limits(index, 1.0, None)
    try:
        out, infer_s = deepfleet(
            "infer", "--run", RUN, "--prompts", str(prompts), "--max-new-tokens", str(MAX_NEW),
            "--mode", "replicas", log="serve-infer",
        )  # fmt: skip
        infer_tokens = int(GENERATED.search(out).group(1))
        log = (logs / "serve.log").open("w")
        began = time.monotonic()
        proc = subprocess.Popen(
            [df, "serve", "--run", RUN, "--port", str(PORT)], cwd=root, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        ready = threading.Event()

        def read() -> None:
            for line in proc.stdout:
                log.write(f"[+{time.monotonic() - began:6.1f}s] {line}")
                log.flush()
                if line.startswith("deepfleet: serving "):
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 900
            while not ready.wait(1.0):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not become ready (see {logs / 'serve.log'})")
            start_s = time.monotonic() - began
            client = _client()
            _serve_round(client)  # warm: the first requests pay for lazy set-up
            idle = [_ttft(client) for _ in range(5)]
            tokens, seconds = _serve_round(client)
            loaded: list[float] = []
            load = threading.Thread(target=lambda: _serve_round(client))
            load.start()
            time.sleep(1.0)
            loaded = [_ttft(client) for _ in range(3)]
            load.join()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            reader.join(timeout=5)
            log.close()
    finally:
        for index in (1, 2):
            set_limits(index, None, None)
    serve_tps = tokens / seconds
    infer_tps = infer_tokens / infer_s
    return {
        "serve_tokens_per_s": round(serve_tps, 1),
        "serve_clients": CONCURRENCY,
        "serve_start_s": round(start_s, 1),
        "infer_wall_tokens_per_s": round(infer_tps, 1),
        "serve_vs_infer": round(serve_tps / infer_tps, 2),
        "ttft_s": round(statistics.median(idle), 3),
        "ttft_loaded_s": round(statistics.median(loaded), 3),
    }
