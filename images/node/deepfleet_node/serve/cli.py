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
import os
import socket
import sys
from pathlib import Path

from .. import joblog
from .._log import say
from ..precision import PRECISIONS
from .app import build_app, serve
from .replica import Replica

TOKEN_ENV = "DEEPFLEET_SERVE_TOKEN"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deepfleet_node.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--host", required=True, help="address to listen on")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--name", default=socket.gethostname(), help="replica name in /health")
    p.add_argument("--dtype", choices=("auto", *PRECISIONS), default="auto")
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
