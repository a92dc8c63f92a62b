"""Network preflight: can the machines reach each other on the ports a job will use?

    python -m deepfleet_node.preflight listen [--port P ...] --seconds S
    python -m deepfleet_node.preflight probe --timeout T HOST:PORT ...

Before a launch nothing listens on the rendezvous port yet, and gloo/NCCL connect their full
mesh on ephemeral ports that exist only while a job runs, so a firewall shows up only as a
job hanging. `listen` opens those ports the same way (0 = an ephemeral port, on every
interface as gloo binds it) and answers each connection with a token; `probe`, run on the
other machines, connects to them. The orchestrator turns the results into one line.

Standard library only: this runs in the node image before anything else is trusted.
"""

from __future__ import annotations

import argparse
import errno
import json
import selectors
import socket
import sys
import threading
import time

TOKEN = b"deepfleet-preflight\n"
EXIT_BIND_FAILED = 3
# ICMP answers a REJECT rule can send instead of a port-unreachable
UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH}


def _emit(obj: dict) -> None:
    # the orchestrator reads the first line while this process keeps running
    print(json.dumps(obj), flush=True)


# ---------------------------------------------------------------- listen


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # the job's TCPStore binds with SO_REUSEADDR too: connections this listener closed
        # (TIME_WAIT) must not keep it from the rendezvous port, while a live listener does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_error(port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use"
    if exc.errno == errno.EACCES:
        return f"port {port}: permission denied"
    return f"cannot listen on port {port}: {exc.strerror or type(exc).__name__}"


def _answer(conn: socket.socket) -> None:
    """Send the token, then let the prober close first so the TIME_WAIT stays on its side."""
    with conn:
        try:
            conn.settimeout(2.0)
            conn.sendall(TOKEN)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(64):
                pass
        except OSError:
            pass  # a prober that gave up is its own report


def serve(socks: list[socket.socket], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(timeout=left):
                try:
                    conn, _ = key.fileobj.accept()
                except OSError:
                    continue
                threading.Thread(target=_answer, args=(conn,), daemon=True).start()


def listen(host: str, ports: list[int], seconds: float) -> int:
    socks: list[socket.socket] = []
    try:
        for port in ports:
            try:
                socks.append(bind(host, port))
            except OSError as exc:
                _emit({"error": bind_error(port, exc), "port": port})
                return EXIT_BIND_FAILED
        _emit({"ports": [s.getsockname()[1] for s in socks]})
        serve(socks, seconds)
        return 0
    finally:
        for sock in socks:
            sock.close()


# ---------------------------------------------------------------- probe


def split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {target!r}")
    return host.strip("[]"), int(port)


def _read_token(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < len(TOKEN):
        chunk = sock.recv(len(TOKEN) - len(data))
        if not chunk:
            break
        data += chunk
    return data


def classify(exc: OSError) -> str:
    # TimeoutError covers both a connect that got no SYN-ACK (a DROP rule) and a connection
    # whose listener never answered (its accept queue full)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, socket.gaierror):
        return "unresolvable"
    if exc.errno in UNREACHABLE:
        return "unreachable"
    return exc.strerror or type(exc).__name__


def probe_one(target: str, timeout: float) -> dict:
    host, port = split_target(target)
    start = time.monotonic()
    error: str | None = None
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            # one budget for connect and answer, so T bounds the whole probe
            sock.settimeout(max(0.05, timeout - (time.monotonic() - start)))
            answer = _read_token(sock)
        if answer != TOKEN:
            error = "closed" if not answer else "unexpected answer"
    except OSError as exc:
        error = classify(exc)
    seconds = round(time.monotonic() - start, 3)
    return {"target": target, "ok": error is None, "error": error, "seconds": seconds}


def probe(targets: list[str], timeout: float) -> list[dict]:
    """Every target at once, so a run of DROPped ports costs one timeout, not one each."""
    results: list[dict | None] = [None] * len(targets)

    def one(i: int) -> None:
        results[i] = probe_one(targets[i], timeout)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None]


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deepfleet_node.preflight", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    listen_p = sub.add_parser("listen", help="open ports and answer connections for a while")
    listen_p.add_argument("--port", type=int, action="append", help="0 = ephemeral; repeatable")
    listen_p.add_argument("--seconds", type=float, required=True, help="then exit by itself")
    listen_p.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    probe_p = sub.add_parser("probe", help="connect to listeners, one JSON line of results")
    probe_p.add_argument("--timeout", type=float, default=5.0, help="seconds per target")
    probe_p.add_argument("targets", nargs="+", metavar="HOST:PORT")
    args = p.parse_args(argv)
    if args.command == "probe":
        for target in args.targets:
            try:
                split_target(target)
            except ValueError as exc:
                p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "listen":
        return listen(args.host, args.port or [0], args.seconds)
    _emit({"results": probe(args.targets, args.timeout)})
    return 0  # failures are data: the orchestrator decides what they mean


if __name__ == "__main__":
    sys.exit(main())
