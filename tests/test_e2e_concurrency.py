"""A burst of concurrent requests end to end: none lost, none mixed up, each equal to its
solo run.

Batched and solo results may differ by at most one uint8 level (a different UNet batch
size can change the CPU kernels' summation order; see test_batcher.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from e2e_support import (
    RPC_TIMEOUT,
    decode,
    generate,
    images,
    kinds,
    of_kind,
    open_stub,
    png_parameters,
    request,
)

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb

SUBJECTS = [
    "a teapot",
    "a red bicycle",
    "a lighthouse at dusk",
    "a bowl of lemons",
    "a violin on velvet",
    "a snowy cabin",
    "a paper crane",
    "a brass compass",
    "a cactus in a pot",
    "a glass of water",
]


def burst_requests() -> list[pb.GenerateRequest]:
    """Ten distinct requests: prompts, seeds, outputs, steps, schedulers, sizes, previews."""
    schedulers = ["K_EULER", "DDIM", "K_EULER_ANCESTRAL", "DPMSolverMultistep", "UniPC"]
    messages = []
    for index, subject in enumerate(SUBJECTS):
        messages.append(
            request(
                subject,
                seed=10_000 + 100 * index,
                num_outputs=2 if index % 3 == 0 else 1,
                num_inference_steps=6 + index % 4,
                scheduler=schedulers[index % len(schedulers)],
                width=64 if index % 4 else 48,
                height=64,
                guidance_scale=1.0 if index == 5 else 5.0 + index / 2,
                preview={"every_n_steps": 2, "max_size": 64} if index % 2 else None,
            )
        )
    return messages


def test_burst_of_concurrent_requests_matches_solo_runs(kiln_server: Any) -> None:
    messages = burst_requests()
    with open_stub(kiln_server.address) as stub:
        solo = [generate(stub, message) for message in messages]
        # Start every call before reading any, so they all reach the server together.
        calls = [stub.Generate(message, timeout=RPC_TIMEOUT) for message in messages]
        with ThreadPoolExecutor(len(calls)) as pool:
            burst: list[list[pb.GenerateResponse]] = list(pool.map(list, calls))

    assert len({stream[0].request_id for stream in burst}) == len(messages)
    positions = [q.position for stream in burst for q in of_kind(stream, "queued")]
    assert max(positions) > 0, "the requests never waited on each other: not a burst"
    for message, alone, together in zip(messages, solo, burst, strict=True):
        # The stream is complete and consists only of this request's events.
        assert kinds(together)[-1] == "completed"
        assert {event.request_id for event in together} == {together[0].request_id}
        (started,) = of_kind(together, "started")
        assert (started.seed, started.scheduler) == (message.seed, message.scheduler)
        progress = of_kind(together, "progress")
        total = progress[0].total_steps
        assert [p.step for p in progress] == list(range(1, total + 1))
        assert total == of_kind(alone, "progress")[0].total_steps
        previews = [decode(p.preview) for p in progress if p.preview]
        assert bool(previews) == message.HasField("preview")
        for preview in previews:  # num_outputs tiles of width x height, side by side
            expected_ratio = message.num_outputs * message.width / message.height
            assert abs(preview.width / preview.height - expected_ratio) < 0.1

        outputs, reference = images(together), images(alone)
        assert len(outputs) == len(reference) == message.num_outputs
        for image, solo_image in zip(outputs, reference, strict=True):
            assert image.seed == solo_image.seed
            parameters = png_parameters(image.data)
            assert parameters["prompt"] == message.prompt
            assert parameters["seed"] == image.seed
            pixels = np.asarray(decode(image.data), dtype=np.int16)
            solo_pixels = np.asarray(decode(solo_image.data), dtype=np.int16)
            assert pixels.shape == (message.height, message.width, 3)
            assert np.abs(pixels - solo_pixels).max() <= 1, message.prompt
