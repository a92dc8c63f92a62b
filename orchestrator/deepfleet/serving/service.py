"""`deepfleet serve`: start the replicas, keep them alive, and run the gateway until it is
stopped (Ctrl-C, SIGTERM, or `deepfleet serve --stop` from anywhere).

While it runs the service holds the cluster's job lease (a training job is refused, not
squeezed in beside the replicas) and keeps a record on the master that `deepfleet status`
reads: where it listens, its replicas and how many requests each has answered.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass

import httpx

from deepfleet.cluster.session import Session
from deepfleet.errors import DeepfleetError, ignoring_interrupts
from deepfleet.jobs import joblogs, launch, submit
from deepfleet.jobs.jobrun import check_no_live_job, clean_slate, job_plan, run_on
from deepfleet.jobs.watchdog import LEASE, LEASE_READ_SH, LivenessPolicy, lease_text
from deepfleet.machines.connect import docker_cause, first_line
from deepfleet.planning.serveplan import (
    API_KEY_ENV,
    GATEWAY_PORT,
    MAX_TOKENS_LIMIT,
    SERVICE_FILE,
    SERVICE_READ_SH,
    Replica,
    ServePlan,
    describe,
    plan_service,
)
from deepfleet.serving.gateway import GatewaySettings, make_app
from deepfleet.serving.pool import DOWN, READY, STARTING, Pool, ReplicaState

TOKEN_ENV = "DEEPFLEET_SERVE_TOKEN"  # the replicas' secret (deepfleet_node/serve/cli.py)
RENEW_EVERY = 5.0  # s between lease renewals (and service record writes)
HEALTH_EVERY = 2.0  # s between health checks of each replica
HEALTH_MISSES = 3  # missed checks in a row that take a replica out
START_TIMEOUT = 900.0  # s a replica may take to load its model
RESTART_TRIES = 3  # quick restarts of a replica before it is retried every RETRY_EVERY
RETRY_EVERY = 60.0


class ServeError(DeepfleetError):
    pass


@dataclass(frozen=True)
class Listen:
    host: str
    port: int
    api_key: str | None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, port: int, api_key: str | None) -> Listen:
    """Before anything starts: an endpoint beyond this machine needs a key."""
    if not is_loopback(host) and not api_key:
        raise ServeError(
            f"--listen {host}: an endpoint other machines can reach needs --api-key KEY "
            f"(or {API_KEY_ENV}); without one it stays on 127.0.0.1"
        )
    if not 0 < port < 65536:
        raise ServeError(f"--port {port}: not a TCP port")
    return Listen(host, port, api_key or None)


def bind(listen: Listen) -> socket.socket:
    """The gateway's socket, bound before any replica starts: a port in use is one line
    now, not a failure after minutes of loading."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot listen on {listen.host}:{listen.port}: {exc.strerror or exc}"
        ) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def model_id(model: str, run: str) -> str:
    """The name clients ask for: the run's, or the model folder's, or the hub name."""
    if not model:
        return run
    return model.rstrip("/").split("/")[-1] if model.startswith(("/", ".", "~")) else model


# ---------------------------------------------------------------- replica processes


class ReplicaProcesses:
    """The replicas' processes in the node containers (docker-py: blocking calls)."""

    def __init__(self, session: Session, model: str, token: str, job: str):
        self.session = session
        self.model = model
        self.token = token
        self.job = job

    def _index(self, replica: Replica) -> int:
        return int(replica.name.rsplit("/", 1)[1])

    def log(self, replica: Replica) -> str:
        return joblogs.log_file(self.job, self._index(replica))

    def start(self, replica: Replica) -> None:
        node = self.session.node_state(replica.machine)
        api = self.session.clients[replica.machine].api
        argv = " ".join(shlex.quote(a) for a in replica.argv(self.model))
        log = shlex.quote(self.log(replica))
        script = f"mkdir -p {shlex.quote(joblogs.job_dir(self.job))} && exec {argv} >>{log} 2>&1"
        try:
            exec_id = api.exec_create(
                node.container_id, ["sh", "-c", script],
                environment={TOKEN_ENV: self.token, "HF_HUB_OFFLINE": "1"},
            )["Id"]  # fmt: skip
            api.exec_start(exec_id, detach=True)
        except Exception as exc:  # noqa: BLE001 - the engine's refusal, as one line
            raise ServeError(docker_cause(exc, node.container_name), replica.machine) from exc

    def _pattern(self, replica: Replica) -> str:
        return f"[d]eepfleet_node[.]serve .*--name {replica.name}( |$)"

    def alive(self, replica: Replica) -> bool:
        out = run_on(
            self.session, replica.machine,
            ["sh", "-c", f"pgrep -f {shlex.quote(self._pattern(replica))} >/dev/null && echo y"],
        )  # fmt: skip
        return out.strip() == "y"

    def kill(self, replica: Replica) -> None:
        pattern = shlex.quote(self._pattern(replica))
        run_on(self.session, replica.machine, ["sh", "-c", f"pkill -KILL -f {pattern}; true"])

    def last_line(self, replica: Replica) -> str:
        out = run_on(self.session, replica.machine, ["sh", "-c", f"tail -n 20 {self.log(replica)}"])
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        for line in reversed(lines):  # the error, not the traceback's frames
            if "Error" in line or "error" in line:
                return line[:300]
        return lines[-1][:300] if lines else "(its log is empty)"

    def stop_all(self) -> list[str]:
        """Every replica on every machine; the machines that did not answer."""
        return launch.stop_all(self.session.clients, self.session.container_ids())


# ---------------------------------------------------------------- the service record


def record_write_sh(record: dict, holder: str, create: bool) -> str:
    """Renew the lease and rewrite the record, unless `serve --stop` removed the record
    (then print `gone`: the running service must end itself)."""
    data = base64.b64encode(json.dumps(record).encode()).decode()
    write = (f'echo "$(date +%s) {holder}" > {LEASE} && echo {data} | base64 -d > '
             f"{SERVICE_FILE}.tmp && mv {SERVICE_FILE}.tmp {SERVICE_FILE} && echo ok")  # fmt: skip
    if create:
        return f"mkdir -p $(dirname {SERVICE_FILE}) && {write}"
    return f"if {_is_mine_sh(record['id'])}; then {write}; else echo gone; fi"


def _is_mine_sh(service_id: str) -> str:
    """True (exit 0) while the record on the master is this service's own."""
    mine = shlex.quote(f'"id": "{service_id}"')
    return f"grep -qF {mine} {SERVICE_FILE} 2>/dev/null"


def parse_record(text: str) -> dict | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "id" in record else None


# ---------------------------------------------------------------- the running service


class Service:
    def __init__(
        self,
        session: Session,
        plan: ServePlan,
        processes: ReplicaProcesses,
        settings: GatewaySettings,
        listen: Listen,
        out,
        verbose: bool = False,
    ):
        self.session = session
        self.plan = plan
        self.processes = processes
        self.settings = settings
        self.listen = listen
        self.out = out
        self.verbose = verbose
        self.id = secrets.token_hex(8)
        self.holder = f"{lease_text()} [deepfleet serve]"
        self.started = time.time()
        self.by_name = {r.name: r for r in plan.replicas}
        self.states = [ReplicaState(r.name, r.machine, r.url) for r in plan.replicas]
        self.pool = Pool(self.states, processes.token, on_down=self._on_down)
        self.ended = ""  # why the service ended itself
        self._restarting: set[str] = set()
        self._misses: dict[str, int] = {}
        self._tasks: list[asyncio.Task] = []
        self._server = None
        self.retry_pause = 2.0
        self.retry_every = RETRY_EVERY

    def say(self, text: str) -> None:
        self.out.write(f"deepfleet: {text}\n")
        self.out.flush()

    def record(self) -> dict:
        return {
            "id": self.id, "url": self.listen.url, "model": self.settings.model_id,
            "held_by": self.holder, "started": self.started, "job": self.processes.job,
            "replicas": [r.to_dict() for r in self.states],
        }  # fmt: skip

    async def _master(self, script: str) -> str:
        return await asyncio.to_thread(run_on, self.session, self.session.master,
                                       ["sh", "-c", script])  # fmt: skip

    # ---- start

    async def start(self) -> None:
        await self._master(record_write_sh(self.record(), self.holder, create=True))
        await asyncio.to_thread(
            run_on, self.session, self.session.master, joblogs.mark_current_argv(self.processes.job)
        )
        starts = [self._start_one(state) for state in self.states]
        results = await asyncio.gather(*starts, return_exceptions=True)
        failures = [
            (s, r) for s, r in zip(self.states, results, strict=True) if isinstance(r, Exception)
        ]
        for state, exc in failures:
            why = exc.one_line() if isinstance(exc, DeepfleetError) else first_line(exc)
            self.say(f"{state.name} did not start: {why}")
            state.state = DOWN
        if len(failures) == len(self.states):
            raise ServeError("no replica started (each one's reason is above)")

    async def _start_one(self, state: ReplicaState) -> None:
        replica = self.by_name[state.name]
        began = time.monotonic()
        await asyncio.to_thread(self.processes.start, replica)
        health = await self._wait_ready(replica, START_TIMEOUT)
        state.speed = float(health.get("tokens_per_s") or 1.0)
        self.pool.mark(state, READY)
        where = health.get("device", "?")
        self.say(f"{state.name} ready in {time.monotonic() - began:.0f} s on {where} "
                 f"({state.speed:.1f} tokens/s)")  # fmt: skip

    async def _health(self, replica: Replica, timeout: float = 5.0) -> dict | None:
        headers = {"Authorization": f"Bearer {self.processes.token}"}
        try:
            response = await self.pool.client.get(
                f"{replica.url}/health", headers=headers, timeout=timeout
            )
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            return response.json()
        except ValueError:
            return None

    async def _wait_ready(self, replica: Replica, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        checks = 0
        while time.monotonic() < deadline:
            health = await self._health(replica, timeout=3.0)
            if health is not None:
                return health
            checks += 1
            if checks % 3 == 0 and not await asyncio.to_thread(self.processes.alive, replica):
                why = await asyncio.to_thread(self.processes.last_line, replica)
                raise ServeError(f"its process exited: {why}", replica.machine)
            await asyncio.sleep(1.0)
        raise ServeError(f"not ready after {timeout:.0f} s", replica.machine)

    # ---- keep alive

    def _on_down(self, state: ReplicaState, why: str) -> None:
        if self.ended or state.name in self._restarting:
            return
        self.say(f"{state.name} is down ({why}); its requests go to the others, restarting it")
        self._restarting.add(state.name)
        self._tasks.append(asyncio.get_running_loop().create_task(self._restart(state)))

    async def _restart(self, state: ReplicaState) -> None:
        """Bring a replica back: a few quick tries, then one every RETRY_EVERY seconds for
        as long as the service runs (a machine that was off rejoins when it is back)."""
        replica = self.by_name[state.name]
        attempt = 0
        try:
            while not self.ended:
                attempt += 1
                began = time.monotonic()
                self.pool.mark(state, STARTING)
                try:
                    await asyncio.to_thread(self.processes.kill, replica)
                    await asyncio.to_thread(self.processes.start, replica)
                    health = await self._wait_ready(replica, START_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - any failure is one line, then a retry
                    why = exc.one_line() if isinstance(exc, DeepfleetError) else first_line(exc)
                    self.pool.mark(state, DOWN)
                    if attempt < RESTART_TRIES:
                        self.say(f"{state.name} restart {attempt}/{RESTART_TRIES} failed: {why}")
                        await asyncio.sleep(self.retry_pause)
                    else:
                        if attempt == RESTART_TRIES:
                            self.say(f"{state.name} stays down ({why}); trying again every "
                                     f"{self.retry_every:.0f} s")  # fmt: skip
                        await asyncio.sleep(self.retry_every)
                    continue
                state.restarts += 1
                state.speed = float(health.get("tokens_per_s") or state.speed)
                self._misses[state.name] = 0
                self.pool.mark(state, READY)
                self.say(f"{state.name} restarted in {time.monotonic() - began:.0f} s")
                return
        finally:
            self._restarting.discard(state.name)

    async def _watch(self) -> None:
        """Health of every ready replica: a frozen or vanished one is taken out even when
        no request is running on it."""
        while not self.ended:
            await asyncio.sleep(HEALTH_EVERY)
            for state in list(self.states):
                if state.state != READY:
                    continue
                health = await self._health(self.by_name[state.name])
                misses = 0 if health else self._misses.get(state.name, 0) + 1
                self._misses[state.name] = misses
                if misses >= HEALTH_MISSES:
                    self.pool.mark(state, DOWN, f"missed {misses} health checks")

    async def _renew(self) -> None:
        while not self.ended:
            await asyncio.sleep(RENEW_EVERY)
            try:
                answer = await self._master(record_write_sh(self.record(), self.holder, False))
            except DeepfleetError:
                continue  # the master may be busy; the lease has slack for missed renewals
            if answer.strip() == "gone":
                self.end("stopped by `deepfleet serve --stop`")

    def end(self, why: str) -> None:
        if not self.ended:
            self.ended = why
            if self._server is not None:
                self._server.should_exit = True

    # ---- run

    async def run(self, sock: socket.socket) -> None:
        import uvicorn

        app = make_app(self.pool, self.settings)
        config = uvicorn.Config(
            app, log_level="info" if self.verbose else "warning", access_log=self.verbose,
            timeout_graceful_shutdown=5, lifespan="off",
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        try:
            await self.start()
            self._tasks += [asyncio.create_task(self._watch()), asyncio.create_task(self._renew())]
            ready = len(self.pool.ready())
            key = "; requests need the API key" if self.listen.api_key else ""
            self.say(f"serving {self.settings.model_id!r} at {self.listen.url} ({ready} of "
                     f"{len(self.states)} replicas ready{key}); Ctrl-C or `deepfleet serve "
                     "--stop` ends it")  # fmt: skip
            await self._server.serve(sockets=[sock])
        finally:
            self.ended = self.ended or "stopped"
            for task in self._tasks:
                task.cancel()
            await self.pool.close()

    def shutdown(self) -> list[str]:
        """Every replica stopped, the lease and the record given back (blocking)."""
        missed = self.processes.stop_all()
        try:
            run_on(self.session, self.session.master, ["sh", "-c",
                   f"{_is_mine_sh(self.id)} && rm -f {SERVICE_FILE}; rm -f {LEASE}"])  # fmt: skip
        except DeepfleetError:
            pass  # the master is gone: its lease lapses by itself
        return missed


def stop_service(session: Session, out) -> int:
    """`deepfleet serve --stop`: ask the running service to end, then make sure."""
    master = session.master
    record = parse_record(run_on(session, master, ["sh", "-c", SERVICE_READ_SH]))
    if not record:  # nothing of a service to stop: a training job here is left alone
        out.write("deepfleet: no service is running on this cluster\n")
        return 0
    run_on(session, master, ["rm", "-f", SERVICE_FILE])
    deadline = time.monotonic() + 3 * RENEW_EVERY
    while time.monotonic() < deadline:  # the service notices and stops its replicas
        lease = run_on(session, master, ["sh", "-c", LEASE_READ_SH])
        if record.get("held_by", "") not in lease:
            break
        time.sleep(1.0)
    counted = launch.stop_counted(session.clients, session.container_ids())
    run_on(session, master, ["rm", "-f", LEASE])
    out.write(f"deepfleet: stopped the service at {record.get('url')} "
              f"({len(record.get('replicas', []))} replicas)\n")  # fmt: skip
    silent = [name for name, count in counted.items() if count is None]
    if silent:
        raise ServeError(f"could not reach {', '.join(silent)} to stop its replicas")
    return 0


# ---------------------------------------------------------------- the command


@dataclass(frozen=True)
class ServeRequest:
    model: str = ""  # "" = the export of `run`; else a local dir or hub name
    run: str = "demo"
    host: str = "127.0.0.1"
    port: int = GATEWAY_PORT
    api_key: str | None = None
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    slots: dict[str, int] | None = None
    verbose: bool = False


def served_model(session: Session, req: ServeRequest, out) -> str:
    """The model as the replicas will load it: pushed, cached or the run's export."""
    if not req.model:
        model = f"{submit.run_dir(req.run)}/final"
        submit.replicate_from_master(session, model, out)
        return model
    return submit.resolve_model(session, req.model, out, submit.secrets_from(os.environ))


def plan_replicas(session: Session, req: ServeRequest, model_bytes: int | None) -> ServePlan:
    plan = job_plan(session, req.slots, None, mixed=True)
    return plan_service(plan, session.state.reports(), model_bytes)


def serve(session: Session, req: ServeRequest, out=sys.stdout) -> str:
    """Run the service until it is stopped; why it stopped."""
    listen = check_listen(req.host, req.port, req.api_key)
    sock = bind(listen)
    try:
        check_no_live_job(session, LivenessPolicy())
        clean_slate(session, session.container_ids(), out)
        model = served_model(session, req, out)
        sp = plan_replicas(session, req, submit.model_bytes(session, model))
        out.write(describe(sp) + "\n")
        job = joblogs.job_name(req.run, "serve")
        processes = ReplicaProcesses(session, model, secrets.token_urlsafe(24), job)
        settings = GatewaySettings(model_id(req.model, req.run), listen.api_key,
                                   req.max_tokens_limit)  # fmt: skip
        service = Service(session, sp, processes, settings, listen, out, req.verbose)
        try:
            asyncio.run(service.run(sock))
        finally:
            with ignoring_interrupts():  # a second Ctrl-C must not leave replicas behind
                missed = service.shutdown()
            where = ", ".join(sorted({r.machine for r in sp.replicas}))
            out.write(f"deepfleet: service ended ({service.ended or 'interrupted'}); replicas "
                      f"stopped on {where}\n")  # fmt: skip
            if missed:
                out.write(f"deepfleet: could not reach {', '.join(missed)} to stop its replica\n")
        return service.ended
    finally:
        sock.close()
