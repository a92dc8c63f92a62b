"""deepfleet serve: where replicas go, and the gateway in front of them.

The gateway is driven with the official openai client over real loopback sockets. The
replicas behind it are small FastAPI servers speaking the replica protocol
(deepfleet_node/serve.py) with made-up text, so that a death in the middle of an answer
can be staged exactly; the real replicas are tested in tests/node and on the lab.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from unitdata import detect_report

from deepfleet.errors import PlanError
from deepfleet.inventory.nodes import Inventory, NodeSpec
from deepfleet.planning import reports
from deepfleet.planning.plan import plan_cluster
from deepfleet.planning.serveplan import describe, plan_service
from deepfleet.serving.gateway import GatewaySettings, make_app
from deepfleet.serving.pool import DOWN, READY, Pool, ReplicaState
from deepfleet.serving.service import ServeError, check_listen, model_id, record_write_sh

GB = 10**9
LLAMA2_7B = 6_738_415_616  # LlamaConfig() on the meta device
TOKEN = "replica-secret"


# ---------------------------------------------------------------- the plan


def _cluster(*machines):
    """machines: ("gpu", [GB per GPU]) or ("cpu", RAM GB)."""
    names = [f"m{i}" for i in range(len(machines))]
    inv = Inventory(
        tuple(NodeSpec(n, f"10.0.0.{i + 1}", "root", 22, None, "/dev/null")
              for i, n in enumerate(names)),
        None,
    )  # fmt: skip
    reps = {}
    for name, (kind, size) in zip(names, machines, strict=True):
        if kind == "gpu":
            gpus = [{"index": i, "vendor": "nvidia", "name": "GPU", "memory_bytes": g * GB}
                    for i, g in enumerate(size)]  # fmt: skip
            report = detect_report(accelerator="cuda", gpu_vendor="nvidia", gpus=gpus)
        else:
            report = detect_report(memory_bytes=size * GB)
        reps[name] = reports.parse(json.dumps(report))
    return plan_cluster(inv, reps, mixed=True), reps


def test_a_7b_model_gets_a_replica_per_gpu_that_holds_it_and_one_per_cpu_machine():
    plan, reps = _cluster(("gpu", [80, 80]), ("cpu", 64))
    sp = plan_service(plan, reps, LLAMA2_7B * 2)  # bf16
    assert [(r.name, r.gpus, r.port) for r in sp.replicas] == [
        ("m0/0", (0,), 8760), ("m0/1", (1,), 8761), ("m1/0", (), 8760),
    ]  # fmt: skip
    assert sp.replicas[0].url == "http://10.0.0.1:8760"
    assert sp.replicas[1].argv("/m")[-2:] == ["--gpus", "1"]
    assert "model needs ~16.8 GB" in describe(sp)
    assert "model needs ~21 MB" in describe(plan_service(plan, reps, 17_000_000))


def test_a_model_too_big_for_one_gpu_spans_the_machines_gpus_and_a_small_machine_sits_out():
    plan, reps = _cluster(("gpu", [12, 12]), ("cpu", 8))
    sp = plan_service(plan, reps, LLAMA2_7B * 2)
    assert [(r.name, r.gpus) for r in sp.replicas] == [("m0/0", (0, 1))]
    assert [o.name for o in sp.left_out] == ["m1"]
    assert "m1 has RAM 8.0 GB, a replica needs 16.8 GB" in describe(sp)


def test_a_model_no_machine_holds_is_refused_naming_each_machine():
    plan, reps = _cluster(("gpu", [8]), ("cpu", 8))
    with pytest.raises(PlanError) as info:
        plan_service(plan, reps, LLAMA2_7B * 2)
    text = str(info.value)
    assert "m0 has 1 GPU(s), 8.0 GB" in text and "m1 has RAM 8.0 GB" in text
    assert "MODE=zero" in text


def test_listening_beyond_loopback_needs_a_key_and_the_model_id_is_the_folder_or_run():
    with pytest.raises(ServeError, match="needs --api-key"):
        check_listen("0.0.0.0", 8000, None)
    assert check_listen("0.0.0.0", 8000, "k").url == "http://0.0.0.0:8000/v1"
    assert check_listen("::1", 8000, None).url == "http://[::1]:8000/v1"
    assert model_id("", "demo") == "demo"
    assert model_id("/home/a/models/tiny-llama/", "demo") == "tiny-llama"
    assert model_id("TinyLlama/TinyLlama-1.1B", "demo") == "TinyLlama/TinyLlama-1.1B"


def test_a_stopped_service_does_not_write_its_record_back():
    script = record_write_sh({"id": "abc"}, "op (pid 1)", create=False)
    assert script.startswith('if grep -qF \'"id": "abc"\' /workspace/.deepfleet/service.json')
    assert script.endswith("else echo gone; fi")


# ---------------------------------------------------------------- stand-in replicas


def words(prompt: str, n: int) -> str:
    """What a stand-in replica answers: the same for the same request on any replica, as
    greedy decoding is."""
    seed = sum(map(ord, prompt)) % 97
    return "".join(f"w{(seed + i) % 97} " for i in range(n))


class StandIn:
    """A replica on a loopback port; `die_after`: pieces it sends before its process
    'dies' (the connection drops mid-answer)."""

    def __init__(self, delay: float = 0.0, slots: int = 1000):
        self.delay = delay
        self.slots = asyncio.Semaphore(slots)  # requests beyond it wait, as on a real replica
        self.die_after: int | None = None
        self.fail_after: int | None = None  # then an error line, as an out-of-memory sends
        self.requests = 0
        app = FastAPI()

        @app.get("/health")
        async def health(request: Request):
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return JSONResponse({"error": "token"}, status_code=401)
            return {"ready": True, "tokens_per_s": 1.0 / max(self.delay, 0.001)}

        @app.post("/generate")
        async def generate(request: Request):
            body = await request.json()
            self.requests += 1
            prompt = body.get("prompt") or json.dumps(body.get("messages"))
            if prompt == "too long":
                return JSONResponse({"error": "prompt is 5000 tokens, context 2048"}, 400)
            text = words(prompt, body["max_tokens"])
            pieces = text.split(" ")[:-1]
            die, fail = self.die_after, self.fail_after

            async def stream():
                async with self.slots:
                    async for line in pieces_of():
                        yield line

            async def pieces_of():
                for index, piece in enumerate(pieces):
                    if die is not None and index == die:
                        self.die_after = None
                        raise ConnectionResetError("replica process killed")
                    if fail is not None and index == fail:
                        self.fail_after = None
                        yield json.dumps({"error": "generation failed: OutOfMemoryError"}) + "\n"
                        return
                    await asyncio.sleep(self.delay)
                    yield json.dumps({"text": piece + " "}) + "\n"
                done = {"done": True, "finish_reason": "length", "prompt_tokens": 3,
                        "completion_tokens": len(pieces)}  # fmt: skip
                yield json.dumps(done) + "\n"

            return StreamingResponse(stream(), media_type="application/x-ndjson")

        self.server, self.port = _serve(app)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _serve(app) -> tuple[uvicorn.Server, int]:
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, sock.getsockname()[1]


class Gateway:
    """The real gateway app in front of stand-ins, on its own loop in a thread."""

    def __init__(self, replicas: list[StandIn], api_key: str | None = None):
        self.downs: list[str] = []
        self.states = [
            ReplicaState(f"m{i}/0", f"m{i}", r.url, speed=1.0 / max(r.delay, 0.001), state=READY)
            for i, r in enumerate(replicas)
        ]
        self.pool = Pool(self.states, TOKEN, on_down=lambda s, why: self.downs.append(s.name),
                         wait_for_replica=2.0)  # fmt: skip
        settings = GatewaySettings("tiny", api_key, max_tokens_limit=64)
        self.server, port = _serve(make_app(self.pool, settings))
        self.base = f"http://127.0.0.1:{port}/v1"

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def two():
    fast, slow = StandIn(delay=0.002), StandIn(delay=0.01)
    gateway = Gateway([fast, slow])
    yield gateway, fast, slow
    for server in (gateway.server, fast.server, slow.server):
        server.should_exit = True


# ---------------------------------------------------------------- the gateway


def test_completions_and_chat_streamed_and_not_carry_the_replicas_text(two):
    gateway, _, _ = two
    client = gateway.client()
    whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5)
    assert whole.choices[0].text == words("Once upon", 5)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 5
    streamed = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == words("Once upon", 5)
    messages = [{"role": "user", "content": "hello"}]
    want = words(json.dumps(messages), 7)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=7, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 7
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_thirty_concurrent_requests_are_all_answered_and_the_faster_replica_takes_more(two):
    gateway, fast, slow = two
    client = gateway.client()

    def ask(i: int) -> bool:
        got = client.completions.create(model="tiny", prompt=f"p{i}", max_tokens=8)
        return got.choices[0].text == words(f"p{i}", 8)

    with __import__("concurrent.futures").futures.ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(ask, range(30)))
    assert answers == [True] * 30
    assert fast.requests + slow.requests == 30 and fast.requests > slow.requests


def test_a_busy_replica_is_measured_by_what_it_delivers_not_by_each_answers_wait():
    serial = StandIn(delay=0.005, slots=1)  # 200 tokens/s, one request at a time
    gateway = Gateway([serial])
    client = gateway.client()
    with __import__("concurrent.futures").futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda i: client.completions.create(model="tiny", prompt=f"p{i}",
                                                          max_tokens=8), range(20)))  # fmt: skip
    # each answer waited behind up to nine others; the replica still made ~200 tokens/s
    assert 100 < gateway.states[0].speed < 260, gateway.states[0]
    for server in (gateway.server, serial.server):
        server.should_exit = True


def test_a_replica_dying_mid_stream_leaves_one_unbroken_answer(two):
    gateway, fast, slow = two
    fast.die_after = 3  # the fast one is picked first; it dies after three words
    stream = gateway.client().completions.create(model="tiny", prompt="story", max_tokens=10,
                                                 stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) == words("story", 10)
    assert gateway.downs == ["m0/0"] and slow.requests == 1
    assert gateway.states[0].state == DOWN and gateway.states[0].failed == 1


def test_a_generation_that_fails_mid_answer_is_finished_by_another_replica(two):
    gateway, fast, slow = two
    fast.fail_after = 2
    got = gateway.client().completions.create(model="tiny", prompt="oom", max_tokens=6)
    assert got.choices[0].text == words("oom", 6)
    assert gateway.downs == ["m0/0"] and slow.requests == 1


def test_when_every_replica_is_down_the_request_is_a_503_in_the_apis_shape(two):
    gateway, _, _ = two
    for state in gateway.states:
        state.state = DOWN
    with pytest.raises(openai.InternalServerError) as info:
        gateway.client().completions.create(model="tiny", prompt="x", max_tokens=2)
    assert info.value.status_code == 503
    assert "no replica is ready" in info.value.body["message"]


def test_bad_requests_get_the_apis_error_shape_and_a_4xx(two):
    gateway, _, _ = two
    client = gateway.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="x")
    assert "does not exist; this server serves 'tiny'" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 64"):
        client.completions.create(model="tiny", prompt="x", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="prompt is 5000 tokens, context 2048"):
        client.completions.create(model="tiny", prompt="too long", max_tokens=4)
    raw = httpx.post(f"{gateway.base}/completions", content=b"{not json",
                     headers={"content-type": "application/json"})  # fmt: skip
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in raw.json()["error"]["message"]
    assert httpx.get(f"{gateway.base}/nothing").status_code == 404


def test_an_api_key_is_required_when_set():
    replica = StandIn()
    gateway = Gateway([replica], api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            gateway.client("wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert info.value.status_code == 401
        assert httpx.post(f"{gateway.base}/completions", json={}).status_code == 401
        got = gateway.client("sesame").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert got.choices[0].text == words("x", 2)
        health = httpx.get(gateway.base.removesuffix("/v1") + "/health")
        assert health.status_code == 200 and health.json()["replicas"][0]["served"] == 1
    finally:
        gateway.server.should_exit = replica.server.should_exit = True


def test_a_replica_that_cannot_restart_is_retried_until_its_machine_is_back():
    import io

    from deepfleet.planning.serveplan import Replica, ServePlan
    from deepfleet.serving.service import Listen, Service

    replica = StandIn()

    class Processes:
        token, job = TOKEN, "t-serve"
        refusals = 4  # the machine is off for four tries

        def kill(self, r):
            if self.refusals:
                self.refusals -= 1
                raise ServeError("the connection to its Docker engine was lost", r.machine)

        def start(self, r):
            pass

        def alive(self, r):
            return True

    plan = ServePlan((Replica("m1/0", "m1", "127.0.0.1", replica.port),), (), "")
    out = io.StringIO()
    listen = Listen("127.0.0.1", 1, None)
    service = Service(None, plan, Processes(), GatewaySettings("tiny"), listen, out)
    service.retry_pause = service.retry_every = 0.01
    state = service.states[0]

    async def go():
        state.state = READY
        service.pool.mark(state, DOWN, "killed")  # as a broken answer or the health checks do
        await asyncio.gather(*service._tasks)
        await service.pool.close()

    try:
        asyncio.run(go())
    finally:
        replica.server.should_exit = True
    lines = out.getvalue().splitlines()
    assert lines[:4] == [
        "deepfleet: m1/0 is down (killed); its requests go to the others, restarting it",
        "deepfleet: m1/0 restart 1/3 failed: m1: the connection to its Docker engine was lost",
        "deepfleet: m1/0 restart 2/3 failed: m1: the connection to its Docker engine was lost",
        "deepfleet: m1/0 stays down (m1: the connection to its Docker engine was lost); trying "
        "again every 0 s",
    ]  # fmt: skip
    assert lines[4].startswith("deepfleet: m1/0 restarted in ") and len(lines) == 5
    assert state.state == READY and state.restarts == 1
