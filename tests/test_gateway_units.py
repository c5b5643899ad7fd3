"""The gateway's parts that need no Kiln server: settings, CLI, input schema, signing, SSE."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from replicate.webhook import Webhooks, WebhookSigningSecret

from kiln_client.cli import main as kiln_main
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_gateway.api import parse_prefer_wait
from kiln_gateway.errors import ApiError
from kiln_gateway.records import WebhookConfig
from kiln_gateway.schema import (
    DEFAULT_PROMPT,
    InputInvalid,
    openapi_schema,
    parse_input,
    violations_to_fields,
)
from kiln_gateway.settings import (
    Alias,
    SettingsError,
    load_settings,
    parse_alias,
)
from kiln_gateway.streaming import format_event
from kiln_gateway.webhooks import PredictionWebhook, new_secret, sign

TINY = pb.ModelInfo(
    name="tiny",
    default_width=64,
    default_height=64,
    default_num_inference_steps=8,
    default_guidance_scale=7.5,
    default_scheduler="K_EULER",
    min_size=32,
    max_size=512,
    max_num_inference_steps=150,
    max_num_outputs=8,
    max_guidance_scale=50,
    schedulers=["DDIM", "K_EULER", "K_EULER_ANCESTRAL"],
)


# --- settings and the command line ----------------------------------------------------------


def test_settings_flags_beat_env_beat_config(tmp_path: Path) -> None:
    config = tmp_path / "kiln.toml"
    config.write_text(
        '[gateway]\nport = 7001\nupstream = "10.0.0.1:50051"\nretention_seconds = 60\n'
        '[gateway.aliases]\n"stability-ai/sdxl" = "base"\n'
    )
    env = {
        "KILN_GATEWAY_PORT": "7002",
        "KILN_API_TOKENS": " one, two ,,",
        "KILN_GATEWAY_ALIASES": "acme/fast=turbo",
        "KILN_PORT": "9999",  # kiln serve's setting: never read by the gateway
    }

    from_all = load_settings({"config": config, "port": 7003, "alias": ["x/y:abc123=base"]}, env)
    from_env = load_settings({"config": config}, env)
    from_file = load_settings({"config": config}, {})

    assert (from_all.port, from_env.port, from_file.port) == (7003, 7002, 7001)
    assert from_all.upstream == "10.0.0.1:50051" and from_all.retention_seconds == 60
    assert from_all.tokens == ("one", "two") and from_file.tokens == ()
    assert set(from_all.aliases) == {
        Alias("stability-ai", "sdxl", "base"),
        Alias("acme", "fast", "turbo"),
        Alias("x", "y", "base", "abc123"),
    }


def test_settings_errors_name_the_problem(tmp_path: Path) -> None:
    config = tmp_path / "kiln.toml"
    config.write_text("[gateway]\nprot = 1\n")

    with pytest.raises(SettingsError, match=r"unknown \[gateway\] setting\(s\) \['prot'\]"):
        load_settings({"config": config}, {})
    with pytest.raises(SettingsError, match="owner/name=KILN_MODEL"):
        parse_alias("sdxl=tiny")
    with pytest.raises(SettingsError, match="whsec_"):
        load_settings({}, {"KILN_WEBHOOK_SECRET": "hunter2"})
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings({"config": tmp_path / "missing.toml"}, {})
    with pytest.raises(SettingsError, match="KILN_GATEWAY_PORT"):
        load_settings({}, {"KILN_GATEWAY_PORT": "eighty"})


def test_database_and_limits_settings(tmp_path: Path) -> None:
    folder = load_settings({"files_dir": tmp_path}, {})
    home = load_settings({}, {})
    chosen = load_settings(
        {"database": "postgresql://kiln:secret@db/kiln", "allowed_hosts": "a.example,b"},
        {"KILN_GATEWAY_WEBHOOK_ALLOWED_HOSTS": "10.0.0.0/8, hooks.internal"},
    )

    assert folder.database_url == f"sqlite:///{tmp_path.resolve()}/data/predictions.db"
    assert home.files_root.parts[-2:] == ("kiln", "gateway")
    assert chosen.database_url == "postgresql://kiln:secret@db/kiln"
    assert "secret" not in repr(chosen)
    assert chosen.allowed_hosts == ("a.example", "b")
    assert chosen.webhook_allowed_hosts == ("10.0.0.0/8", "hooks.internal")
    # Two 20 MiB images as base64 data URIs fit; much more does not.
    assert 2 * (20 << 20) * 4 // 3 < folder.request_limit < 60 << 20
    with pytest.raises(SettingsError, match="database must be") as caught:
        load_settings({"database": "mysql://root:hunter2@db/x"}, {})
    assert "hunter2" not in str(caught.value)


def test_output_mode_defaults_to_auto_and_is_checked() -> None:
    assert load_settings({}, {}).output_mode == "auto"
    assert load_settings({"output_mode": "data-uri"}, {}).output_mode == "data-uri"
    with pytest.raises(SettingsError, match="output_mode must be one of auto, url, data-uri"):
        load_settings({}, {"KILN_GATEWAY_OUTPUT_MODE": "inline"})


def test_input_settings_from_flags_env_and_file(tmp_path: Path) -> None:
    config = tmp_path / "kiln.toml"
    config.write_text("[gateway]\nallow_private_urls = true\nmax_input_bytes = 1000\n")

    defaults = load_settings({}, {})
    from_file = load_settings({"config": config}, {})
    from_env = load_settings({}, {"KILN_GATEWAY_ALLOW_PRIVATE_URLS": "yes"})
    from_flag = load_settings({"allow_private_urls": True, "fetch_timeout_seconds": 3}, {})

    assert defaults.allow_private_urls is False and defaults.max_input_bytes == 20 * 1024 * 1024
    assert from_file.allow_private_urls is True and from_file.max_input_bytes == 1000
    assert from_env.allow_private_urls is True
    assert from_flag.allow_private_urls is True and from_flag.fetch_timeout_seconds == 3
    with pytest.raises(SettingsError, match="fetch_timeout_seconds must be positive"):
        load_settings({"fetch_timeout_seconds": 0}, {})
    with pytest.raises(SettingsError, match="max_input_bytes must be at least 1"):
        load_settings({"max_input_bytes": 0}, {})


def test_cli_flags_for_image_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from kiln_gateway.cli import register

    parser = argparse.ArgumentParser(prog="kiln")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["gateway", "--allow-private-urls", "--max-input-bytes", "5000", "--output-mode", "auto"]
    )
    plain = parser.parse_args(["gateway"])

    assert (args.allow_private_urls, args.max_input_bytes, args.output_mode) == (True, 5000, "auto")
    assert plain.allow_private_urls is None  # not given: env and config may still set it
    with pytest.raises(SystemExit):
        parser.parse_args(["gateway", "--output-mode", "inline"])
    assert "invalid choice: 'inline'" in capsys.readouterr().err


def test_cli_refuses_a_public_host_without_tokens(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KILN_API_TOKENS", raising=False)

    code = kiln_main(["gateway", "--host", "0.0.0.0", "--port", "0"])

    assert code == 2
    error = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without API tokens" in error
    assert "KILN_API_TOKENS" in error


def test_cli_serves_on_loopback_and_says_auth_is_off(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "kiln_client.cli", "gateway", "--upstream", "127.0.0.1:9",
            "--port", "0", "--port-file", str(port_file), "--log-format", "text",
            "--files-dir", str(tmp_path / "gateway"),
        ],
        stderr=subprocess.PIPE,
        env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.05)
        spec = httpx.get(f"http://127.0.0.1:{int(port_file.read_text())}/openapi.json")
        assert spec.status_code == 200 and "/v1/predictions" in spec.json()["paths"]
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)

    assert process.returncode == 0
    assert "authentication is OFF" in stderr.decode()


# --- the input schema -----------------------------------------------------------------------


def test_schema_maps_replicate_inputs_to_a_kiln_request() -> None:
    parsed = parse_input(
        {
            "prompt": "a cat",
            "negative_prompt": "dog",
            "width": 128,
            "height": 96.0,  # JSON numbers with no fraction are integers
            "num_outputs": 2,
            "scheduler": "DDIM",
            "num_inference_steps": 20,
            "guidance_scale": 5,
            "seed": 2**63,
            "output_format": "jpeg",
            "priority": "high",
            "apply_watermark": True,
            "unknown_field": 1,
        },
        TINY,
    )

    request = parsed.request
    assert (request.model, request.prompt, request.negative_prompt) == ("tiny", "a cat", "dog")
    assert (request.width, request.height, request.num_outputs) == (128, 96, 2)
    assert (request.scheduler, request.num_inference_steps) == ("DDIM", 20)
    assert request.guidance_scale == 5 and request.seed == 2**63
    assert request.output_format == pb.OUTPUT_FORMAT_JPEG and request.priority == pb.PRIORITY_HIGH
    assert parsed.notes == ["ignoring input field(s) this model does not have: unknown_field"]
    assert not parsed.data_uri


def test_schema_defaults_leave_choices_to_the_model() -> None:
    request = parse_input({}, TINY).request

    assert request.prompt == DEFAULT_PROMPT
    assert (request.width, request.num_inference_steps, request.scheduler) == (0, 0, "")
    assert not request.HasField("seed") and not request.HasField("guidance_scale")


def test_schema_notes_inputs_that_have_no_effect() -> None:
    parsed = parse_input(
        {"disable_safety_checker": True, "lora_scale": 0.2, "prompt_strength": 0.8}, TINY
    )

    assert [note.split(" ")[0] for note in parsed.notes] == ["disable_safety_checker", "lora_scale"]


def test_schema_errors_use_replicates_words() -> None:
    with pytest.raises(InputInvalid) as caught:
        parse_input(
            {
                "prompt": 3,
                "num_outputs": 0,
                "guidance_scale": 80,
                "scheduler": "Euler",
                "mask": "https://example.com/mask.png",
                "refine": "expert_ensemble_refiner",
                "seed": -1,
                "output_as_data_uri": "yes",
            },
            TINY,
        )

    problems = {item.field: (item.type, item.description) for item in caught.value.fields}
    assert problems == {
        "input.prompt": ("invalid_type", "Invalid type. Expected: string, given: integer"),
        "input.num_outputs": ("number_gte", "Must be greater than or equal to 1"),
        "input.guidance_scale": ("number_lte", "Must be less than or equal to 50"),
        "input.scheduler": (
            "enum",
            'scheduler must be one of the following: "DDIM", "K_EULER", "K_EULER_ANCESTRAL"',
        ),
        "input.mask": (
            "required",
            "a mask needs an image: give input.image too (the photo it covers)",
        ),
        "input.refine": (
            "unsupported",
            "Kiln has no refiner yet; use no_refiner or leave refine out",
        ),
        "input.seed": ("number_gte", "Must be greater than or equal to 0"),
        "input.output_as_data_uri": (
            "invalid_type",
            "Invalid type. Expected: boolean, given: string",
        ),
    }


def test_schema_maps_image_inputs_to_the_request() -> None:
    parsed = parse_input(
        {
            "prompt": "new background",
            "image": "data:image/png;base64,AAAA",
            "mask": "https://example.com/mask.png",
            "prompt_strength": 0.5,
            "keep_unmasked": False,
            "mask_crop_padding": 32,
        },
        TINY,
    )
    parsed.attach({"image": b"photo-bytes", "mask": b"mask-bytes"})

    request = parsed.request
    assert parsed.images == {
        "image": "data:image/png;base64,AAAA",
        "mask": "https://example.com/mask.png",
    }
    assert (request.image, request.mask) == (b"photo-bytes", b"mask-bytes")
    assert request.HasField("strength") and request.strength == 0.5
    assert request.HasField("keep_unmasked") and not request.keep_unmasked
    assert request.mask_crop_padding == 32
    assert parsed.notes == []


def test_image_conditioning_inputs_without_an_image_are_not_sent() -> None:
    parsed = parse_input(
        {"image": "", "mask": None, "prompt_strength": 0.3, "keep_unmasked": False}, TINY
    )

    assert parsed.images == {}
    request = parsed.request
    assert not request.HasField("strength") and not request.HasField("keep_unmasked")
    assert parsed.notes == [
        "prompt_strength is accepted but has no effect without input.image",
        "keep_unmasked is accepted but has no effect without input.mask",
    ]
    plain = parse_input({"image": "https://example.com/p.png"}, TINY).request
    assert not plain.HasField("strength")  # absent: the model's default strength


def test_image_input_errors_name_the_field() -> None:
    inpainting = pb.ModelInfo()
    inpainting.CopyFrom(TINY)
    inpainting.inpainting = True

    with pytest.raises(InputInvalid) as kinds:
        parse_input({"image": 5, "mask_crop_padding": -1, "prompt_strength": 1.5}, TINY)
    with pytest.raises(InputInvalid) as zero:
        parse_input({"image": "https://example.com/p.png", "prompt_strength": 0}, TINY)
    with pytest.raises(InputInvalid) as needs_mask:
        parse_input({"image": "https://example.com/p.png"}, inpainting)

    assert {f.field: f.type for f in kinds.value.fields} == {
        "input.image": "invalid_type",
        "input.mask_crop_padding": "number_gte",
        "input.prompt_strength": "number_lte",
    }
    assert [(f.field, f.type) for f in zero.value.fields] == [
        ("input.prompt_strength", "number_gt")
    ]
    assert [f.field for f in needs_mask.value.fields] == ["input.mask"]
    assert "tiny is an inpainting model" in needs_mask.value.fields[0].description


def test_kiln_field_violations_use_replicates_input_names() -> None:
    fields = violations_to_fields([("strength", "must be > 0"), ("image", "cannot be decoded")])

    assert [(f.field, f.description) for f in fields] == [
        ("input.prompt_strength", "must be > 0"),
        ("input.image", "cannot be decoded"),
    ]


def test_version_schema_lists_the_image_inputs() -> None:
    info = pb.ModelInfo()
    info.CopyFrom(TINY)
    info.default_strength = 0.75
    info.max_image_bytes = 1000

    properties = openapi_schema(info)["components"]["schemas"]["Input"]["properties"]
    without_default = openapi_schema(TINY)["components"]["schemas"]["Input"]["properties"]

    image = properties["image"]
    assert image["format"] == "uri" and "at most 1000 bytes" in image["description"]
    assert properties["mask"]["format"] == "uri"
    assert properties["prompt_strength"]["default"] == 0.75
    assert without_default["prompt_strength"]["default"] == 0.8  # Replicate's default
    assert (properties["keep_unmasked"]["type"], properties["keep_unmasked"]["default"]) == (
        "boolean",
        True,
    )
    assert properties["mask_crop_padding"]["minimum"] == 0


def test_version_schema_reports_the_models_defaults_and_limits() -> None:
    properties = openapi_schema(TINY)["components"]["schemas"]["Input"]["properties"]

    assert properties["width"]["default"] == 64 and properties["width"]["maximum"] == 512
    assert properties["num_inference_steps"]["maximum"] == 150
    assert properties["scheduler"]["enum"] == ["DDIM", "K_EULER", "K_EULER_ANCESTRAL"]
    assert [p["x-order"] for p in properties.values()] == list(range(len(properties)))


# --- headers, signatures, events ------------------------------------------------------------


def test_prefer_wait_header() -> None:
    assert parse_prefer_wait(None, 60) is None
    assert parse_prefer_wait("respond-async", 60) is None
    assert parse_prefer_wait("wait", 60) == 60
    assert parse_prefer_wait("return=minimal, wait=5", 60) == 5
    assert parse_prefer_wait("wait=600", 60) == 60
    assert parse_prefer_wait("wait=0", 60) == 1
    with pytest.raises(ApiError) as caught:
        parse_prefer_wait("wait=-3", 60)
    assert caught.value.status == 400


def test_signature_verifies_with_the_official_client() -> None:
    secret = new_secret()
    body = json.dumps({"id": "abc", "status": "succeeded"})
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": sign(secret, "msg_1", 1700000000, body.encode()),
    }

    Webhooks.validate(headers=headers, body=body, secret=WebhookSigningSecret(key=secret))

    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert sign(secret, "msg_2", 1700000000, body.encode()) != headers["webhook-signature"]


def test_server_sent_event_format() -> None:
    assert format_event(3, "logs", "one\ntwo") == "event: logs\nid: 3\ndata: one\ndata: two\n\n"
    assert format_event(4, "done", "{}") == "event: done\nid: 4\ndata: {}\n\n"


async def test_webhooks_throttle_logs_and_always_send_completed() -> None:
    state = {"n": 0}
    later: list[tuple[str, int]] = []

    def send_later(messages: list[tuple[str, str, bytes]]) -> None:
        later.extend((url, json.loads(body)["n"]) for _, url, body in messages)

    hook = PredictionWebhook(
        WebhookConfig.of("http://receiver/all", None, "http://receiver/completed"),
        lambda: json.dumps(state).encode(),
        send_later,
    )

    def sent(messages: list[tuple[str, str, bytes]]) -> list[tuple[str, int]]:
        return [(url, json.loads(body)["n"]) for _, url, body in messages]

    now = sent(hook.notify("start"))
    for n in range(1, 21):  # twenty log lines at once
        state["n"] = n
        now += sent(hook.notify("logs"))
    await asyncio.sleep(0.6)  # the one throttled message comes due 500 ms later
    state["n"] = 21
    completed = hook.notify("completed")
    after = hook.notify("logs")  # nothing follows completed

    assert now == [("http://receiver/all", 0), ("http://receiver/all", 1)]
    assert later == [("http://receiver/all", 20)]  # the rest, coalesced into the latest state
    assert sent(completed) == [("http://receiver/all", 21), ("http://receiver/completed", 21)]
    assert len({message_id for message_id, _, _ in completed}) == 2
    assert after == []


def test_webhook_filter_sends_only_the_chosen_events() -> None:
    hook = PredictionWebhook(
        WebhookConfig.of("http://receiver/x", ["completed"], None), lambda: b"{}", print
    )

    assert hook.notify("start") == [] and hook.notify("output") == []
    assert [url for _, url, _ in hook.notify("completed")] == ["http://receiver/x"]
