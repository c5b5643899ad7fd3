"""Writing one file so that readers see the old content or the new, never half of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | memoryview | str) -> None:
    """Replace `path` with `data` (text is written as UTF-8) in one rename.

    The data goes to a temporary file beside `path` first, so a crash or a full disk
    leaves the previous file as it was; the temporary file is removed on failure. The
    folder is created when missing. Raises OSError when the write fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
