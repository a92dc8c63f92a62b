"""One long-running model replica for `deepfleet serve`, answering the gateway over HTTP.

    DEEPFLEET_SERVE_TOKEN=... python -m deepfleet_node.serve --model DIR --host ADDR --port P \\
        [--name lab1/0] [--dtype auto|fp32|bf16|fp16] [--gpus 0,1]

The operator starts one per device in each machine's node container and puts its
OpenAI-compatible gateway in front. The port answers only once the model is loaded and
warmed up, so a port that answers is a replica that is ready. Every request must carry
`Authorization: Bearer $DEEPFLEET_SERVE_TOKEN` (the secret comes from the environment,
never argv, which `ps` shows to every user of the machine).

  GET  /health    {"ready", "name", "model", "device", "dtype", "max_context",
                   "chat_template", "tokens_per_s"}
  POST /generate  {"prompt": str} or {"messages": [{"role", "content"}, ...]},
                  "max_tokens" (16), "temperature" (null or 0: greedy), "top_p",
                  "seed" (null: unseeded), "stop" ([]); answered as NDJSON while generating:
                  {"text": delta} lines, then {"done": true, "finish_reason":
                  "stop"|"length", "prompt_tokens", "completion_tokens"}, or a last
                  {"error": ...} line if generation itself failed

Errors are `{"error": "one line"}`: 400 (bad request), 401 (no or wrong token), 404, 405.
Plain transformers, no DeepSpeed: one request generates at a time, the others wait in
the order they came, and a request whose client went away stops at its next token.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import math
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from . import joblog
from ._log import exit_after_success, say
from .infer import cut_at_stop, encode_chat

TOKEN_ENV = "DEEPFLEET_SERVE_TOKEN"
NDJSON = "application/x-ndjson"
DEFAULT_MAX_TOKENS = 16
DEFAULT_CONTEXT = 2048
WARMUP_PROMPT = "Hello, my name is"
WARMUP_TOKENS = 16
# Of each GPU's free memory, what a model split over several may fill with weights; the
# rest is for the KV cache and activations while generating.
WEIGHT_SHARE = 0.9
# An in-flight stream is cut this long after SIGTERM, rather than holding the exit hostage.
GRACEFUL_S = 5
FIELDS = ("prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop")
# transformers' clean_up_tokenization rewrites these when a later token completes them
# (" ." becomes "."); a tokenizer that applies it can change text already decoded, so
# while one of them may still be forming its start is not streamed yet.
CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")


class RequestError(ValueError):
    """What the client got wrong: answered 400 with this message."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deepfleet_node.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--host", required=True, help="address to listen on")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--name", default=socket.gethostname(), help="replica name in /health")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument(
        "--gpus",
        type=parse_gpus,
        help="CUDA device indices: one, or several to split a model too big for one GPU",
    )
    return p.parse_args(argv)


def parse_gpus(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected indices like 0 or 0,1, got {text!r}") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"expected distinct indices >= 0, got {text!r}")
    return gpus


# ---------------------------------------------------------------- requests


@dataclass
class Job:
    """One validated /generate request, its prompt already tokenized."""

    inputs: Any  # the tokenizer's BatchEncoding (input_ids, attention_mask), on the CPU
    prompt_tokens: int
    max_tokens: int
    temperature: float | None
    top_p: float | None
    seed: int | None
    stops: list[str]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def read_body(body: bytes) -> dict[str, Any]:
    """The request's fields, checked for shape and range; defaults filled in."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown fields {unknown}; known: {list(FIELDS)}")
    if ("prompt" in obj) == ("messages" in obj):
        raise RequestError('give exactly one of "prompt" and "messages"')
    req = {
        "max_tokens": DEFAULT_MAX_TOKENS,
        "temperature": None,
        "top_p": None,
        "seed": None,
        "stop": [],
        **obj,
    }
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise RequestError('"prompt" must be a string')
    if "messages" in obj:
        check_messages(obj["messages"])
    if not is_int(req["max_tokens"]) or req["max_tokens"] < 1:
        raise RequestError(f'"max_tokens" must be an integer >= 1, got {req["max_tokens"]!r}')
    temperature = req["temperature"]
    if temperature is not None and not (is_number(temperature) and temperature >= 0):
        raise RequestError(f'"temperature" must be null or a number >= 0, got {temperature!r}')
    top_p = req["top_p"]
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise RequestError(f'"top_p" must be null or a number in (0, 1], got {top_p!r}')
    seed = req["seed"]
    # numpy, which set_seed also seeds, takes only 32-bit unsigned seeds.
    if seed is not None and not (is_int(seed) and 0 <= seed < 2**32):
        raise RequestError(f'"seed" must be null or an integer in [0, 2**32), got {seed!r}')
    stop = req["stop"]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError('"stop" must be a list of strings')
    # "" would match at once; infer drops it the same way.
    req["stop"] = [s for s in stop if s]
    return req


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or set(m) != {"role", "content"}
            or not all(isinstance(m[k], str) for k in ("role", "content"))
        ):
            raise RequestError(f'messages[{i}] must be {{"role": str, "content": str}}')


def encode(tokenizer, req: dict[str, Any]):
    """Tokenized exactly as infer does it, so greedy text equals infer's and the reference."""
    if "prompt" in req:
        return tokenizer(req["prompt"], return_tensors="pt")
    if not tokenizer.chat_template:
        raise RequestError('this model\'s tokenizer has no chat template; send "prompt"')
    try:
        return encode_chat(tokenizer, req["messages"])
    except Exception as exc:  # noqa: BLE001 - a template refusing these messages (its raise_exception)
        raise RequestError(f"the chat template refused these messages: {one_line(exc)}") from None


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ---------------------------------------------------------------- streaming text


def streamable(text: str, stops: list[str], holdbacks: tuple[str, ...]) -> tuple[int, bool]:
    """(how much of text may be sent now, whether a stop string has been reached).

    Text from the first stop string on is never sent; neither is a tail that could
    still grow into a stop string (or a holdback pattern), nor a trailing U+FFFD, which
    byte-level tokenizers write for a character whose bytes are not all generated yet.
    """
    cuts = [text.find(s) for s in stops if s in text]
    if cuts:
        return min(cuts), True
    end = len(text)
    for pattern in (*stops, *holdbacks):
        for k in range(min(len(pattern) - 1, len(text)), 0, -1):
            if text.endswith(pattern[:k]):
                end = min(end, len(text) - k)
                break
    while end and text[end - 1] == "\ufffd":
        end -= 1
    return end, False


class DeltaStreamer:
    """transformers' streamer interface (put/end): hands out text as tokens arrive.

    Each step decodes all new tokens again instead of one token at a time, because a
    token's text can depend on its neighbours (byte-level pieces of one character,
    clean-up rules), and the deltas must add up to exactly what decoding the whole
    completion gives.
    """

    def __init__(self, tokenizer, stops: list[str], holdbacks: tuple[str, ...], emit):
        self.tokenizer = tokenizer
        self.stops = stops
        self.holdbacks = holdbacks
        self.emit = emit
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.stopped = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end, self.stopped = streamable(text, self.stops, self.holdbacks)
        self.send(text[:end])

    def end(self) -> None:
        pass

    def send(self, upto: str) -> None:
        """Send what upto adds to the text already sent."""
        if len(upto) > len(self.sent) and upto.startswith(self.sent):
            self.emit(("text", upto[len(self.sent) :]))
            self.sent = upto

    def finish(self, text: str) -> bool:
        """Send the rest of the final text; False if it disagrees with what was sent."""
        self.send(text)
        return self.sent == text


@cache
def cancel_criterion_class():
    import torch
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        """Ends generation after the current token once the client has gone."""

        def __init__(self, flag: threading.Event):
            self.flag = flag

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full(
                (input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return Cancelled


# ---------------------------------------------------------------- the replica


class Replica:
    def __init__(self, args: argparse.Namespace):
        self.name = args.name
        self.model_name = os.path.basename(os.path.normpath(os.path.abspath(args.model)))
        self.model, self.input_device, self.gpus, self.dtype_name = load_model(args)
        from transformers import AutoTokenizer

        # Two copies: requests are tokenized on the event loop while the worker thread
        # decodes, and one Rust tokenizer used from two threads can fail ("Already
        # borrowed").
        self.request_tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.holdbacks = CLEANUP_PATTERNS if self.tokenizer.clean_up_tokenization_spaces else ()
        gen = self.model.generation_config
        if gen.pad_token_id is None:
            # Otherwise generate() warns on every request and picks EOS itself.
            pad = self.tokenizer.pad_token_id
            gen.pad_token_id = pad if pad is not None else first_id(gen.eos_token_id)
        eos = gen.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_context = int(getattr(text_config, "max_position_embeddings", 0) or 0)
        self.max_context = self.max_context or DEFAULT_CONTEXT
        self.tokens_per_s = 0.0
        # One thread: generations run one at a time, in the order they were submitted.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    @property
    def device_label(self) -> str:
        return f"cuda:{','.join(map(str, self.gpus))}" if self.gpus else "cpu"

    def health(self) -> dict[str, Any]:
        return {
            "ready": True,
            "name": self.name,
            "model": self.model_name,
            "device": self.device_label,
            "dtype": self.dtype_name,
            "max_context": self.max_context,
            "chat_template": bool(self.request_tokenizer.chat_template),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }

    def warm_up(self) -> None:
        """Pay for lazy set-up (kernels, allocator) before the port opens, and measure."""
        import torch

        inputs = self.tokenizer(WARMUP_PROMPT, return_tensors="pt").to(self.input_device)
        with torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=1, do_sample=False)
            began = time.perf_counter()
            out = self.model.generate(
                **inputs,
                max_new_tokens=WARMUP_TOKENS,
                min_new_tokens=WARMUP_TOKENS,
                do_sample=False,
            )
            if self.gpus:
                torch.cuda.synchronize(self.input_device)
        seconds = time.perf_counter() - began
        new = out.shape[1] - inputs["input_ids"].shape[1]
        self.tokens_per_s = new / seconds if seconds > 0 else 0.0

    def prepare(self, body: bytes) -> Job:
        req = read_body(body)
        inputs = encode(self.request_tokenizer, req)
        n = int(inputs["input_ids"].shape[1])
        if n == 0:
            raise RequestError("the prompt is empty once tokenized")
        if n + req["max_tokens"] > self.max_context:
            raise RequestError(
                f"prompt_tokens {n} + max_tokens {req['max_tokens']} = {n + req['max_tokens']}"
                f" exceeds the model's context of {self.max_context} tokens"
            )
        return Job(
            inputs=inputs,
            prompt_tokens=n,
            max_tokens=req["max_tokens"],
            temperature=req["temperature"],
            top_p=req["top_p"],
            seed=req["seed"],
            stops=req["stop"],
        )

    def generation_kwargs(self, job: Job, streamer, cancel: threading.Event) -> dict[str, Any]:
        from transformers import StoppingCriteriaList

        kwargs: dict[str, Any] = {
            "max_new_tokens": job.max_tokens,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([cancel_criterion_class()(cancel)]),
        }
        if job.temperature:  # null or 0: greedy
            kwargs.update(do_sample=True, temperature=job.temperature, top_p=job.top_p or 1.0)
        else:
            kwargs["do_sample"] = False
        if job.stops:
            # Ends generation early; the text is still cut at the stop string afterwards.
            kwargs.update(stop_strings=job.stops, tokenizer=self.tokenizer)
        return kwargs

    def run(self, job: Job, cancel: threading.Event, emit) -> None:
        """On the worker thread: generate, emitting ("text", delta) as it goes, then one of
        ("done", summary), ("error", message) or ("cancelled", None)."""
        if cancel.is_set():  # the client left while this waited its turn
            emit(("cancelled", None))
            return
        try:
            import torch
            from transformers import set_seed

            streamer = DeltaStreamer(self.tokenizer, job.stops, self.holdbacks, emit)
            inputs = {k: v.to(self.input_device) for k, v in job.inputs.items()}
            if job.seed is not None:
                set_seed(job.seed)
            with torch.inference_mode():
                out = self.model.generate(**inputs, **self.generation_kwargs(job, streamer, cancel))
            new = out[0, job.prompt_tokens :].tolist()
            if cancel.is_set():
                say(f"{self.name}: request cancelled after {len(new)} of {job.max_tokens} tokens")
                emit(("cancelled", None))
                return
            whole = self.tokenizer.decode(new, skip_special_tokens=True)
            text = cut_at_stop(whole, job.stops)
            if not streamer.finish(text):
                say(f"{self.name}: note: streamed text differs from the decoded completion")
            ended = bool(new) and new[-1] in self.eos_ids
            length = len(new) >= job.max_tokens and not ended and text == whole
            emit(
                (
                    "done",
                    {
                        "done": True,
                        "finish_reason": "length" if length else "stop",
                        "prompt_tokens": job.prompt_tokens,
                        "completion_tokens": len(new),
                    },
                )
            )
        except Exception as exc:  # noqa: BLE001 - the stream's last line says what failed
            import traceback

            traceback.print_exc()
            emit(("error", f"generation failed: {type(exc).__name__}: {one_line(exc)}"))

    async def stream(self, job: Job, receive):
        """The response body: NDJSON lines as the worker produces them."""
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
                loop.call_soon_threadsafe(queue.put_nowait, item)

        # Its own task, not this generator's finally alone: a body iterator abandoned
        # at a yield is never closed, and its generation would run on to max_tokens.
        watcher = loop.create_task(watch_disconnect(receive, cancel))
        loop.run_in_executor(self.worker, self.run, job, cancel, emit)
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "text":
                    yield line({"text": payload})
                elif kind == "done":
                    yield line(payload)
                    return
                elif kind == "error":
                    yield line({"error": payload})
                    return
                else:
                    return
        finally:
            cancel.set()
            watcher.cancel()


async def watch_disconnect(receive, cancel: threading.Event) -> None:
    # uvicorn answers http.disconnect once the client has gone or the response is
    # complete; either way nothing more of this generation will be read.
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel.set()


def line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def first_id(ids) -> int | None:
    return ids[0] if isinstance(ids, list) and ids else ids if isinstance(ids, int) else None


# ---------------------------------------------------------------- loading


def pick_gpus(requested: list[int] | None) -> list[int]:
    """[] for the CPU; ROCm builds of torch answer through torch.cuda too."""
    import torch

    if requested is None:
        return [0] if torch.cuda.is_available() else []
    if not torch.cuda.is_available():
        raise SystemExit(f"serve: --gpus {','.join(map(str, requested))}: torch sees no GPU")
    count = torch.cuda.device_count()
    missing = [g for g in requested if g >= count]
    if missing:
        raise SystemExit(f"serve: --gpus: no GPU {missing} here (torch sees {count})")
    return requested


def pick_dtype(requested: str, gpus: list[int]) -> str:
    if requested != "auto":
        return requested
    if not gpus:
        return "fp32"
    import torch

    with torch.cuda.device(gpus[0]):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def load_model(args: argparse.Namespace):
    """(model in eval mode, the device its inputs go to, GPU indices, dtype name)."""
    import torch
    from transformers import AutoModelForCausalLM

    gpus = pick_gpus(args.gpus)
    dtype_name = pick_dtype(args.dtype, gpus)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if len(gpus) == 1:
        # Straight onto the GPU, without a whole copy in host memory first.
        kwargs["device_map"] = {"": gpus[0]}
    elif gpus:
        # Only these GPUs: no CPU entry, so a model that does not fit fails to load
        # instead of silently running partly on the CPU. Free memory is read on these
        # GPUs alone (accelerate's get_max_memory would open a context on every GPU,
        # the other replicas' included).
        budget = {g: int(torch.cuda.mem_get_info(g)[0] * WEIGHT_SHARE) for g in gpus}
        kwargs.update(device_map="auto", max_memory=budget)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs).eval()
    device = model.get_input_embeddings().weight.device
    return model, device, gpus, dtype_name


# ---------------------------------------------------------------- HTTP


class RequireToken:
    """ASGI middleware: 401 for any request, on any path, without the shared secret."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            problem = self.problem(dict(scope["headers"]).get(b"authorization"))
            if problem:
                body = json.dumps({"error": problem}).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def problem(self, header: bytes | None) -> str | None:
        if not header:
            return "missing Authorization: Bearer <token>"
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            return "wrong token"
        return None


def build_app(replica: Replica, token: str):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequireToken, token=token)

    # Every error body is {"error": "one line"}, never FastAPI's {"detail": ...}.
    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        return JSONResponse({"error": one_line(exc)}, 400)

    @app.exception_handler(Exception)
    async def failed(request, exc):
        return JSONResponse({"error": f"{type(exc).__name__}: {one_line(exc)}"}, 500)

    async def health(request):
        return JSONResponse(replica.health())

    async def generate(request):
        try:
            job = replica.prepare(await request.body())
        except RequestError as exc:
            return JSONResponse({"error": one_line(exc)}, 400)
        return StreamingResponse(replica.stream(job, request.receive), media_type=NDJSON)

    # Plain request handlers (add_route), not FastAPI's parameter injection: the body is
    # read and checked here so that every shape error is one 400 line, and injection
    # would resolve the annotations this module leaves as strings.
    app.add_route("/health", health, methods=["GET"])
    app.add_route("/generate", generate, methods=["POST"])
    return app


def serve(app, host: str, port: int, on_ready) -> None:
    """uvicorn until SIGTERM or SIGINT; on_ready runs once the socket listens."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                on_ready()

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own version raises the signal again after shutting down, so the
            # process would die of SIGTERM; stopped on request, a replica exits 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_S,
    )
    Server(config).run()


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        print(f"serve: {TOKEN_ENV} is not set; refusing to serve without it", file=sys.stderr)
        sys.exit(2)
    joblog.start()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not Path(args.model).is_dir():
        raise SystemExit(f"serve: --model {args.model}: no such directory")
    replica = Replica(args)
    replica.warm_up()
    app = build_app(replica, token)

    def ready() -> None:
        say(
            f"replica {replica.name} ready: {replica.model_name} on {replica.device_label} "
            f"({replica.dtype_name}), {replica.tokens_per_s:.1f} tok/s, "
            f"listening on http://{url_host(args.host)}:{args.port}"
        )

    serve(app, args.host, args.port, ready)
    say(f"replica {replica.name} stopped")


if __name__ == "__main__":
    main()
    exit_after_success()
