"""Schemathesis over the gateway's own OpenAPI document: every operation, fed generated
requests (valid and invalid), answers without a server error and as its document says
(status codes, content types, response bodies and headers), refuses what breaks the
document, needs its token where it says so, and names the allowed methods on a 405. Every
built-in check runs except `positive_data_acceptance` (see below).

The gateway runs in-process (uvicorn) in front of the stand-in Kiln server of
tests/gateway_support.py, with outbound connections switched off (every input URL and
webhook address is refused), so generated URLs never reach a network. The example count
keeps the run to seconds on CI.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from gateway_support import TOKEN, fake_kiln, in_process, settings_for
from hypothesis import HealthCheck, settings

from kiln_gateway.app import create_app
from kiln_gateway.fetch import IPAddress
from kiln_gateway.settings import GatewaySettings

EXAMPLES_PER_OPERATION = 30


def _no_network(address: IPAddress) -> str:
    return "refused: this test makes no outbound connections"


async def _stub_resolver(host: str, port: int) -> list[str]:
    return ["192.0.2.1"]  # TEST-NET-1, and refused by _no_network anyway


def _document() -> dict[str, Any]:
    """The OpenAPI document, built from the app itself (no server needed to collect tests)."""
    document: dict[str, Any] = create_app(GatewaySettings()).openapi()
    return document


schema = schemathesis.openapi.from_dict(_document())
# Unknown query parameters are ignored, as on Replicate: do not send them as "invalid".
schema.config.generation.update(allow_extra_parameters=False)
# Requests of the right shape are still refused for what a schema cannot say (an unknown
# version or cursor, an upload that is not an image), with the documented 4xx.
schema.config.checks.positive_data_acceptance.enabled = False


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running gateway; every outbound connection refused."""
    folder = tmp_path_factory.mktemp("fuzzed")
    with fake_kiln() as upstream:
        gateway_settings = settings_for(
            upstream,
            f"sqlite:///{folder / 'predictions.db'}",
            folder / "files",
            max_wait_seconds=5,
        )
        options = {"resolver": _stub_resolver, "address_check": _no_network}
        with in_process(gateway_settings, **options) as gateway:
            served = httpx.get(f"{gateway.url}/openapi.json").json()
            assert served == _document()  # the document fuzzed is the one served
            yield gateway.url


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_operation_answers_as_documented(case: Any, gateway_url: str) -> None:
    case.call_and_validate(
        base_url=gateway_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
