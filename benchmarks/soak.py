"""Soak: a real `kiln serve` and `kiln gateway` under mixed load, with faults, for minutes.

It starts `kiln serve` (the tiny model unless told otherwise) and `kiln gateway` in front of
it, then for `--seconds` drives `--clients` gRPC clients and `--http-clients` gateway
clients (alternately the official `replicate` client and plain HTTP) in closed loops. A
share of requests is cancelled part-way (`--cancel-fraction`, 20%) and a share gets a
short deadline (`--deadline-fraction`). Part-way through it kill -9s the engine-core
process once (`kiln serve` then exits 1 by design; the soak restarts it on the same port,
as a supervisor would) and later restarts the gateway once (SIGTERM, then start again
with the same database).

At the end every request must have ended: a gRPC stream either completed or ended with a
status, and every prediction the gateway accepted with 201 must still be readable and
terminal. Anything else is LOST, and the exit status is 1 when any request is lost. The
report gives requests sent, completed, cancelled and failed (by status), the requests in
flight at the kill and how they ended, the resident memory of every process at start, peak
and end, and p50/p95 latency.

    .venv/bin/python benchmarks/soak.py                      # ~3 minutes, 8 + 2 clients
    .venv/bin/python benchmarks/soak.py --seconds 600 --clients 24 --write-results
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from load import percentile
from results_file import cpu_name, publish, write_section

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_server.local import LocalServer, start_local_server
from kiln_server.models.tiny_sdxl import TINY_SDXL_NAME

SECTION = "## Soak: cancellations, deadlines, an engine-core kill and a gateway restart"
HEADING = f"{SECTION} (benchmarks/soak.py)"
TOKEN = "kiln-soak-token"
MODEL = "soak"  # the served model's name; the gateway reaches it as kiln/soak
TERMINAL = {"succeeded", "failed", "canceled"}
GATEWAY_CLIENTS = frozenset({"replicate", "http"})
EVERY_CLIENT = GATEWAY_CLIENTS | {"grpc"}
LONG_DEADLINE = 120.0  # a normal request that reaches it was hung by the server: lost
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    # Reconnect quickly once the restarted server listens again.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
PROMPTS = [
    "a red circle on a blue background",
    "a product photo of a teapot on marble",
    "a green square on a white background",
    "a white mug on a wooden table",
]


# --- what happened to each request ---------------------------------------------------------


@dataclass
class Outcome:
    """How one request ended.

    `kind` is completed, cancelled (by the client), deadline (a short deadline the client
    set ran out), failed (a status, or an HTTP refusal; `status` says which) or lost (no
    end at all; `status` says what was seen instead).
    """

    client: str  # grpc, replicate or http
    kind: str
    status: str = ""
    seconds: float = 0.0
    in_flight_at: tuple[str, ...] = ()  # faults that happened while it was in flight


@dataclass
class Ledger:
    """Every request's outcome, and which requests are in flight right now."""

    outcomes: list[Outcome] = field(default_factory=list)
    # key -> (client, faults met so far)
    in_flight: dict[int, tuple[str, set[str]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: Iterator[int] = field(default_factory=itertools.count)
    # Faults under way now and the clients they reach: a request those clients send
    # meanwhile is marked "sent while <fault>".
    ongoing: dict[str, frozenset[str]] = field(default_factory=dict)

    def begin(self, client: str) -> int:
        with self.lock:
            key = next(self.counter)
            faults = {f"sent while {f}" for f, reach in self.ongoing.items() if client in reach}
            self.in_flight[key] = (client, faults)
            return key

    def end(self, key: int, outcome: Outcome) -> None:
        with self.lock:
            _, faults = self.in_flight.pop(key, ("", set()))
            outcome.in_flight_at = tuple(sorted(faults))
            self.outcomes.append(outcome)

    def mark_fault(self, fault: str, reach: frozenset[str]) -> int:
        """Note `fault` against every request of the `reach` clients in flight; return
        how many there are."""
        with self.lock:
            hit = [faults for client, faults in self.in_flight.values() if client in reach]
            for faults in hit:
                faults.add(fault)
            return len(hit)


# --- the processes -------------------------------------------------------------------------


def gateway_supports_database() -> bool:
    """Whether this `kiln gateway` has --database (a durable prediction store)."""
    done = subprocess.run(
        [sys.executable, "-m", "kiln_client.cli", "gateway", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "--database" in done.stdout


@dataclass
class GatewayProcess:
    """A `kiln gateway` subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_gateway(
    workdir: Path, upstream: str, port: int, database: str | None, timeout: float = 120
) -> GatewayProcess:
    """Start `kiln gateway` and wait until it answers an authenticated request."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    log_path = workdir / "gateway.log"
    command = [
        sys.executable,
        "-m",
        "kiln_client.cli",
        "gateway",
        *("--upstream", upstream, "--port", str(port), "--port-file", str(port_file)),
        *("--files-dir", str(workdir.parent / "gateway-files"), "--log-format", "json"),
    ]
    if database is not None:
        command += ["--database", database]
    env = {**os.environ, "KILN_API_TOKENS": TOKEN, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"gateway did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.05)
    gateway = GatewayProcess(process, int(port_file.read_text()), log_path)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while True:
        with suppress(httpx.HTTPError):
            if httpx.get(f"{gateway.url}/v1/models", headers=headers, timeout=5).is_success:
                return gateway
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"gateway never answered:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.1)


def write_config(workdir: Path, args: argparse.Namespace) -> Path:
    """A config serving one model, called MODEL."""
    config = workdir / "kiln.toml"
    config.write_text(
        f'[server]\ndefault_model = "{MODEL}"\n\n'
        f'[[models]]\nname = "{MODEL}"\nbuiltin = "{args.model}"\n'
        f"max_batch_rows = {args.max_batch_rows}\n"
    )
    return config


def core_pid(server: LocalServer) -> int:
    """Pid of the engine-core process of `server`."""
    for child in psutil.Process(server.process.pid).children(recursive=True):
        with suppress(psutil.Error):
            if "kiln_server.core.process" in " ".join(child.cmdline()):
                return child.pid
    raise RuntimeError("no engine-core process found under kiln serve")


class Processes:
    """The server and gateway under test: started, restarted and sampled for memory."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.config = write_config(workdir, args)
        self.database = (
            f"sqlite:///{workdir / 'gateway.db'}" if gateway_supports_database() else None
        )
        self.server_starts = 0
        self.gateway_starts = 0
        self.server: LocalServer | None = None
        self.gateway: GatewayProcess | None = None
        self.server_port = 0
        self.gateway_port = 0
        self.server_exit_codes: list[int] = []
        # role -> [first sample, peak, last sample] in bytes
        self.memory: dict[str, list[int]] = {}
        self.events: list[tuple[float, str]] = []
        self.began = time.monotonic()

    def note(self, text: str) -> None:
        at = time.monotonic() - self.began
        self.events.append((at, text))
        print(f"[{at:7.1f}s] {text}", file=sys.stderr, flush=True)

    def start_server(self) -> LocalServer:
        self.server_starts += 1
        flags = ["--config", str(self.config), "--intra-op-threads", str(self.args.threads)]
        flags += ["--max-queue", str(self.args.max_queue), "--backend", "torch"]
        if self.server_port:
            flags += ["--port", str(self.server_port)]  # the same address for every client
        self.server = start_local_server(
            self.workdir / f"server-{self.server_starts}", *flags, timeout=600
        )
        self.server_port = self.server.port
        return self.server

    def start_gateway(self) -> GatewayProcess:
        self.gateway_starts += 1
        assert self.server is not None
        self.gateway = start_gateway(
            self.workdir / f"gateway-{self.gateway_starts}",
            f"127.0.0.1:{self.server_port}",
            self.gateway_port,
            self.database,
        )
        self.gateway_port = self.gateway.port
        return self.gateway

    def roles(self) -> dict[str, psutil.Process]:
        """Every process of the soak by role."""
        found: dict[str, psutil.Process] = {"soak driver (clients)": psutil.Process()}
        if self.server is not None and self.server.process.poll() is None:
            with suppress(psutil.Error):
                api = psutil.Process(self.server.process.pid)
                found["kiln serve: API process"] = api
                for child in api.children(recursive=True):
                    command = " ".join(child.cmdline())
                    if "kiln_server.core.process" in command:
                        found["kiln serve: engine core"] = child
                    elif "resource_tracker" in command:
                        found["kiln serve: shared-memory tracker"] = child
                    else:
                        found[f"kiln serve: {child.name()}"] = child
        if self.gateway is not None and self.gateway.process.poll() is None:
            with suppress(psutil.Error):
                found["kiln gateway"] = psutil.Process(self.gateway.process.pid)
        return found

    def sample_memory(self) -> None:
        for role, process in self.roles().items():
            with suppress(psutil.Error):
                rss = process.memory_info().rss
                first, peak, _ = self.memory.get(role, [rss, rss, rss])
                self.memory[role] = [first, max(peak, rss), rss]

    def stop(self) -> None:
        if self.gateway is not None and self.gateway.process.poll() is None:
            self.gateway.process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.gateway.process.wait(timeout=30)
            if self.gateway.process.poll() is None:
                self.gateway.process.kill()
        if self.server is not None and self.server.process.poll() is None:
            with suppress(subprocess.TimeoutExpired):
                self.server.terminate(timeout=120)
            if self.server.process.poll() is None:
                self.server.process.kill()


# --- gRPC clients --------------------------------------------------------------------------


def plan_request(rng: random.Random, args: argparse.Namespace) -> tuple[Any, str, float, int]:
    """(request, plan, timeout, cancel after this many events) for one gRPC request."""
    size = rng.choice([64, 64, 96, 128])
    message = pb.GenerateRequest(
        model=MODEL,
        prompt=rng.choice(PROMPTS),
        width=size,
        height=size,
        num_inference_steps=rng.randint(args.min_steps, args.max_steps),
        num_outputs=rng.choice([1, 1, 2]),
        seed=rng.randrange(2**32),
    )
    draw = rng.random()
    if draw < args.cancel_fraction:
        return message, "cancel", LONG_DEADLINE, rng.randint(1, 8)
    if draw < args.cancel_fraction + args.deadline_fraction:
        return message, "deadline", rng.uniform(0.2, 2.0), 0
    return message, "normal", LONG_DEADLINE, 0


async def grpc_request(
    stub: pb_grpc.GenerationServiceStub, rng: random.Random, args: argparse.Namespace
) -> Outcome:
    """Send one request as planned and classify how it ended."""
    message, plan, timeout, cancel_after = plan_request(rng, args)
    started = time.perf_counter()
    call = stub.Generate(message, timeout=timeout)
    events = 0
    images = 0
    try:
        async for event in call:
            events += 1
            kind = event.WhichOneof("event")
            if kind == "image":
                images += 1
            elif kind == "completed":
                if images != event.completed.num_images or images != message.num_outputs:
                    return Outcome("grpc", "lost", f"completed with {images} images")
                return Outcome("grpc", "completed", seconds=time.perf_counter() - started)
            if cancel_after and events >= cancel_after:
                call.cancel()
                return Outcome("grpc", "cancelled", seconds=time.perf_counter() - started)
    except grpc.aio.AioRpcError as error:
        code = error.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if plan == "deadline":
                return Outcome("grpc", "deadline", "DEADLINE_EXCEEDED")
            return Outcome("grpc", "lost", f"no answer within {LONG_DEADLINE:g} s")
        return Outcome("grpc", "failed", code.name)
    return Outcome("grpc", "lost", f"stream ended OK after {events} events without completed")


async def grpc_worker(
    address: str, ledger: Ledger, stop_at: float, seed: int, args: argparse.Namespace
) -> None:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        while time.monotonic() < stop_at:
            key = ledger.begin("grpc")
            try:
                outcome = await grpc_request(stub, rng, args)
            except Exception as error:  # a client-side surprise is a finding, not a crash
                outcome = Outcome("grpc", "lost", f"client error {type(error).__name__}")
            ledger.end(key, outcome)
            if outcome.status in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
                await asyncio.sleep(0.5)  # as a client with backoff would


# --- gateway clients -----------------------------------------------------------------------


@dataclass
class Accepted:
    """A prediction the gateway accepted with 201."""

    id: str
    created: float
    client: str
    cancel: bool
    in_flight_at: set[str] = field(default_factory=set)
    done: bool = False  # its client saw it end


class GatewayClients:
    """Closed-loop gateway clients in threads: the official replicate client and plain
    HTTP, alternately. Every accepted prediction is remembered for the final check."""

    def __init__(self, processes: Processes, ledger: Ledger, args: argparse.Namespace) -> None:
        self.processes = processes
        self.ledger = ledger
        self.args = args
        self.accepted: list[Accepted] = []
        self.lock = threading.Lock()
        self.headers = {"Authorization": f"Bearer {TOKEN}"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.processes.gateway_port}"

    def input(self, rng: random.Random) -> dict[str, Any]:
        return {
            "prompt": rng.choice(PROMPTS),
            "width": 64,
            "height": 64,
            "num_inference_steps": rng.randint(self.args.min_steps, self.args.max_steps),
            "seed": rng.randrange(2**32),
        }

    def create(
        self, client: str, rng: random.Random, session: Any, wait: bool
    ) -> tuple[str | None, str]:
        """Create one prediction (`wait`: plain HTTP asks to wait a few seconds for it):
        (id, "") when accepted, else (None, why not)."""
        body = {"input": self.input(rng)}
        if client == "replicate":
            try:
                prediction = session.models.predictions.create(
                    model=f"kiln/{MODEL}", input=body["input"]
                )
                return prediction.id, ""
            except Exception as error:
                status = getattr(error, "status", None)
                if not status:
                    return None, type(error).__name__
                return None, refusal(status, getattr(error, "detail", None))
        try:
            response = httpx.post(
                f"{self.url}/v1/models/kiln/{MODEL}/predictions",
                json=body,
                headers={**self.headers, "Prefer": "wait=5"} if wait else self.headers,
                timeout=30,
            )
        except httpx.HTTPError as error:
            return None, type(error).__name__
        if response.status_code != 201:
            detail = None
            with suppress(ValueError, AttributeError):
                detail = response.json().get("detail")
            return None, refusal(response.status_code, detail)
        return str(response.json()["id"]), ""

    def read(self, prediction_id: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of GET /v1/predictions/{id}; (0, {}) when unreachable."""
        try:
            response = httpx.get(
                f"{self.url}/v1/predictions/{prediction_id}", headers=self.headers, timeout=10
            )
        except httpx.HTTPError:
            return 0, {}
        return response.status_code, response.json() if response.is_success else {}

    def cancel(self, prediction_id: str) -> None:
        with suppress(httpx.HTTPError):
            httpx.post(
                f"{self.url}/v1/predictions/{prediction_id}/cancel",
                headers=self.headers,
                timeout=10,
            )

    def worker(self, client: str, stop_at: float, seed: int) -> None:
        import replicate

        rng = random.Random(seed)
        session = replicate.Client(api_token=TOKEN, base_url=self.url, timeout=httpx.Timeout(30.0))
        while time.monotonic() < stop_at:
            key = self.ledger.begin(client)
            started = time.perf_counter()
            cancel = rng.random() < self.args.cancel_fraction
            prediction_id, refusal = self.create(client, rng, session, wait=not cancel)
            if prediction_id is None:
                self.ledger.end(key, Outcome(client, "failed", refusal))
                time.sleep(0.5)
                continue
            accepted = Accepted(prediction_id, time.time(), client, cancel)
            with self.lock:
                self.accepted.append(accepted)
            if cancel:
                time.sleep(rng.uniform(0.0, 1.0))
                if client == "replicate":
                    with suppress(Exception):
                        session.predictions.cancel(prediction_id)
                else:
                    self.cancel(prediction_id)
            # Follow it as a client would (the final check decides whether it was lost).
            deadline = time.monotonic() + LONG_DEADLINE
            while time.monotonic() < deadline:
                state: str
                if client == "replicate":
                    try:
                        state = str(session.predictions.get(prediction_id).status)
                    except Exception as error:  # 404 once forgotten; refused while down
                        state = "gone" if getattr(error, "status", None) == 404 else ""
                else:
                    status, body = self.read(prediction_id)
                    state = "gone" if status == 404 else body.get("status", "")
                if state in TERMINAL or state == "gone":  # the final check counts it
                    break
                time.sleep(0.25)
            accepted.done = True
            self.ledger.end(key, Outcome(client, "followed", seconds=time.perf_counter() - started))

    def mark_fault(self, fault: str) -> None:
        """Note `fault` against every accepted prediction its client still follows."""
        with self.lock:
            for accepted in self.accepted:
                if not accepted.done:
                    accepted.in_flight_at.add(fault)

    def verify(self, grace: float) -> list[Outcome]:
        """The end of every accepted prediction, waiting up to `grace` s for the running
        ones; unreadable or never terminal means lost."""
        deadline = time.monotonic() + grace
        outcomes = []
        for accepted in self.accepted:
            while True:
                status, body = self.read(accepted.id)
                state = body.get("status", "")
                if (status == 200 and state in TERMINAL) or time.monotonic() > deadline:
                    break
                if status == 404:
                    break
                time.sleep(0.5)
            if status == 404:
                outcome = Outcome(accepted.client, "lost", "accepted, then unknown (404)")
            elif status != 200:
                outcome = Outcome(accepted.client, "lost", f"unreadable (HTTP {status})")
            elif state not in TERMINAL:
                outcome = Outcome(accepted.client, "lost", f"still {state} at the end")
            elif state == "succeeded":
                seconds = (body.get("metrics") or {}).get("total_time") or 0.0
                outcome = Outcome(accepted.client, "completed", seconds=float(seconds))
            elif state == "canceled":
                outcome = Outcome(accepted.client, "cancelled")
            else:
                outcome = Outcome(accepted.client, "failed", short_error(body.get("error")))
            outcome.in_flight_at = tuple(sorted(accepted.in_flight_at))
            outcomes.append(outcome)
        return outcomes

    def unknown_predictions(self) -> list[str]:
        """Ids the gateway lists that no client saw accepted (a create whose answer was
        lost in a restart), not terminal at the end."""
        known = {accepted.id for accepted in self.accepted}
        stray = []
        url: str | None = f"{self.url}/v1/predictions"
        with suppress(httpx.HTTPError, KeyError, ValueError):
            while url:
                page = httpx.get(url, headers=self.headers, timeout=30).json()
                for item in page["results"]:
                    if item["id"] not in known and item["status"] not in TERMINAL:
                        stray.append(item["id"])
                url = page.get("next")
        return stray


def refusal(status: int, detail: Any) -> str:
    """How a refused create is counted: its HTTP status, with the start of the detail
    unless it is the expected 503 while the Kiln server is down."""
    if status == 503 or not detail:
        return f"refused: HTTP {status}"
    text = str(detail)
    return f"refused: HTTP {status} ({text if len(text) <= 50 else text[:49] + '…'})"


def short_error(error: Any) -> str:
    """A failed prediction's error, cut to its status code when it starts with one."""
    text = str(error or "no error text")
    head = text.split(":", 1)[0]
    if head.isupper() and head.replace("_", "").isalpha():
        return f"prediction failed: {head}"
    return f"prediction failed: {text if len(text) <= 40 else text[:39] + '…'}"


# --- the run -------------------------------------------------------------------------------


async def faults(processes: Processes, ledger: Ledger, gateway: GatewayClients, args: Any) -> None:
    """Kill the engine core once, supervise `kiln serve`, restart the gateway once."""
    began = time.monotonic()
    await asyncio.sleep(args.seconds * args.kill_at)
    server = processes.server
    assert server is not None
    pid = core_pid(server)
    in_flight = ledger.mark_fault("engine-core kill", EVERY_CLIENT)
    gateway.mark_fault("engine-core kill")
    ledger.ongoing["kiln serve was down"] = EVERY_CLIENT
    os.kill(pid, signal.SIGKILL)
    processes.note(f"engine core (pid {pid}) killed with SIGKILL; {in_flight} requests in flight")
    code = await asyncio.to_thread(server.process.wait, 120)
    processes.server_exit_codes.append(code)
    processes.note(f"kiln serve exited with {code}; restarting it on port {processes.server_port}")
    restart = time.monotonic()
    try:
        await asyncio.to_thread(processes.start_server)
    finally:
        ledger.ongoing.pop("kiln serve was down")
    processes.note(f"kiln serve SERVING again after {time.monotonic() - restart:.1f} s")

    await asyncio.sleep(max(0.0, began + args.seconds * args.gateway_restart_at - time.monotonic()))
    in_flight = ledger.mark_fault("gateway restart", GATEWAY_CLIENTS)
    gateway.mark_fault("gateway restart")
    old = processes.gateway
    assert old is not None
    ledger.ongoing["the gateway was down"] = GATEWAY_CLIENTS
    try:
        old.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(old.process.wait, 60)
        processes.note(f"gateway stopped (SIGTERM, exit {code}); {in_flight} requests in flight")
        restart = time.monotonic()
        await asyncio.to_thread(processes.start_gateway)
    finally:
        ledger.ongoing.pop("the gateway was down")
    processes.note(f"gateway answering again after {time.monotonic() - restart:.1f} s")


async def sample_forever(processes: Processes) -> None:
    while True:
        processes.sample_memory()
        await asyncio.sleep(1.0)


async def soak(args: argparse.Namespace, workdir: Path) -> Report:
    processes = Processes(args, workdir)
    processes.note(
        "starting kiln serve and kiln gateway "
        f"({'SQLite --database' if processes.database else 'no --database'})"
    )
    try:
        processes.start_server()
        processes.start_gateway()
        processes.sample_memory()
        ledger = Ledger()
        gateway = GatewayClients(processes, ledger, args)
        stop_at = time.monotonic() + args.seconds
        processes.note(f"load: {args.clients} gRPC + {args.http_clients} gateway clients")
        sampler = asyncio.create_task(sample_forever(processes))
        fault_task = asyncio.create_task(faults(processes, ledger, gateway, args))
        threads = [
            threading.Thread(
                target=gateway.worker,
                args=("replicate" if index % 2 == 0 else "http", stop_at, 10_000 + index),
                daemon=True,
            )
            for index in range(args.http_clients)
        ]
        for thread in threads:
            thread.start()
        address = f"127.0.0.1:{processes.server_port}"
        await asyncio.gather(
            *(grpc_worker(address, ledger, stop_at, index, args) for index in range(args.clients))
        )
        for thread in threads:
            await asyncio.to_thread(thread.join)
        await fault_task  # the faults ran (a soak shorter than its restarts waits for them)
        processes.note("load stopped; checking every accepted prediction")
        predictions = await asyncio.to_thread(gateway.verify, args.grace)
        stray = await asyncio.to_thread(gateway.unknown_predictions)
        processes.sample_memory()
        sampler.cancel()
        processes.note("done")
    finally:
        processes.stop()
    grpc_outcomes = [o for o in ledger.outcomes if o.client == "grpc"]
    http_refusals = [o for o in ledger.outcomes if o.client != "grpc" and o.kind == "failed"]
    return Report(args, processes, grpc_outcomes + http_refusals + predictions, stray)


@dataclass
class Report:
    """Every request's end, rendered as the Markdown section of RESULTS.md."""

    args: argparse.Namespace
    processes: Processes
    outcomes: list[Outcome]
    stray: list[str]  # listed predictions no client saw accepted, not terminal at the end

    @property
    def lost(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == "lost"]

    def render(self) -> str:
        args, processes = self.args, self.processes
        lines = [
            HEADING,
            "",
            f"Machine: {cpu_name()}, {os.cpu_count()} cores, {platform.machine()}, Python "
            f"{platform.python_version()}; measured {time.strftime('%Y-%m-%d')}.",
            f"Command: `.venv/bin/python benchmarks/soak.py {' '.join(sys.argv[1:])}`",
            f"Workload: model `{args.model}` (torch, {args.threads} engine thread(s)), "
            f"{args.seconds:g} s of load from {args.clients} gRPC clients (64-128 px, "
            f"{args.min_steps}-{args.max_steps} steps, 1-2 images) and {args.http_clients} "
            f"gateway clients (official replicate client and plain HTTP); "
            f"{args.cancel_fraction:.0%} cancelled part-way, {args.deadline_fraction:.0%} with "
            f"a 0.2-2 s deadline. Engine core killed (SIGKILL) at {args.kill_at:.0%} of the "
            f"run and `kiln serve` restarted on its port; gateway restarted (SIGTERM) at "
            f"{args.gateway_restart_at:.0%}; gateway predictions "
            + (
                f"in `--database {processes.database.split(':///')[0]}:///…`."
                if processes.database
                else "in memory (this gateway has no `--database`)."
            ),
            "",
            "| client | sent | completed | cancelled | deadline exceeded | failed (by status) "
            "| lost |",
            "|---|---:|---:|---:|---:|---|---:|",
        ]
        for client in ("grpc", "replicate", "http"):
            mine = [o for o in self.outcomes if o.client == client]
            if not mine:
                continue
            lines.append(self.row(client, mine))
        lines.append(self.row("**all**", self.outcomes))
        lines += ["", f"**Lost: {len(self.lost)}**" + self.lost_detail(), ""]
        lines += self.fault_lines()
        lines += ["", *self.latency_lines(), "", *self.memory_lines(), ""]
        lines += [*self.log_lines(), ""]
        return "\n".join(lines)

    @staticmethod
    def row(name: str, outcomes: list[Outcome]) -> str:
        kinds = collections.Counter(o.kind for o in outcomes)
        failed = collections.Counter(o.status for o in outcomes if o.kind == "failed")
        by_status = ", ".join(f"{status} {n}" for status, n in failed.most_common()) or "0"
        label = {"grpc": "gRPC", "replicate": "replicate client", "http": "plain HTTP"}
        return (
            f"| {label.get(name, name)} | {len(outcomes)} | {kinds['completed']} "
            f"| {kinds['cancelled']} | {kinds['deadline']} | {by_status} | {kinds['lost']} |"
        )

    def lost_detail(self) -> str:
        if not self.lost and not self.stray:
            return (
                " (every gRPC stream completed or ended with a status; every prediction "
                "accepted with 201 was readable and terminal at the end)."
            )
        why = collections.Counter(f"{o.client}: {o.status}" for o in self.lost)
        parts = [f"{n} × {reason}" for reason, n in why.most_common()]
        if self.stray:
            parts.append(f"{len(self.stray)} listed predictions never terminal")
        return " — " + "; ".join(parts) + "."

    def fault_lines(self) -> list[str]:
        lines = ["Timeline:", ""]
        lines += [f"- {at:.1f} s: {text}" for at, text in self.processes.events]
        for fault, label in (
            ("engine-core kill", "In flight at the engine-core kill"),
            ("sent while kiln serve was down", "Sent while kiln serve was down"),
            ("gateway restart", "In flight at the gateway restart"),
            ("sent while the gateway was down", "Sent while the gateway was down"),
        ):
            hit = [o for o in self.outcomes if fault in o.in_flight_at]
            ends = collections.Counter(
                f"{o.kind} ({o.status})" if o.status else o.kind for o in hit
            )
            summary = ", ".join(f"{what} {n}" for what, n in ends.most_common()) or "none"
            lines.append(f"- {label}: {len(hit)} requests; {summary}.")
        return lines

    def latency_lines(self) -> list[str]:
        lines = [
            "| latency of completed requests | n | p50 s | p95 s |",
            "|---|---:|---:|---:|",
        ]
        for client, label in (
            ("grpc", "gRPC stream, end to end"),
            ("replicate", "replicate predictions (gateway total_time)"),
            ("http", "HTTP predictions (gateway total_time)"),
        ):
            values = [
                o.seconds for o in self.outcomes if o.client == client and o.kind == "completed"
            ]
            if values:
                lines.append(
                    f"| {label} | {len(values)} | {percentile(values, 50):.2f} "
                    f"| {percentile(values, 95):.2f} |"
                )
        return lines

    def log_lines(self) -> list[str]:
        """What the processes logged: errors, warnings, tracebacks, non-JSON lines."""
        lines = [
            "| log (JSON lines) | errors | warnings | tracebacks | non-JSON lines |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, pattern in (
            ("kiln serve", "server-*/server.log"),
            ("kiln gateway", "gateway-*/gateway.log"),
        ):
            counts: collections.Counter[str] = collections.Counter()
            for path in sorted(self.processes.workdir.glob(pattern)):
                text = path.read_text(errors="replace")
                counts["tracebacks"] += text.count("Traceback")
                for line in text.splitlines():
                    if not line.startswith("{"):
                        counts["plain"] += 1
                    elif '"level": "error"' in line or '"level": "critical"' in line:
                        counts["errors"] += 1
                    elif '"level": "warning"' in line:
                        counts["warnings"] += 1
            lines.append(
                f"| {label} | {counts['errors']} | {counts['warnings']} "
                f"| {counts['tracebacks']} | {counts['plain']} |"
            )
        return lines

    def memory_lines(self) -> list[str]:
        processes = self.processes
        lines = [
            "Resident memory (RSS, MiB) of every process: first sample after start-up, peak, "
            f"last sample before shutdown. `kiln serve` ran {processes.server_starts} times "
            f"(exit codes {processes.server_exit_codes or 'none'} before restarts) and the "
            f"gateway {processes.gateway_starts} times; start is the first process's, end the "
            "last's.",
            "",
            "| process | start | peak | end |",
            "|---|---:|---:|---:|",
        ]
        for role, (first, peak, last) in processes.memory.items():
            lines.append(
                f"| {role} | {first / 2**20:.0f} | {peak / 2**20:.0f} | {last / 2**20:.0f} |"
            )
        return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=8, help="gRPC clients")
    parser.add_argument(
        "--http-clients", type=int, default=2, help="gateway clients (replicate, HTTP)"
    )
    parser.add_argument("--cancel-fraction", type=float, default=0.2)
    parser.add_argument("--deadline-fraction", type=float, default=0.1)
    parser.add_argument("--kill-at", type=float, default=0.3, help="fraction of the run")
    parser.add_argument("--gateway-restart-at", type=float, default=0.7)
    parser.add_argument("--model", default=TINY_SDXL_NAME, help="built-in model to serve")
    parser.add_argument("--min-steps", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="server engine threads")
    parser.add_argument(
        "--grace", type=float, default=120.0, help="seconds to let predictions finish at the end"
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep the servers' logs and database here (default: temp)"
    )
    parser.add_argument("--write-results", action="store_true", help="update RESULTS.md")
    parser.add_argument("--results-file", type=Path, help="write the section here instead")
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(soak(args, args.workdir))
        section = report.render()
    else:
        with tempfile.TemporaryDirectory(prefix="kiln-soak-") as tmp:
            report = asyncio.run(soak(args, Path(tmp)))
            section = report.render()  # it reads the logs in `tmp`
    if args.results_file is not None:
        print(section)
        if args.write_results:
            write_section(HEADING, section, args.results_file)
    else:
        publish(HEADING, section, args.write_results)
    if report.lost or report.stray:
        print(f"LOST: {len(report.lost)} request(s), {len(report.stray)} stray", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
