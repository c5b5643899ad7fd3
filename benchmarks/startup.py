"""Start-up of the full-size SDXL architecture: generation, content hash, weight loading.

    .venv/bin/python benchmarks/startup.py [--cache-dir DIR] [--regenerate] [--repeats 3]
        [--write-results]

Measures `kiln-sdxl-base-arch` (SDXL base 1.0's architecture, random fp16 weights, ~7 GB)
from start to loaded, before any warm-up: read_model_files (tokenizers, configs), the
model content hash that engine manifests are checked against, and load_modules (fp32 on
the CPU). Three kinds of start, each in this process after the previous one's modules are
freed, in `--repeats` interleaved rounds:
1. hash cache empty, page cache dropped: the first start after install or reboot;
2. hash cache warm, page cache dropped: a restart after reboot;
3. hash cache warm, page cache warm: a restart right after a stop.
The page cache of the model's files is dropped with posix_fadvise(DONTNEED), which needs
no privileges; where the OS ignored it, the cold hash would run at the from-memory rate
the report gives beside it.
The one-off generation of the folder is timed when it happens (first run, or
`--regenerate`). `--write-results` replaces this benchmark's section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from results_file import cpu_name, publish

from kiln_server.models.loader import (
    RACY_WINDOW_NS,
    load_modules,
    model_content_hash,
    read_model_files,
)
from kiln_server.models.registry import default_cache_dir
from kiln_server.models.sdxl_base_arch import (
    SDXL_BASE_ARCH_NAME,
    is_current,
    write_sdxl_base_arch,
)

SECTION = "## Start-up of the full-size SDXL architecture (benchmarks/startup.py)"


@dataclass
class StartTimes:
    """Seconds of one start, from nothing to loaded modules."""

    label: str
    read_files: float
    content_hash: float
    load: float
    peak_rss_gib: float

    @property
    def total(self) -> float:
        """Start to loaded."""
        return self.read_files + self.content_hash + self.load


def model_files(folder: Path) -> list[Path]:
    """Every file of the model folder."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def drop_page_cache(folder: Path) -> None:
    """Ask the OS to evict the folder's file data from the page cache."""
    for file in model_files(folder):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages (a fresh generation) cannot be evicted
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS count (Linux 4.0+); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_gib() -> float:
    """This process's peak resident memory since the last reset (else since it started)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / (1 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def one_start(label: str, folder: Path, cache_file: Path) -> StartTimes:
    """Time read_model_files, model_content_hash and load_modules, then free the modules."""
    reset_peak_rss()
    begin = time.perf_counter()
    read_model_files(folder)
    read_files = time.perf_counter() - begin
    begin = time.perf_counter()
    model_content_hash(folder, cache_file)
    content_hash = time.perf_counter() - begin
    begin = time.perf_counter()
    modules = load_modules(folder)
    load = time.perf_counter() - begin
    times = StartTimes(label, read_files, content_hash, load, peak_rss_gib())
    del modules
    gc.collect()
    return times


def median_start(times: list[StartTimes]) -> StartTimes:
    """Per-phase medians of repeated starts of one kind, and their highest peak RSS."""
    return StartTimes(
        times[0].label,
        statistics.median(t.read_files for t in times),
        statistics.median(t.content_hash for t in times),
        statistics.median(t.load for t in times),
        max(t.peak_rss_gib for t in times),
    )


def main() -> int:
    """Generate the model if needed, time three starts, print and optionally record them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, help="Kiln cache (default: the user's)")
    parser.add_argument("--regenerate", action="store_true", help="time a fresh generation")
    parser.add_argument("--device", default="cpu", help="where to compute the weights")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three starts")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    folder = (args.cache_dir or default_cache_dir()) / "models" / SDXL_BASE_ARCH_NAME
    generation: float | None = None
    generation_rss = 0.0
    if args.regenerate or not is_current(folder):
        reset_peak_rss()
        begin = time.perf_counter()
        write_sdxl_base_arch(folder, torch.device(args.device))
        generation = time.perf_counter() - begin
        generation_rss = peak_rss_gib()
    size = sum(f.stat().st_size for f in model_files(folder))
    # model_content_hash does not remember hashes of files modified in the last 2 s (their
    # mtime could hide a further change); a just-generated folder waits that out.
    newest = max(f.stat().st_mtime_ns for f in model_files(folder))
    time.sleep(max(0.0, (newest + RACY_WINDOW_NS - time.time_ns()) / 1e9 + 0.1))

    per_start_peaks = reset_peak_rss()
    kinds = (
        ("hash cache empty, page cache dropped", True),
        ("hash cache warm, page cache dropped", True),
        ("hash cache warm, page cache warm", False),
    )
    rounds: list[list[StartTimes]] = [[] for _ in kinds]
    memory_hashes = []
    for _ in range(args.repeats):
        # Interleaved rounds, so a change in the shared machine's load hits every kind alike.
        with tempfile.TemporaryDirectory() as scratch:
            cache_file = Path(scratch) / "content-hashes.json"
            for (label, drop), times in zip(kinds, rounds, strict=True):
                if drop:
                    drop_page_cache(folder)
                times.append(one_start(label, folder, cache_file))
        begin = time.perf_counter()
        model_content_hash(folder, use_cache=False)
        memory_hashes.append(time.perf_counter() - begin)
    starts = [median_start(times) for times in rounds]
    memory_hash = statistics.median(memory_hashes)
    load_after = os.getloadavg()[0]

    gib = size / (1 << 30)
    cold_rate = gib / starts[0].content_hash
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    generated = (
        f"Generation (`write_sdxl_base_arch`, weights computed on `{args.device}`, streamed "
        f"to disk one tensor at a time): **{generation:.1f} s**, peak RSS "
        f"{generation_rss:.2f} GiB."
        if generation is not None
        else "Generation not timed in this run (the folder was current; `--regenerate`)."
    )
    lines = [
        SECTION,
        "",
        f"Machine: {platform.machine()} ({cpu_name()}), {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / (1 << 30):.0f} GiB RAM, "
        f"{device}, torch {torch.__version__}, Python {platform.python_version()}; "
        f"measured {time.strftime('%Y-%m-%d')}.",
        f"Command: `.venv/bin/python benchmarks/startup.py {' '.join(sys.argv[1:])}`",
        f"Model `{SDXL_BASE_ARCH_NAME}`: SDXL base 1.0's architecture (UNet 2.567 B, text "
        f"encoders 123 M + 695 M, VAE 83.7 M parameters), random fp16 weights, "
        f"{size / 1e9:.2f} GB ({gib:.2f} GiB) on disk. Loaded = read_model_files + "
        "model_content_hash + load_modules (fp32, CPU), before warm-up. Medians of "
        f"{args.repeats} interleaved rounds (peak RSS: the highest).",
        "",
        "| start | read files s | content hash s | load fp32 s | start to loaded s "
        "| peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {s.label} | {s.read_files:.2f} | {s.content_hash:.2f} | {s.load:.1f} "
            f"| {s.total:.1f} | {s.peak_rss_gib:.1f} |"
            for s in starts
        ),
        "",
        f"The cold hash reads the folder at {cold_rate:.2f} GiB/s; hashing it from the page "
        f"cache takes {memory_hash:.1f} s ({gib / memory_hash:.2f} GiB/s, SHA-256 on one "
        "core); a warm hash cache only stats the files "
        f"({starts[1].content_hash * 1000:.0f} ms). 1-minute load average {load_before:.1f} "
        f"before, {load_after:.1f} after (a shared machine: seconds swing with its load). "
        "Peak RSS: the "
        "process's high-water mark during that start"
        + ("." if per_start_peaks else " or earlier (it could not be reset here).")
        + " In the first kind of start the hash pulls the files into the page cache and "
        "load_modules reads them from memory; with a warm hash cache and a dropped page "
        "cache, load_modules reads the disk itself, so there the hash cache saves the "
        "SHA-256 time rather than the disk time.",
        generated,
        "",
    ]
    section = "\n".join(lines)
    publish(SECTION, section, args.write_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
