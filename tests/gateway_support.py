"""What the gateway's durability, isolation and fuzz tests share: a stand-in Kiln server
speaking real gRPC, the gateway in-process or as a real `kiln gateway` subprocess, and a
webhook receiver.

The stand-in serves one model, `fake`, and answers Generate by prompt:
- `hold`: starts, reports step 1 and waits until `release` is set or the caller goes away;
- `hold-once`: the same the first time the prompt is seen, then completes at once (so a
  prediction re-submitted after a gateway died completes);
- `refuse`: INVALID_ARGUMENT before anything starts;
- anything else: completes at once with one PNG per output.
"""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from PIL import Image

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_gateway.app import create_app
from kiln_gateway.server import bind_socket
from kiln_gateway.settings import GatewaySettings
from kiln_gateway.webhooks import sign

TOKEN = "token-of-app-a"
OTHER_TOKEN = "token-of-app-b"
ADMIN_TOKEN = "token-of-the-operator"
TOKENS_ENV = f"{TOKEN},{OTHER_TOKEN},{ADMIN_TOKEN}:admin"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"kiln-gateway-durability-test-key").decode()
MODEL = pb.ModelInfo(
    name="fake",
    default_width=64,
    default_height=64,
    default_num_inference_steps=4,
    default_guidance_scale=5,
    default_scheduler="K_EULER",
    min_size=32,
    max_size=512,
    max_num_inference_steps=50,
    max_num_outputs=4,
    max_guidance_scale=20,
    schedulers=["K_EULER"],
    default_strength=0.8,
)


def png(colour: str = "red", size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


OUTPUT = png("teal")


class FakeKiln(pb_grpc.GenerationServiceServicer):
    """The stand-in Kiln server's behaviour (see the module docstring)."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.seen: Counter[str] = Counter()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[MODEL], default_model=MODEL.name)

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        with self.lock:
            kept = pb.GenerateRequest()
            kept.CopyFrom(request)
            self.requests.append(kept)
            self.seen[request.prompt] += 1
            count = self.seen[request.prompt]
        if request.prompt == "refuse":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused by the stand-in")
        outputs = request.num_outputs or 1
        yield pb.GenerateResponse(
            request_id="fake",
            started=pb.StartedEvent(
                model=MODEL.name, width=64, height=64, num_outputs=outputs,
                num_inference_steps=4, scheduler="K_EULER", seed=7,
            ),
        )  # fmt: skip
        yield pb.GenerateResponse(
            request_id="fake", progress=pb.ProgressEvent(step=1, total_steps=4)
        )
        if request.prompt == "hold" or (request.prompt == "hold-once" and count == 1):
            while not self.release.wait(0.05):
                if not context.is_active():
                    return
        for index in range(outputs):
            yield pb.GenerateResponse(
                request_id="fake",
                image=pb.ImageEvent(
                    index=index, seed=7 + index, data=OUTPUT, mime_type="image/png"
                ),
            )
        yield pb.GenerateResponse(
            request_id="fake",
            completed=pb.CompletedEvent(inference_seconds=0.01, engine_seconds=0.01, num_images=1),
        )

    def count(self, prompt: str) -> int:
        """How many Generate calls carried this prompt."""
        with self.lock:
            return self.seen[prompt]


@dataclass
class Upstream:
    """A running stand-in: its address and behaviour."""

    address: str
    kiln: FakeKiln


@contextlib.contextmanager
def fake_kiln() -> Iterator[Upstream]:
    """Serve a FakeKiln over gRPC on an ephemeral 127.0.0.1 port."""
    kiln = FakeKiln()
    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_GenerationServiceServicer_to_server(kiln, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Upstream(f"127.0.0.1:{port}", kiln)
    finally:
        kiln.release.set()
        server.stop(0)


def wait_until(check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll `check` every 50 ms until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def settings_for(upstream: Upstream, database: str, files: Path, **extra: Any) -> GatewaySettings:
    """Gateway settings for the stand-in: three tokens (one admin), this database and folder."""
    values: dict[str, Any] = {
        "upstream": upstream.address,
        "host": "127.0.0.1",
        "port": 0,
        "tokens": (TOKEN, OTHER_TOKEN, ADMIN_TOKEN),
        "admin_tokens": (ADMIN_TOKEN,),
        "database": database,
        "files_dir": files,
        "webhook_secret": WEBHOOK_SECRET,
        "webhook_retry_seconds": 0.1,
        "webhook_allowed_hosts": ("127.0.0.1",),
        "log_level": "WARNING",
        **extra,
    }
    return replace(GatewaySettings(), **values)


@dataclass
class Gateway:
    """A running gateway: its base URL, and how to stop it."""

    url: str
    stop: Callable[[], None]

    def client(self, token: str = TOKEN) -> httpx.Client:
        """Plain HTTP with a bearer token."""
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )


@contextlib.contextmanager
def in_process(settings: GatewaySettings, **app_options: Any) -> Iterator[Gateway]:
    """The gateway app under uvicorn in a thread of the test process."""
    app = create_app(settings, **app_options)
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    with serving(uvicorn.Server(config)) as served:
        yield Gateway(f"http://127.0.0.1:{served.port}", served.stop)


@dataclass
class Served:
    """A uvicorn server running in a thread: its port, and how to stop it (idempotent)."""

    port: int
    stop: Callable[[], None]


@contextlib.contextmanager
def serving(server: uvicorn.Server) -> Iterator[Served]:
    """Run `server` in a thread of the test process on an ephemeral 127.0.0.1 port until
    the block ends (or `stop` is called)."""
    sock = bind_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 20, "the gateway to start")
    assert thread.is_alive(), "the gateway failed to start"

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)

    try:
        yield Served(sock.getsockname()[1], stop)
    finally:
        stop()
        sock.close()


@dataclass
class GatewayProcess:
    """A real `kiln gateway` subprocess."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> int:
        """SIGTERM, and its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def start_process(upstream: Upstream, database: str, files: Path, *flags: str) -> GatewayProcess:
    """`kiln gateway` (through `python -m kiln_client.cli`) on a free port; waits until ready."""
    files.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="process-", dir=files.parent))
    port_file, log = folder / "port", folder / "log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env |= {
        "KILN_API_TOKENS": TOKENS_ENV,
        "KILN_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "KILN_GATEWAY_WEBHOOK_RETRY_SECONDS": "0.1",
        "KILN_GATEWAY_WEBHOOK_MAX_ATTEMPTS": "1000",
    }
    command = [
        sys.executable, "-m", "kiln_client.cli", "gateway", "--upstream", upstream.address,
        "--port", "0", "--port-file", str(port_file), "--database", database,
        "--files-dir", str(files), "--webhook-allowed-hosts", "127.0.0.1",
        "--log-format", "json", *flags,
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)

    def ready() -> bool:
        assert process.poll() is None, f"kiln gateway exited:\n{log.read_text()}"
        return port_file.exists() and port_file.read_text().strip() != ""

    wait_until(ready, 60, "kiln gateway to start")
    return GatewayProcess(process, f"http://127.0.0.1:{int(port_file.read_text())}", log)


@dataclass
class Receiver:
    """A webhook receiver; answers 503 until `accepting` is set, then 200."""

    url: str = ""
    accepting: threading.Event = field(default_factory=threading.Event)
    deliveries: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self) -> list[dict[str, Any]]:
        """The bodies answered 200, each checked against its signature."""
        with self.lock:
            taken = [(h, b) for h, b, status in self.deliveries if status == 200]
        for headers, body in taken:
            expected = sign(
                WEBHOOK_SECRET, headers["webhook-id"], int(headers["webhook-timestamp"]), body
            )
            assert headers["webhook-signature"] == expected
        return [json.loads(body) for _, body in taken]


@contextlib.contextmanager
def webhook_receiver(accepting: bool = True) -> Iterator[Receiver]:
    """A local webhook receiver on 127.0.0.1."""
    state = Receiver()
    if accepting:
        state.accepting.set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = 200 if state.accepting.is_set() else 503
            with state.lock:
                headers = {key.lower(): value for key, value in self.headers.items()}
                state.deliveries.append((headers, body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def self_signed_certificate(
    folder: Path, host: str, *, issuer: tuple[Path, Path] | None = None, client: bool = False
) -> tuple[Path, Path]:
    """A one-day certificate and key for `host` (an IP address or a DNS name), made with the
    openssl CLI in `folder` (`make test-deps` installs it).

    Self-signed, or signed by `issuer` (a `certificate_authority()`); `client` makes it a
    client certificate (for mutual TLS) rather than a server one.
    """
    _require_openssl()
    try:
        ipaddress.ip_address(host)
        alt_name = f"IP:{host}"
    except ValueError:
        alt_name = f"DNS:{host}"
    cert, key = folder / f"{host}.pem", folder / f"{host}.key"
    signing = [] if issuer is None else [
        "-CA", str(issuer[0]), "-CAkey", str(issuer[1]),
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
    ]  # fmt: skip
    _openssl_certificate(cert, key, host, "-addext", f"subjectAltName={alt_name}", *signing)
    return cert, key


def _require_openssl() -> None:
    # Fails rather than skips: CI must run the TLS tests, and `make test` installs openssl.
    if shutil.which("openssl") is None:
        pytest.fail(
            "the openssl command makes the TLS tests' certificates: `make test-deps` installs "
            "it (Debian's openssl package), as `make test` does before running the tests"
        )


def certificate_authority(folder: Path, name: str = "Kiln test CA") -> tuple[Path, Path]:
    """A one-day CA certificate and key in `folder`, to sign `self_signed_certificate`s."""
    _require_openssl()
    cert, key = folder / "ca.pem", folder / "ca.key"
    _openssl_certificate(cert, key, name, "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _openssl_certificate(cert: Path, key: Path, name: str, *options: str) -> None:
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", f"/CN={name}",
            *options, "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
