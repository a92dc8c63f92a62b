"""deepfleet's command line. Every DeepfleetError becomes one line on stderr and exit 1.

The commands live in one module per group (cluster, jobs, serve, images, export); this
one assembles the parser in the order `deepfleet --help` lists them and turns every error
into one line at the edge."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from deepfleet.cli import cluster, export, images, jobs, serve
from deepfleet.cluster.session import ClusterErrors
from deepfleet.errors import DeepfleetError, Interrupted, JobError, raise_interrupted
from deepfleet.machines.connect import DEFAULT_STALL, STALL_ENV, first_line
from deepfleet.machines.links import DEFAULT_MAX_AGE, MAX_AGE_ENV

DESCRIPTION = (
    "deepfleet's command line. Every DeepfleetError becomes one line on stderr and exit 1."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepfleet", description=DESCRIPTION)
    p.add_argument("--state-dir", type=Path, default=None, help="default ./.deepfleet")
    p.add_argument("--timeout", type=float, default=15.0, help="SSH connect timeout (s)")
    p.add_argument(
        "--stall-timeout", type=float, default=None, metavar="S",
        help=f"fail a transfer that makes no progress this long (default {DEFAULT_STALL:.0f})",
    )  # fmt: skip
    p.add_argument(
        "--links-max-age", type=float, default=None, metavar="S",
        help="a job measures the links again first when they were measured longer ago "
        f"(default {DEFAULT_MAX_AGE:.0f}; 0: before every job)",
    )  # fmt: skip
    p.add_argument(
        "-v", "--verbose", action="store_true",
        help="show the libraries' chatter too (it always goes to the job logs)",
    )  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    cluster.add_up(sub)
    cluster.add_status(sub)
    cluster.add_links(sub)
    cluster.add_down(sub)
    jobs.add_train(sub)
    jobs.add_infer(sub)
    jobs.add_plan(sub)
    serve.add_serve(sub)
    jobs.add_stop(sub)
    cluster.add_doctor(sub)
    cluster.add_logs(sub)
    cluster.add_exec(sub)
    cluster.add_shell(sub)
    jobs.add_fetch_model(sub)
    cluster.add_init(sub)
    images.add_build_image(sub)
    images.add_push_image(sub)
    export.add_export(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.stall_timeout is not None:
        os.environ[STALL_ENV] = str(args.stall_timeout)
    if args.links_max_age is not None:
        os.environ[MAX_AGE_ENV] = str(args.links_max_age)
    # a closed terminal, `timeout` or a service stop must undo and stop as Ctrl-C does
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupted)
    try:
        return args.func(args)
    except JobError as exc:
        print(f"deepfleet: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code or 1
    except ClusterErrors as exc:
        for line in exc.lines():
            print(f"deepfleet: {line}", file=sys.stderr)
        return 1
    except DeepfleetError as exc:
        print(f"deepfleet: {exc.one_line()}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"deepfleet: stopped by {exc.name}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("deepfleet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: still one line, no traceback
        if os.environ.get("DEEPFLEET_DEBUG"):
            raise
        print(f"deepfleet: unexpected {type(exc).__name__}: {first_line(exc)} "
              "(DEEPFLEET_DEBUG=1 shows where)", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
