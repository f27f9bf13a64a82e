"""What the benchmark scripts share: the ``--threads`` option and a wall + CPU clock."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (default 1): on a shared machine, OpenMP workers spin-waiting for a busy core make
    multi-threaded timings swing by several times; 0 keeps torch's own choice."""
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own choice)")


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` to torch."""
    if args.threads:
        torch.set_num_threads(args.threads)


def clock(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``(fn(), wall seconds, CPU seconds of this process)``; the CPU figure is the steadier one on a
    shared machine (wall-clock time includes waiting for a core)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu
