"""Process-wide memory allocator settings for CPU training.

PyTorch's CPU allocator takes memory from the C library's malloc. glibc serves large blocks
(from 128 KiB, a threshold it raises as blocks are freed, up to 32 MiB) with fresh mmap'ed pages
and returns freed heap memory to the system once 128 KiB sit unused at its top. A training step
allocates and frees the same activation and gradient sizes every iteration, so with those
defaults it keeps paying page faults on memory it just gave back: 1,500 to 17,000 minor faults
per search iteration of the CIFAR-10 smoke supernet, against 6 to 940 with the settings below
(benchmarks/search_step.py shapes, one thread, a 2-core x86-64 machine).
"""

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's maximum: blocks below it come from the reusable heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory at the top of the heap
TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the system.

    Returns whether the settings were applied: they are skipped, with a debug log line, on
    platforms without glibc. Call it once per process before training; it affects every later
    allocation of the process.
    """
    if not sys.platform.startswith("linux"):
        log.debug("allocator settings skipped: not Linux")
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("allocator settings skipped: no mallopt in %s", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = [
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        mallopt(M_TOP_PAD, TOP_PAD),
    ]
    return all(result == 1 for result in applied)
