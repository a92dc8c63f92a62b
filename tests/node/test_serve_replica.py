"""The `deepfleet serve` replica (deepfleet_node.serve) as the gateway sees it: a real
process on a loopback port, a real tiny model, answers checked against plain transformers.

The tiny model is untrained, so its text is arbitrary bytes, U+FFFD halves of characters
included: a hard case for streaming deltas that must add up to the decoded completion.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from nodetools import free_port, node_env, require

require("fastapi")
require("uvicorn")

TOKEN = "test-secret-7f3a"
READY_TIMEOUT_S = 180
# "The keeper" meets EOS after 9 tokens, the other two run to max_tokens.
PROMPTS = ["The keeper", "The red boat", "Every morning the"]
MAX_TOKENS = 12


class Replica:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(model: Path, log: Path, *extra: str, token: str | None = TOKEN) -> Replica:
    port = free_port()
    env = node_env()
    env.pop("DEEPFLEET_SERVE_TOKEN", None)
    if token is not None:
        env["DEEPFLEET_SERVE_TOKEN"] = token
    cmd = [sys.executable, "-m", "deepfleet_node.serve", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), *extra]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Replica(proc, port, log)


def wait_ready(replica: Replica) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if replica.proc.poll() is not None:
            pytest.fail(f"replica exited {replica.proc.returncode}:\n{replica.output()[-4000:]}")
        try:
            status, _, body = call(replica.port, "GET", "/health")
        except OSError:
            time.sleep(0.2)
            continue
        assert status == 200, body
        return json.loads(body)
    pytest.fail(f"replica not ready in {READY_TIMEOUT_S}s:\n{replica.output()[-4000:]}")


def stop(replica: Replica) -> None:
    if replica.proc.poll() is None:
        replica.proc.kill()
        replica.proc.wait(timeout=30)


def call(port, method, path, body=None, token=TOKEN, headers=None):
    """(status, content type, body bytes) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if isinstance(body, dict | list):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type"), resp.read()
    finally:
        conn.close()


def generate(port, **body) -> tuple[str, list[str], dict]:
    """(text, the deltas as streamed, the done line) of one /generate."""
    status, ctype, raw = call(port, "POST", "/generate", body)
    assert status == 200, raw
    assert ctype.startswith("application/x-ndjson")
    assert raw.endswith(b"\n")
    lines = [json.loads(row) for row in raw.decode().splitlines()]
    *texts, done = lines
    for row in texts:
        assert set(row) == {"text"} and isinstance(row["text"], str) and row["text"], row
    assert set(done) == {"done", "finish_reason", "prompt_tokens", "completion_tokens"}, done
    assert done["done"] is True and done["finish_reason"] in ("stop", "length")
    deltas = [row["text"] for row in texts]
    return "".join(deltas), deltas, done


@pytest.fixture(scope="module")
def replica(tiny_model, tmp_path_factory):
    r = start(tiny_model, tmp_path_factory.mktemp("serve") / "replica.log", "--name", "lab1/0")
    try:
        health = wait_ready(r)
        yield r, health
    finally:
        stop(r)


@pytest.fixture(scope="module")
def port(replica) -> int:
    return replica[0].port


@pytest.fixture(scope="module")
def reference(tiny_model) -> dict[str, dict]:
    from deepfleet_node.infer.generate import reference_generate

    rows = reference_generate(str(tiny_model), PROMPTS, MAX_TOKENS)
    return {row["prompt"]: row for row in rows}


@pytest.fixture(scope="module")
def hf(tiny_model):
    """The tiny model and tokenizer in this process, for expectations beyond prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    return model, AutoTokenizer.from_pretrained(tiny_model)


def test_health_says_what_it_serves(replica, tiny_model):
    r, health = replica
    assert health["ready"] is True
    assert health["name"] == "lab1/0" and health["model"] == tiny_model.name
    assert health["device"] == "cpu" and health["dtype"] == "fp32"
    assert health["max_context"] == 512  # tiny's max_position_embeddings
    assert health["chat_template"] is True
    assert isinstance(health["tokens_per_s"], float) and health["tokens_per_s"] > 0
    # Port answering means ready: the start line comes after the warm-up.
    assert "replica lab1/0 ready: " in r.output() and "tok/s" in r.output()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_reference(port, reference, hf, prompt):
    text, deltas, done = generate(port, prompt=prompt, max_tokens=MAX_TOKENS)
    ref = reference[prompt]
    assert text == ref["completion"]
    assert done["completion_tokens"] == ref["tokens"]
    assert done["prompt_tokens"] == len(hf[1](prompt)["input_ids"])
    # Streamed as it was generated, not in one piece at the end.
    assert len(deltas) >= 3, deltas
    ended = ref["tokens"] < MAX_TOKENS  # EOS before max_tokens
    assert done["finish_reason"] == ("stop" if ended else "length")


def test_both_finish_reasons_occur(reference):
    # Keeps test_greedy_equals_reference meaningful: one prompt ends on EOS, one on length.
    assert {row["tokens"] < MAX_TOKENS for row in reference.values()} == {True, False}


def test_default_max_tokens_is_16(port):
    _, _, done = generate(port, prompt="The red boat")
    assert done["completion_tokens"] == 16 and done["finish_reason"] == "length"


def test_messages_go_through_the_chat_template(port, hf):
    import torch

    model, tok = hf
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :]
    got, _, done = generate(port, messages=messages, max_tokens=MAX_TOKENS)
    assert got == tok.decode(new, skip_special_tokens=True)
    assert done["prompt_tokens"] == enc["input_ids"].shape[1]
    assert enc["input_ids"][0].tolist().count(tok.bos_token_id) == 1  # the template's own


def test_stop_string_cuts_and_never_leaks(port, reference):
    prompt = "The red boat"
    full = reference[prompt]["completion"]
    # A stop string across two pieces of the stream: its first half arrives a token
    # before anything can know it is the start of a stop string.
    _, deltas, _ = generate(port, prompt=prompt, max_tokens=MAX_TOKENS)
    stop = next(
        a[-2:] + b[:2]
        for a, b in zip(deltas[:-2], deltas[1:-1], strict=True)
        if len(a) >= 2 and len(b) >= 2 and "\ufffd" not in a[-2:] + b[:2]
    )
    want = full[: full.find(stop)]
    text, deltas, done = generate(port, prompt=prompt, max_tokens=MAX_TOKENS, stop=["zzz", stop])
    # Had the first half gone out early, the deltas would add up to more than want.
    assert text == want
    assert all(stop not in d for d in deltas)
    assert done["finish_reason"] == "stop"
    assert done["completion_tokens"] < MAX_TOKENS  # generation ended early, not just the text


def test_stop_string_completed_by_the_last_token_is_stop(port, reference):
    # The shortest tail of a completion found nowhere earlier in it: only the last of
    # max_tokens tokens completes it, and that is still a stop, not a length.
    cases = [
        (prompt, full[-k:])
        for prompt, row in reference.items()
        if row["tokens"] == MAX_TOKENS
        for full in [row["completion"]]
        for k in range(1, len(full) + 1)
        if full.find(full[-k:]) == len(full) - k and "\ufffd" not in full[-k:]
    ]
    assert cases, reference
    prompt, tail = cases[0]
    full = reference[prompt]["completion"]
    text, _, done = generate(port, prompt=prompt, max_tokens=MAX_TOKENS, stop=[tail])
    assert text == full[: -len(tail)]
    assert done["finish_reason"] == "stop" and done["completion_tokens"] == MAX_TOKENS


@pytest.mark.parametrize("text", ["naïve café: 5€ — 日本語 ok", "emoji 🙂🙂 end"])
def test_deltas_add_up_across_split_characters(hf, text):
    """In-process: the streamer fed one token at a time, where a character's bytes come in
    several tokens (a valid completion the untrained model never writes)."""
    import torch

    from deepfleet_node.serve.stream import DeltaStreamer

    tok = hf[1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert any(tok.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    out: list = []
    streamer = DeltaStreamer(tok, [], (), out.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, handed over first
    for i in ids:
        streamer.put(torch.tensor([i]))
    assert streamer.finish(tok.decode(ids, skip_special_tokens=True))
    deltas = [payload for kind, payload in out]
    assert {kind for kind, _ in out} == {"text"} and "".join(deltas) == text
    assert len(deltas) > 5 and not any("\ufffd" in d for d in deltas)


def test_seeded_sampling_repeats(port):
    body = {"prompt": "One day", "max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first, _, _ = generate(port, **body)
    second, _, _ = generate(port, **body)
    assert first == second


def test_concurrent_requests_each_get_their_own_answer(port, reference):
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def one(prompt: str) -> None:
        try:
            results[prompt] = generate(port, prompt=prompt, max_tokens=MAX_TOKENS)[0]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results == {p: reference[p]["completion"] for p in PROMPTS}


@pytest.mark.parametrize(
    ("token", "path", "method"),
    [
        (None, "/health", "GET"),
        ("wrong", "/health", "GET"),
        (None, "/generate", "POST"),
        ("wrong", "/generate", "POST"),
        (TOKEN + "x", "/generate", "POST"),
        (None, "/nowhere", "GET"),
    ],
)
def test_without_the_token_is_401(port, token, path, method):
    body = {"prompt": "The keeper"} if method == "POST" else None
    status, ctype, raw = call(port, method, path, body, token=token)
    assert status == 401 and ctype == "application/json"
    assert set(json.loads(raw)) == {"error"}


def test_other_schemes_are_401(port):
    status, _, _ = call(port, "GET", "/health", token=None, headers={"Authorization": TOKEN})
    assert status == 401


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('{"prompt": "x",', "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("", "not JSON"),
        ('["The keeper"]', "object"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
        ({"max_tokens": 4}, "exactly one"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "4"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": 3}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 1}]}, "messages[0]"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "seed": "1"}, "seed"),
        ({"prompt": "x", "stop": "x"}, "stop"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": "x", "n": 2}, "unknown"),
    ],
)
def test_bad_requests_are_400(port, body, says):
    status, ctype, raw = call(port, "POST", "/generate", body)
    assert status == 400, raw
    assert ctype == "application/json"
    error = json.loads(raw)
    assert set(error) == {"error"} and says in error["error"] and "\n" not in error["error"]


def test_over_long_is_400_with_both_numbers(port, hf):
    prompt = "The red boat"
    n = len(hf[1](prompt)["input_ids"])
    status, _, raw = call(port, "POST", "/generate", {"prompt": prompt, "max_tokens": 512 - n + 1})
    assert status == 400
    error = json.loads(raw)["error"]
    assert f"prompt_tokens {n}" in error and f"max_tokens {512 - n + 1}" in error and "512" in error
    # exactly at the limit is fine
    _, _, done = generate(port, prompt=prompt, max_tokens=512 - n)
    assert done["prompt_tokens"] + done["completion_tokens"] <= 512


def test_unknown_path_and_method_answer_error_json(port):
    for method, path, want in (("GET", "/nowhere", 404), ("GET", "/generate", 405)):
        status, ctype, raw = call(port, method, path)
        assert status == want and ctype == "application/json"
        assert set(json.loads(raw)) == {"error"}


def test_dropped_client_stops_the_generation(replica, reference):
    r, _ = replica
    max_tokens = 480
    conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=60)
    body = json.dumps({"prompt": "The red boat", "max_tokens": max_tokens})
    conn.request("POST", "/generate", body, {"Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert "text" in json.loads(resp.readline())
    conn.close()  # mid-stream, as a client that gave up
    deadline = time.monotonic() + 30
    while "request cancelled after" not in r.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(x for x in r.output().splitlines() if "request cancelled after" in x)
    done = int(line.split("request cancelled after ")[1].split()[0])
    assert done < max_tokens, line
    # and the replica serves the next request as before
    assert (
        generate(r.port, prompt="The keeper", max_tokens=MAX_TOKENS)[0]
        == (reference["The keeper"]["completion"])
    )


def test_without_chat_template_then_sigterm(tiny_model, tmp_path):
    """A second replica: a model whose tokenizer has no chat template, stopped by SIGTERM."""
    model = tmp_path / "plain"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    r = start(model, tmp_path / "plain.log")
    try:
        health = wait_ready(r)
        assert health["chat_template"] is False and health["model"] == "plain"
        messages = [{"role": "user", "content": "Hi"}]
        status, _, raw = call(r.port, "POST", "/generate", {"messages": messages})
        assert status == 400 and "chat template" in json.loads(raw)["error"]
        r.proc.send_signal(signal.SIGTERM)
        assert r.proc.wait(timeout=10) == 0, r.output()[-4000:]
        assert "replica" in r.output() and "stopped" in r.output()
    finally:
        stop(r)


def test_missing_token_refuses_to_start(tiny_model, tmp_path):
    for token in (None, ""):
        r = start(tiny_model, tmp_path / "notoken.log", token=token)
        try:
            assert r.proc.wait(timeout=60) == 2
        finally:
            stop(r)
        lines = r.output().strip().splitlines()
        assert len(lines) == 1 and "DEEPFLEET_SERVE_TOKEN" in lines[0], lines


def test_module_imports_without_torch():
    # The operator's machine may import node modules for their constants; no torch there.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import deepfleet_node.serve.cli as s\n"
        "print(s.TOKEN_ENV)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=node_env(), capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "DEEPFLEET_SERVE_TOKEN", out.stderr
