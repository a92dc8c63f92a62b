"""`deepfleet serve`: the OpenAI-compatible service over replicas on every machine."""

from __future__ import annotations

import os
import sys

from deepfleet.cli.common import (
    parse_slots,
)
from deepfleet.cluster.session import Session, open_session
from deepfleet.errors import Interrupted
from deepfleet.machines.state import StateStore
from deepfleet.planning import serveplan


def cmd_serve(args) -> int:
    from deepfleet.serving import service  # the HTTP stack, only for the command that uses it

    store = StateStore(args.state_dir)
    if args.dry_run:
        session = Session(store.load(), {})
        req = _serve_request(args)
        service.check_listen(req.host, req.port, req.api_key)
        print(serveplan.describe(service.plan_replicas(session, req, None)))
        print(f"gateway: {service.Listen(req.host, req.port, req.api_key).url} (the model's "
              "size is read at start; a machine it does not fit then sits out)")  # fmt: skip
        return 0
    req = _serve_request(args)
    if not args.stop:  # before connecting anywhere: a refused --listen costs nothing
        service.check_listen(req.host, req.port, req.api_key)
    session = open_session(store, args.timeout, heal=not args.stop, refresh=not args.stop)
    try:
        if args.stop:
            return service.stop_service(session, sys.stdout)
        try:
            service.serve(session, req)
        except (KeyboardInterrupt, Interrupted):
            pass  # Ctrl-C is how a service ends; serve() has stopped every replica
    finally:
        session.close()
    return 0


def _serve_request(args):
    from deepfleet.serving.service import ServeRequest

    return ServeRequest(
        model=args.model,
        run=args.run,
        host=args.listen,
        port=args.port,
        api_key=args.api_key or os.environ.get(serveplan.API_KEY_ENV) or None,
        max_tokens_limit=args.max_tokens_limit,
        slots=parse_slots(args.slots),
        verbose=args.verbose,
    )


def add_serve(sub) -> None:
    sv = sub.add_parser(
        "serve", help="an OpenAI-compatible endpoint in front of replicas on every machine"
    )
    sv.add_argument("--model", default="", help="default: the export of --run")
    sv.add_argument("--run", default="demo")
    sv.add_argument(
        "--listen", default="127.0.0.1", metavar="ADDR",
        help="the address to listen on (beyond loopback it needs --api-key)",
    )  # fmt: skip
    sv.add_argument("--port", type=int, default=serveplan.GATEWAY_PORT)
    sv.add_argument(
        "--api-key", default=None, metavar="KEY",
        help=f"requests must carry it (Bearer KEY); default ${serveplan.API_KEY_ENV}",
    )  # fmt: skip
    sv.add_argument(
        "--max-tokens-limit", type=int, default=serveplan.MAX_TOKENS_LIMIT, metavar="N",
        help="the most tokens one request may ask for",
    )  # fmt: skip
    sv.add_argument("--slots", action="append", default=[], metavar="NODE=N")
    sv.add_argument("--stop", action="store_true", help="stop the running service, from anywhere")
    sv.add_argument("--dry-run", action="store_true", help="print the replicas, start nothing")
    sv.set_defaults(func=cmd_serve)
