"""The serving replicas as the gateway sees them: which to send a request to, and what
to do when one dies under it.

Each request goes to the ready replica that would finish it first: the fewest requests
outstanding per unit of measured speed (tokens/s, first from the replica's warm-up, then a
moving average of what it delivers as a whole: a request's tokens/s times the requests it
shared the replica with, by Little's law, so a busy replica is not also counted slow).
A replica whose connection breaks or that answers 5xx is taken out and handed to the
supervisor to restart; the request is retried on another replica, and a stream already
under way skips the text it has already sent, so the client sees one unbroken answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

READY, STARTING, DOWN = "ready", "starting", "down"
# How long a request waits for some replica to be ready (one restarting) before 503.
WAIT_FOR_REPLICA = 180.0
RETRIES = 3  # replicas a request may try before it gives up


class ReplicaError(Exception):
    """The replica refused the request itself (4xx): the client's to fix, not retried."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NoReplica(Exception):
    """No replica could answer: every one is down, or the retries ran out."""


@dataclass
class ReplicaState:
    name: str
    machine: str
    url: str
    speed: float = 1.0  # tokens/s
    state: str = STARTING
    outstanding: int = 0
    served: int = 0
    failed: int = 0
    restarts: int = 0
    since: float = field(default_factory=time.time)
    load_area: float = 0.0  # integral of outstanding over time (request-seconds)
    load_at: float = field(default_factory=time.monotonic)

    def cost(self) -> float:
        return (self.outstanding + 1) / max(self.speed, 1e-6)

    def load(self, change: int = 0) -> tuple[float, float]:
        """(load_area, now) after adding `change` to outstanding at this moment."""
        now = time.monotonic()
        self.load_area += self.outstanding * (now - self.load_at)
        self.load_at = now
        self.outstanding += change
        return self.load_area, now

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "machine": self.machine,
            "state": self.state,
            "outstanding": self.outstanding,
            "served": self.served,
            "failed": self.failed,
            "restarts": self.restarts,
            "tokens_per_s": round(self.speed, 2),
        }


@dataclass(frozen=True)
class Piece:
    """What a replica sends back: a text delta, or the request's end."""

    text: str = ""
    done: dict | None = None


class Pool:
    def __init__(
        self,
        replicas: list[ReplicaState],
        token: str,
        on_down: Callable[[ReplicaState, str], None] = lambda r, why: None,
        client: httpx.AsyncClient | None = None,
        wait_for_replica: float = WAIT_FOR_REPLICA,
    ):
        self.replicas = replicas
        self.token = token
        self.on_down = on_down
        self.wait_for_replica = wait_for_replica
        self._client = client
        self._changed = asyncio.Event()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # no read timeout: a long generation on a slow machine sends nothing for a while
            timeout = httpx.Timeout(10.0, read=None)
            # a replica (uvicorn) closes an idle connection after 5 s: never reuse one that old
            limits = httpx.Limits(
                max_connections=1000, max_keepalive_connections=100, keepalive_expiry=2.0
            )
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits)
        return self._client

    def ready(self) -> list[ReplicaState]:
        return [r for r in self.replicas if r.state == READY]

    def mark(self, replica: ReplicaState, state: str, why: str = "") -> None:
        if replica.state == state:
            return
        replica.state = state
        replica.since = time.time()
        self._changed.set()
        self._changed = asyncio.Event()
        if state == DOWN:
            self.on_down(replica, why)

    def pick(self, failed: dict[str, int] | None = None) -> ReplicaState | None:
        """The ready replica that would finish a new request first; `failed`: replicas
        this request already failed on (name: its restarts then), unless restarted since."""
        failed = failed or {}
        candidates = [
            r for r in self.ready() if r.name not in failed or r.restarts > failed[r.name]
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.cost(), r.served, r.name))

    async def _wait_pick(self, failed: dict[str, int]) -> ReplicaState:
        deadline = time.monotonic() + self.wait_for_replica
        while (replica := self.pick(failed)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoReplica("no replica is ready (every one is down or restarting)")
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                pass
        return replica

    async def generate(self, body: dict) -> AsyncIterator[Piece]:
        """The text of one request as it is generated, across replica deaths."""
        sent = 0  # characters already passed on: a retry skips them
        failed: dict[str, int] = {}
        last_cause = ""
        for _ in range(RETRIES):
            replica = await self._wait_pick(failed)
            started = replica.load(+1)
            produced = 0
            try:
                async for piece in self._stream(replica, body):
                    if piece.done is not None:
                        replica.served += 1
                        self._measure(replica, piece.done, started, replica.load())
                        yield piece
                        return
                    produced += len(piece.text)
                    if produced > sent:  # what an earlier replica sent is not sent twice
                        fresh = piece.text[len(piece.text) - (produced - sent) :]
                        sent = produced
                        yield Piece(fresh)
            except (httpx.HTTPError, ReplicaBroke, ValueError) as exc:
                replica.failed += 1
                failed[replica.name] = replica.restarts
                last_cause = f"{replica.name} {_cause(exc)}"
                self.mark(replica, DOWN, _cause(exc))
            finally:
                replica.load(-1)
        raise NoReplica(f"the request failed on {RETRIES} replicas (last: {last_cause})")

    async def _stream(self, replica: ReplicaState, body: dict) -> AsyncIterator[Piece]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.client.stream(
            "POST", f"{replica.url}/generate", json=body, headers=headers
        ) as response:
            if 400 <= response.status_code < 500:
                text = (await response.aread()).decode(errors="replace")
                raise ReplicaError(response.status_code, _error_text(text))
            if response.status_code != 200:
                raise ReplicaBroke(f"answered HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item.get("error"):  # generation itself failed (out of memory, ...)
                    raise ReplicaBroke(f"failed mid-answer: {item['error']}")
                if item.get("done"):
                    yield Piece(done=item)
                    return
                yield Piece(item.get("text", ""))
        raise ReplicaBroke("the replica's answer ended before the request did")

    @staticmethod
    def _measure(
        replica: ReplicaState, done: dict, start: tuple[float, float], end: tuple[float, float]
    ) -> None:
        """The replica's throughput from one request: its tokens/s times the mean number
        of requests the replica held meanwhile (itself included)."""
        tokens = int(done.get("completion_tokens") or 0)
        seconds = end[1] - start[1]
        if tokens >= 4 and seconds > 0:  # a short answer says little about speed
            sharing = max(1.0, (end[0] - start[0]) / seconds)
            replica.speed = 0.7 * replica.speed + 0.3 * tokens * sharing / seconds

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class ReplicaBroke(Exception):
    """The replica's process or connection went away mid-request."""


def _cause(exc: BaseException) -> str:
    if isinstance(exc, ReplicaBroke):
        return str(exc)
    if isinstance(exc, httpx.ConnectError):
        return "refused the connection (its process is gone)"
    if isinstance(exc, httpx.TimeoutException):
        return "did not answer in time"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "dropped the connection mid-answer (its process died?)"
    return type(exc).__name__


def _error_text(text: str) -> str:
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text.strip()[:300] or "refused"
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or text.strip()[:300])
