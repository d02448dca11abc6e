"""devices.keep_freed_memory: a freed buffer stays in malloc's heap, ready for the next step;
devices.fast_bf16: where the defaults compute in bf16."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from bdvae.devices import fast_bf16

# Where glibc puts a 16 MiB buffer, the size of a training step's larger activations, and what
# happens to it once freed: prints the bytes it added to mmapped memory and the heap kept after the free.
WHERE = """
import ctypes, sys, torch
from bdvae.devices import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2()
x = torch.empty(4 << 20).fill_(1.0)
mmapped = libc.mallinfo2().hblkhd - before.hblkhd
del x
print(mmapped, libc.mallinfo2().arena - before.arena)
"""


def _where(mode: str) -> tuple[int, int]:
    result = subprocess.run([sys.executable, "-c", WHERE, mode], capture_output=True, text=True, check=True)
    mmapped, kept = map(int, result.stdout.split())
    return mmapped, kept


def _glibc() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")) if name == "glibc" and version else ()


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() < (2, 33),
                    reason="mallopt is glibc's, mallinfo2 glibc 2.33's")
def test_a_freed_buffer_stays_in_the_heap():
    size = 16 << 20
    mmapped, kept = _where("plain")
    assert mmapped >= size and kept < size  # glibc's default: its own mmap, handed back to the kernel when freed
    mmapped, kept = _where("keep")
    assert mmapped == 0 and kept >= size  # kept: from the heap, and still there for the next step


@pytest.mark.parametrize(("amx", "avx512_bf16", "fast"), [(True, True, True), (False, True, False), (False, False, False)])
def test_a_cpu_takes_bf16_by_default_only_with_amx(monkeypatch, amx, avx512_bf16, fast):
    # AVX512-BF16 without AMX computes bf16 natively, but more slowly than fp32 (results/performance.md).
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert fast_bf16(torch.device("cpu")) is fast
    from bdvae.distributed import Context
    from bdvae.evaluation import iwae_dtype
    from bdvae.options import EvalOptions

    assert Context().bf16_autocast(mixed_precision=True) is fast and not Context().bf16_autocast(mixed_precision=False)
    assert iwae_dtype(EvalOptions()) == ("bf16" if fast else "fp32") and iwae_dtype(EvalOptions(dtype="bf16")) == "bf16"
