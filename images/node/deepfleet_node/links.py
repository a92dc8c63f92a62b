"""Link measurement: round-trip time and throughput each way between two machines.

    DEEPFLEET_LINK_SECRET=... python -m deepfleet_node.links serve --seconds S [--port P]
    DEEPFLEET_LINK_SECRET=... python -m deepfleet_node.links probe HOST:PORT [--seconds T]

`serve` listens (port 0: an ephemeral one, on every interface, as the ranks bind) and prints
{"port": P} as its first line; it answers only a connection whose first line carries the
measurement's secret (a random token the operator made for this measurement and passes in
the environment, never on the command line): anything else is refused and closed. `probe`
connects to a listener and measures, printing one JSON line:

- rtt_s: the median of a few one-byte ping-pongs;
- a_to_b_bps: bytes it sends for at most T seconds or N bytes, as the listener received them
  (first byte to last, timed there);
- b_to_a_bps: bytes the listener sends the same way, as received here.

Every socket has a timeout and both directions stop at T seconds or N bytes, whichever
comes first, so a probe ends in about 2 T plus its connects. Standard library only.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import socket
import statistics
import sys
import threading
import time

from deepfleet_node import preflight

SECRET_ENV = "DEEPFLEET_LINK_SECRET"
MAGIC = "deepfleet-link/1"
OK = b"ok\n"
REFUSED = b"refused\n"
WRONG_SECRET = "the listener refused this measurement's secret"
CHUNK = 1 << 16
HEADER_MAX = 256
DEFAULT_SECONDS = 0.5  # per direction
DEFAULT_BYTES = 128 * 2**20  # per direction
DEFAULT_PINGS = 5
DEFAULT_TIMEOUT = 3.0  # a connect, or a silence inside a measurement
MAX_CLIENTS = 4  # connections served at once: the operator measures one pair at a time
EXIT_NO_SECRET = 2
EXIT_BIND_FAILED = 3

_ZEROS = bytes(CHUNK)


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def secret_from_env() -> str | None:
    secret = os.environ.get(SECRET_ENV, "").strip()
    return secret or None


def header(secret: str, op: str, *args) -> bytes:
    return " ".join([MAGIC, secret, op, *map(str, args)]).encode() + b"\n"


def _read_line(sock: socket.socket, limit: int = HEADER_MAX) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        if len(data) >= limit:
            raise ValueError("line too long")
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def parse_header(line: bytes, secret: str) -> tuple[str, list[str]] | None:
    """(op, args) of a request carrying the secret; None for anything else."""
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        return None
    if len(words) < 3 or words[0] != MAGIC:
        return None
    if not hmac.compare_digest(words[1].encode(), secret.encode()):
        return None
    return words[2], words[3:]


# ---------------------------------------------------------------- both ends


def send_for(sock: socket.socket, max_bytes: int, seconds: float) -> int:
    """Send zeros until max_bytes or seconds; the bytes sent."""
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < max_bytes and time.monotonic() < deadline:
        sent += sock.send(_ZEROS[: min(CHUNK, max_bytes - sent)])
    return sent


def receive_for(sock: socket.socket, max_bytes: int, seconds: float) -> tuple[int, float]:
    """Read until EOF, max_bytes, or seconds (plus the sender's buffer draining, bounded):
    (bytes, seconds from the first byte to the last)."""
    got = 0  # after the first chunk: its bytes arrived before the clock started
    first = last = None
    hard_deadline = time.monotonic() + seconds * 2 + DEFAULT_TIMEOUT
    while got < max_bytes and time.monotonic() < hard_deadline:
        try:
            chunk = sock.recv(CHUNK)
        except TimeoutError:
            break
        if not chunk:
            break
        last = time.monotonic()
        if first is None:
            first = last
        else:
            got += len(chunk)
    if first is None or last is None or last <= first:
        return got, 0.0
    return got, last - first


def _rate(nbytes: int, seconds: float) -> float | None:
    return nbytes / seconds if seconds > 0 and nbytes > 0 else None


# ---------------------------------------------------------------- serve


def _handle(conn: socket.socket, secret: str, refused: list[int]) -> None:
    with conn:
        try:
            conn.settimeout(DEFAULT_TIMEOUT)
            try:
                request = parse_header(_read_line(conn), secret)
            except (OSError, ValueError):
                request = None
            if request is None:
                refused[0] += 1
                conn.sendall(REFUSED)
                return
            op, args = request
            conn.sendall(OK)
            if op == "ping":
                while True:
                    byte = conn.recv(1)
                    if not byte:
                        return
                    conn.sendall(byte)
            elif op == "sink":
                max_bytes, seconds = int(args[0]), float(args[1])
                got, took = receive_for(conn, max_bytes, seconds)
                conn.sendall(json.dumps({"bytes": got, "seconds": took}).encode() + b"\n")
            elif op == "source":
                max_bytes, seconds = int(args[0]), float(args[1])
                send_for(conn, max_bytes, seconds)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)  # let the prober close first
        except (OSError, ValueError, IndexError):
            pass  # a prober that gave up or spoke nonsense is its own report


def serve(sock: socket.socket, secret: str, seconds: float) -> int:
    """Answer connections until `seconds` pass; the number refused for a wrong secret."""
    deadline = time.monotonic() + seconds
    refused = [0]
    slots = threading.BoundedSemaphore(MAX_CLIENTS)
    threads: list[threading.Thread] = []
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(min(left, 1.0))
        try:
            conn, _ = sock.accept()
        except (TimeoutError, OSError):
            continue
        if not slots.acquire(blocking=False):
            conn.close()  # more at once than a measurement makes: not ours
            continue

        def run(conn=conn):
            try:
                _handle(conn, secret, refused)
            finally:
                slots.release()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
    end = time.monotonic() + DEFAULT_TIMEOUT + 1  # the last answers, bounded
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return refused[0]


# ---------------------------------------------------------------- probe


def split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {target!r}")
    return host.strip("[]"), int(port)


class Refused(Exception):
    """The listener did not accept the request (a wrong secret, or not deepfleet's)."""


def _open(host: str, port: int, secret: str, op: str, *args, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(header(secret, op, *args))
        answer = _read_line(sock)
        if answer != OK:
            raise Refused(WRONG_SECRET if answer == REFUSED else "unexpected answer")
    except BaseException:
        sock.close()
        raise
    return sock


def measure_rtt(host, port, secret, pings: int, timeout: float) -> float:
    with _open(host, port, secret, "ping", timeout=timeout) as sock:
        times = []
        for _ in range(pings):
            start = time.perf_counter()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise ConnectionResetError("the ping went unanswered")
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_send(host, port, secret, max_bytes: int, seconds: float, timeout: float):
    """Bytes/s from here to the listener, as it received them."""
    with _open(host, port, secret, "sink", max_bytes, seconds, timeout=timeout) as sock:
        send_for(sock, max_bytes, seconds)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(seconds * 2 + timeout)
        report = json.loads(_read_line(sock, 1024) or b"{}")
    return _rate(int(report.get("bytes", 0)), float(report.get("seconds", 0.0)))


def measure_receive(host, port, secret, max_bytes: int, seconds: float, timeout: float):
    """Bytes/s from the listener to here."""
    with _open(host, port, secret, "source", max_bytes, seconds, timeout=timeout) as sock:
        got, took = receive_for(sock, max_bytes, seconds)
    return _rate(got, took)


def classify(exc: BaseException) -> str:
    if isinstance(exc, Refused):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, socket.gaierror):
        return "unresolvable"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def probe(
    target: str,
    secret: str,
    seconds: float = DEFAULT_SECONDS,
    max_bytes: int = DEFAULT_BYTES,
    pings: int = DEFAULT_PINGS,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict:
    """One link measured from here to the listener at target; failures are data."""
    host, port = split_target(target)
    started = time.monotonic()
    result = {"target": target, "ok": False, "rtt_s": None, "a_to_b_bps": None,
              "b_to_a_bps": None, "error": None}  # fmt: skip
    try:
        result["rtt_s"] = measure_rtt(host, port, secret, pings, timeout)
        result["a_to_b_bps"] = measure_send(host, port, secret, max_bytes, seconds, timeout)
        result["b_to_a_bps"] = measure_receive(host, port, secret, max_bytes, seconds, timeout)
        result["ok"] = result["a_to_b_bps"] is not None and result["b_to_a_bps"] is not None
        if not result["ok"]:
            result["error"] = "no bytes arrived"
    except (OSError, ValueError, Refused) as exc:
        result["error"] = classify(exc)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deepfleet_node.links", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help=f"answer measurements carrying ${SECRET_ENV}")
    serve_p.add_argument("--port", type=int, default=0, help="0 = an ephemeral port")
    serve_p.add_argument("--seconds", type=float, required=True, help="then exit by itself")
    serve_p.add_argument("--host", default="0.0.0.0")
    probe_p = sub.add_parser("probe", help="measure the link to a listener, one JSON line")
    probe_p.add_argument("target", metavar="HOST:PORT")
    probe_p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="per direction")
    probe_p.add_argument("--bytes", type=int, default=DEFAULT_BYTES, help="per direction")
    probe_p.add_argument("--pings", type=int, default=DEFAULT_PINGS)
    probe_p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = p.parse_args(argv)
    if args.command == "probe":
        try:
            split_target(args.target)
        except ValueError as exc:
            p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    secret = secret_from_env()
    if secret is None:
        _emit({"error": f"no secret: set {SECRET_ENV}"})
        return EXIT_NO_SECRET
    if args.command == "serve":
        try:
            sock = preflight.bind(args.host, args.port)
        except OSError as exc:
            _emit({"error": f"cannot listen on port {args.port}: {exc.strerror or exc}"})
            return EXIT_BIND_FAILED
        with sock:
            _emit({"port": sock.getsockname()[1], "pid": os.getpid()})
            refused = serve(sock, secret, args.seconds)
        _emit({"refused": refused})
        return 0
    _emit(probe(args.target, secret, args.seconds, args.bytes, args.pings, args.timeout))
    return 0  # failures are data: the orchestrator decides what they mean


if __name__ == "__main__":
    sys.exit(main())
