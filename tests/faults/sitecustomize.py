"""Fault injection for the end-to-end fault tests (tests/test_e2e_faults.py).

On PYTHONPATH of a `kiln serve` the tests start (and so of its engine core, which inherits
the environment), this wraps every loaded UNet engine in FaultyEngine. The test then
breaks the engine on demand by creating a file in $KILN_TEST_FAULTS: `raise` makes the
next UNet call raise as a failed device would, `hang` makes it block as a stuck one would.
Not part of Kiln: only the test suite puts this folder on a server's path.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

FAULTS = os.environ.get("KILN_TEST_FAULTS")


class FaultyEngine:
    """An engine of the test suite's own: the real one, until a fault file appears."""

    def __init__(self, inner: Any, faults: Path) -> None:
        self._inner = inner
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def infer(self, inputs: Any) -> Any:
        if (self._faults / "raise").exists():
            raise RuntimeError("injected device fault: CUDA error: an illegal memory access")
        while (self._faults / "hang").exists():
            time.sleep(0.05)  # a kernel that never returns
        return self._inner.infer(inputs)


if FAULTS:
    from kiln_server.engines import loading

    _load = loading.load_engine_set

    def load_engine_set(*args: Any, **kwargs: Any) -> Any:
        engines = _load(*args, **kwargs)
        return replace(engines, unet=FaultyEngine(engines.unet, Path(FAULTS)))

    loading.load_engine_set = load_engine_set  # type: ignore[assignment]
