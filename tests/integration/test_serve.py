"""deepfleet serve on the lab's three machines, driven with the official openai client.

One service for the module, listening beyond loopback (so it needs a key), on the model
test_cluster trained (trained here if it is missing): chat and completions, streamed and
not, equal to single-process generate; 30 concurrent requests; a replica's process
killed under load; status; a training job refused while it serves; `serve --stop`; and a
second service ended by Ctrl-C.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from labtools import DEEPFLEET, ROOT, running_ranks

pytestmark = pytest.mark.lab

RUN = "it"
KEY = "lab-key"
PROMPTS = ["The lighthouse keeper", "The first boat is", "She writes the weather"]
SERVE = "deepfleet_node[.]serve"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """`deepfleet serve` running in the background; its output collected as it comes."""

    def __init__(self, cluster, *args):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*DEEPFLEET, "serve", "--run", RUN, "--port", str(self.port), *args],
            env=cluster.env(), cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, within: float) -> re.Match:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output, re.M)
            if found:
                return found
            if self.proc.poll() is not None:
                time.sleep(0.5)  # the reader may still hold its last lines
                found = re.search(pattern, self.output, re.M)
                if found:
                    return found
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.output}")
            time.sleep(0.5)
        raise AssertionError(f"no {pattern!r} within {within:.0f} s:\n{self.output[-4000:]}")

    def end(self, within: float = 90) -> int:
        code = self.proc.wait(timeout=within)
        self._reader.join(timeout=5)
        return code

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=300)


def reference(cluster, prompts: list[str], tokens: int) -> list[str]:
    """Plain transformers generate, one process, on the same exported model."""
    code, out = cluster.node_exec(
        0,
        ["python", "-m", "deepfleet_node.infer", "--reference", "--model",
         f"/workspace/checkpoints/{RUN}/final", "--prompt", *prompts,
         "--max-new-tokens", str(tokens), "--output", "/tmp/serve-ref.jsonl"],
    )  # fmt: skip
    assert code == 0, out
    code, out = cluster.node_exec(0, ["cat", "/tmp/serve-ref.jsonl"])
    return [json.loads(line)["completion"] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def service(cluster):
    code, _ = cluster.node_exec(
        0, ["test", "-f", f"/workspace/checkpoints/{RUN}/final/config.json"]
    )
    if code != 0:  # this file run alone: the model test_cluster trains
        cluster.run("train", "--run", RUN, "--steps", "4", timeout=1200)
    svc = Service(cluster, "--listen", "0.0.0.0", "--api-key", KEY)
    try:
        svc.wait_for(r"^deepfleet: serving 'it' at http://0\.0\.0\.0:\d+/v1 \(3 of 3", 900)
        yield svc
    finally:
        if svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGINT)
            svc.end()


def test_a_key_is_needed_beyond_loopback_and_refused_before_anything_starts(cluster, service):
    result = cluster.run("serve", "--listen", "0.0.0.0", check=False, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "deepfleet: --listen 0.0.0.0: an endpoint other machines can reach needs --api-key "
        "KEY (or DEEPFLEET_API_KEY); without one it stays on 127.0.0.1"
    )
    with pytest.raises(openai.AuthenticationError):
        service.client("wrong").models.list()
    assert httpx.get(f"{service.base}/models").status_code == 401
    assert [m.id for m in service.client().models.list().data] == ["it"]
    for name in ("lab1/0", "lab2/0", "lab3/0"):
        assert re.search(rf"^deepfleet: {name} ready in \d+ s on cpu", service.output, re.M)


def test_greedy_answers_equal_single_process_generate_streamed_and_not(cluster, service):
    want = reference(cluster, PROMPTS, 12)
    client = service.client()
    for prompt, expected in zip(PROMPTS, want, strict=True):
        whole = client.completions.create(model="it", prompt=prompt, max_tokens=12)
        assert whole.choices[0].text == expected
        assert whole.usage.completion_tokens <= 12
        stream = client.completions.create(model="it", prompt=prompt, max_tokens=12, stream=True)
        assert "".join(c.choices[0].text for c in stream) == expected
    messages = [{"role": "user", "content": "Tell me about the sea"}]
    chat = client.chat.completions.create(model="it", messages=messages, max_tokens=10)
    text = chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.prompt_tokens > 0
    chunks = client.chat.completions.create(
        model="it", messages=messages, max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def _ask_all(service, count: int, tokens: int, expected: dict[str, str]) -> list[bool]:
    client = service.client()

    def ask(i: int) -> bool:
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            got = client.completions.create(model="it", prompt=prompt, max_tokens=tokens)
            return got.choices[0].text == expected[prompt]
        stream = client.completions.create(
            model="it", prompt=prompt, max_tokens=tokens, stream=True
        )
        return "".join(c.choices[0].text for c in stream) == expected[prompt]

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(ask, range(count)))


def test_thirty_concurrent_requests_are_all_answered(cluster, service):
    expected = dict(zip(PROMPTS, reference(cluster, PROMPTS, 16), strict=True))
    assert _ask_all(service, 30, 16, expected) == [True] * 30
    health = _health(service)
    served = {r["name"]: r["served"] for r in health["replicas"]}
    assert sum(served.values()) >= 30 and all(n > 0 for n in served.values()), served


def _health(service) -> dict:
    return httpx.get(service.base.removesuffix("/v1") + "/health").json()


def _replica(service, name: str) -> dict:
    return next(r for r in _health(service)["replicas"] if r["name"] == name)


def test_a_replica_killed_under_load_loses_no_request_and_comes_back(cluster, service):
    expected = dict(zip(PROMPTS, reference(cluster, PROMPTS, 64), strict=True))
    answers: list[bool] = []
    load = threading.Thread(target=lambda: answers.extend(_ask_all(service, 30, 64, expected)))
    load.start()
    deadline = time.monotonic() + 60
    while True:
        health = _health(service)
        busiest = max(health["replicas"], key=lambda r: r["outstanding"])
        if busiest["outstanding"] >= 3:  # requests in flight and queued on it
            break
        assert time.monotonic() < deadline, f"no replica had 3 requests: {health}"
        time.sleep(0.1)
    name = busiest["name"]
    index = [n.name for n in cluster.lab.nodes].index(busiest["machine"])
    code, out = cluster.node_exec(index, ["pkill", "-KILL", "-f", SERVE])
    assert code == 0, out
    load.join(timeout=900)
    assert answers == [True] * 30
    after = _replica(service, name)
    assert after["failed"] >= 1, (busiest, after, service.output())  # it died holding requests
    service.wait_for(rf"^deepfleet: {name} is down \(", 30)
    service.wait_for(rf"^deepfleet: {name} restarted in \d+ s", 600)
    got = service.client().completions.create(model="it", prompt=PROMPTS[0], max_tokens=64)
    assert got.choices[0].text == expected[PROMPTS[0]]


def test_status_shows_the_service_and_a_training_job_is_refused_while_it_serves(cluster, service):
    deadline = time.monotonic() + 20  # the record is rewritten every few seconds
    while True:
        svc = json.loads(cluster.run("status", "--json").stdout)["service"]
        restarted = [r for r in svc["replicas"] if r["restarts"]]  # the one killed above
        if restarted or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert [(r["restarts"], r["state"]) for r in restarted] == [(1, "ready")], svc
    assert svc["model"] == "it" and svc["url"].endswith(f":{service.port}/v1")
    names = [r["name"] for r in svc["replicas"]]
    assert names == ["lab1/0", "lab2/0", "lab3/0"]
    assert sum(r["served"] for r in svc["replicas"]) >= 60
    table = cluster.run("status").stdout
    assert re.search(r"^service 'it' at http://0\.0\.0\.0:\d+/v1 .*: 3 replicas, \d+ requests "
                     "answered$", table, re.M), table  # fmt: skip
    refused = cluster.run("train", "--run", "while-serving", "--steps", "1", check=False)
    assert refused.returncode == 1
    assert "[deepfleet serve] is running on this cluster" in refused.stderr


def test_serve_stop_from_another_terminal_ends_it_on_every_machine(cluster, service):
    result = cluster.run("serve", "--stop", timeout=120)
    assert "deepfleet: stopped the service at http://0.0.0.0:" in result.stdout
    assert service.end() == 0
    assert "service ended (stopped by `deepfleet serve --stop`)" in service.output
    assert running_ranks(cluster, SERVE) == []
    assert json.loads(cluster.run("status", "--json").stdout)["service"] is None


def test_ctrl_c_ends_a_loopback_service_and_leaves_nothing(cluster):
    svc = Service(cluster)
    try:
        svc.wait_for(r"^deepfleet: serving 'it' at http://127\.0\.0\.1:\d+/v1 \(3 of 3", 900)
        got = svc.client("any").completions.create(model="it", prompt="The sea", max_tokens=4)
        assert got.choices[0].finish_reason in ("stop", "length")
    finally:
        svc.proc.send_signal(signal.SIGINT)
        code = svc.end()
    assert code == 0, svc.output[-3000:]
    assert re.search(r"^deepfleet: service ended \(.*\); replicas stopped on lab1, lab2, lab3$",
                     svc.output, re.M), svc.output[-3000:]  # fmt: skip
    assert running_ranks(cluster, SERVE) == []
    assert "Traceback" not in svc.output
