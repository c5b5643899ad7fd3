"""Arrays from the engine core to the API process through shared memory, not the socket.

The core writes an array into a new shared-memory block and sends only a SharedArray (the
block's name, shape and dtype) over the socket; the API process copies the array out and
unlinks the block. Each block has exactly one owner at a time, and its owner unlinks it:
the core until the description has been written to the socket (`send_array`), the API
process from then on (`receive_array`, or `discard` when nobody wants the array any more).
A core that dies mid-way can leave blocks nobody was told about; they carry its process id
in their name, so the API process removes them when it sees the core exit (`sweep`), and a
later server removes those of dead cores that nobody else could (`sweep_stale`).

Python 3.11's resource tracker registers a block in every process that opens it, and at
exit unlinks (with a warning) whatever is still registered there. Every function here
leaves the tracker balanced: the creator unregisters a block once it has handed it over,
and the API process's unlink unregisters its own attachment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PREFIX = "kiln-shm-"
"""Every block Kiln creates is named PREFIX + the creating process id + '-' + a token."""

SHM_DIR = Path("/dev/shm")  # where Linux lists POSIX shared-memory blocks
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-[0-9a-f]+\Z")


@dataclass(frozen=True)
class SharedArray:
    """What crosses the socket in place of an array: the block holding it, C-contiguous."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def block_prefix(pid: int) -> str:
    """The name prefix of every block process `pid` creates."""
    return f"{PREFIX}{pid}-"


def start_tracker() -> None:
    """Start this process's resource tracker now, so the first image does not wait for it.

    The tracker is a process of its own that inherits stderr, where it would print plain
    text (warnings about "leaked" blocks) into the JSON log when the core is killed; the
    API process sweeps those blocks anyway (`sweep`), so its stderr goes to /dev/null.
    """
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def send_array(array: np.ndarray, send: Callable[[SharedArray], bool]) -> bool:
    """Write `array` into a new block and call `send` with its description.

    When `send` returns True the receiver owns the block and must unlink it; when it
    returns False (nobody is listening) or raises, the block is unlinked here. Returns what
    `send` returned. Raises OSError when shared memory has no room for the array; never
    raises after `send` returned True.
    """
    block = _create(max(array.nbytes, 1))
    try:
        _reserve(block)
        view: np.ndarray = np.ndarray(array.shape, array.dtype, buffer=block.buf)
        view[...] = array
        del view  # close() refuses while a view still exports the buffer
        sent = send(SharedArray(block.name, tuple(array.shape), array.dtype.str))
    except BaseException:
        block.unlink()
        _close(block)
        raise
    block.close()
    if not sent:
        block.unlink()
        return False
    # The receiver unlinks it; this process must not unlink it again at exit. Nothing may
    # raise once the receiver owns it, or a caller could send the array a second time.
    try:
        resource_tracker.unregister(_tracker_name(block), "shared_memory")
    except Exception:
        logger.warning("could not hand %s over in the resource tracker", block.name)
    return True


def receive_array(shared: SharedArray) -> np.ndarray:
    """The array of a block this process owns, copied out; the block is unlinked.

    Raises FileNotFoundError when the block is already gone (its creator died and was
    cleaned up after).
    """
    block = SharedMemory(name=shared.name)
    try:
        view: np.ndarray = np.ndarray(shared.shape, np.dtype(shared.dtype), buffer=block.buf)
        array = view.copy()
        del view
    finally:
        _unlink(block)
        _close(block)
    return array


def discard(shared: SharedArray) -> None:
    """Unlink a block this process owns without reading it (its job is gone)."""
    _unlink_name(shared.name)


def sweep(pid: int) -> int:
    """Unlink every block left by process `pid`, which has exited. Returns how many."""
    return sum(_unlink_name(name) for name in _block_names() if name.startswith(block_prefix(pid)))


def sweep_stale(min_age: float = 60.0) -> int:
    """Unlink blocks whose creator no longer runs and that are older than `min_age` seconds.

    Such blocks are left behind when a server is killed (SIGKILL) while images are in
    flight. The age guard spares blocks of a live core in another pid namespace sharing
    this /dev/shm, which would look dead from here: a block is normally unlinked within
    milliseconds. Returns how many were unlinked.
    """
    removed = 0
    now = time.time()
    for name in _block_names():
        match = _NAME.match(name)
        if match is None or _is_running(int(match.group(1))):
            continue
        try:
            age = now - (SHM_DIR / name).stat().st_mtime
        except FileNotFoundError:
            continue
        if age >= min_age:
            removed += _unlink_name(name)
    return removed


def _create(size: int) -> SharedMemory:
    prefix = block_prefix(os.getpid())
    while True:
        try:
            return SharedMemory(name=prefix + secrets.token_hex(8), create=True, size=size)
        except FileExistsError:  # a dead process with our pid left this name behind
            continue


def _reserve(block: SharedMemory) -> None:
    """Claim the block's pages now: on a full /dev/shm (Docker's default is 64 MB) writing
    to an unreserved page kills the process with SIGBUS, while this raises OSError."""
    fd = getattr(block, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, block.size)


def _close(block: SharedMemory) -> None:
    """Close, unless an exception's traceback still holds a view of the buffer (then the
    mapping goes when the traceback does; the name is already unlinked)."""
    with contextlib.suppress(BufferError):
        block.close()


def _tracker_name(block: SharedMemory) -> str:
    # The tracker knows POSIX blocks by their shm_open name, with its leading slash.
    return "/" + block.name


def _unlink(block: SharedMemory) -> bool:
    """Unlink a block this process attached to; False if someone else unlinked it first."""
    try:
        block.unlink()  # also unregisters it from this process's tracker
    except FileNotFoundError:
        resource_tracker.unregister(_tracker_name(block), "shared_memory")
        return False
    return True


def _unlink_name(name: str) -> int:
    try:
        block = SharedMemory(name=name)
    except FileNotFoundError:
        return 0
    block.close()
    return int(_unlink(block))


def _block_names() -> list[str]:
    try:
        return [name for name in os.listdir(SHM_DIR) if name.startswith(PREFIX)]
    except OSError:  # no /dev/shm (not Linux): nothing can be listed, nothing is swept
        return []


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
