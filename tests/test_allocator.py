"""anas.allocator: freed memory stays in the process for the next allocation of its size."""

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

# Frees a 16 MiB tensor and prints how many bytes glibc's heap then holds free for reuse
# (mallinfo2().fordblks, glibc 2.33 and later).
PROBE = """
import ctypes, sys, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    from anas.allocator import keep_freed_memory
    assert keep_freed_memory()
tensor = torch.ones(4 << 20)
del tensor
print(libc.mallinfo2().fordblks)
"""

BLOCK = 16 << 20


def free_heap_bytes(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return int(out.stdout.strip())


def has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc 2.33 or later")
def test_default_returns_freed_block():
    assert free_heap_bytes("default") < BLOCK


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc 2.33 or later")
def test_keep_holds_freed_block():
    assert free_heap_bytes("keep") >= BLOCK
