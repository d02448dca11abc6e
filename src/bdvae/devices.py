"""Where computation runs: --device (auto, cpu, cuda), whether bf16 is faster than fp32 on a
device, and how much memory it has left for a request."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

import torch

from bdvae.errors import BdvaeError

DEVICES = ("auto", "cpu", "cuda")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 is faster than fp32 on `device` for bdvae's models, so that the defaults use it:
    a CUDA GPU with bf16, or a CPU with AMX. A CPU with AVX512-BF16 but no AMX computes bf16
    natively, yet more slowly than fp32 at these sizes (docs/results/performance.md); elsewhere
    bf16 is emulated, slower still."""
    if device.type == "cuda":  # Ampere and later; torch's is_bf16_supported() also counts emulation
        return torch.cuda.get_device_properties(device).major >= 8
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


# mallopt's parameters (glibc's malloc.h); 32 MiB is the largest mmap threshold glibc takes on 64-bit.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the
    kernel, process-wide; whether it took effect (only on Linux with glibc).

    Every training step (and every decode of the IWAE) frees and allocates again the same
    activation buffers, a few MB each. By default glibc serves such sizes by mmap, or trims its
    heap after the frees, so each step gets fresh pages that the kernel must fault in and zero
    again: thousands of page faults a step. An
    mmap threshold of 32 MiB and a trim threshold of 1 GiB keep them in the heap, and the faults
    stop after the first steps (docs/results/performance.md). The price: the process's resident memory
    stays at its peak until it exits. Both are set: setting either one alone stops glibc from
    adapting its mmap threshold, which faults more."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the process's own symbols: glibc's mallopt
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """--device: "cpu", "cuda" (an error without a GPU) or "auto" (cuda when there is one). A CUDA
    device is GPU `local_rank` (torchrun's, one per process), else the process's current GPU
    (0 unless torch.cuda.set_device chose another, as compare --jobs does for its workers)."""
    if name not in DEVICES:
        raise BdvaeError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}",
                         python=f"device must be one of {', '.join(map(repr, DEVICES))}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise BdvaeError("--device cuda: torch sees no CUDA GPU here (use --device cpu or auto)",
                         python="device='cuda': torch sees no CUDA GPU here (use device='cpu' or 'auto')")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)


def device_type(name: str) -> str:
    """What --device NAME means here, "cpu" or "cuda", checked as resolve_device checks it but
    without initialising CUDA (which a process should do only once it knows its own GPU)."""
    return resolve_device(name, local_rank=0).type


def check_gpus(device: str, processes: int) -> None:
    """NCCL needs a GPU of its own for every process of a machine: refuse more processes than GPUs."""
    if device_type(device) == "cuda" and processes > torch.cuda.device_count():
        raise BdvaeError(f"{processes} processes on CUDA need {processes} GPUs, torch sees "
                         f"{torch.cuda.device_count()}; use fewer processes or --device cpu")


def _proc_kib(path: str, key: str) -> int | None:
    """The `key: N kB` line of a /proc file, in bytes; None where there is no such file or line."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """What the process's cgroup (v2) still lets it allocate; None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        return None if limit == "max" else max(0, int(limit) - int(used))
    except (OSError, ValueError):
        return None


def _address_space_room() -> int | None:
    """What `ulimit -v` (RLIMIT_AS) still lets the process map; None without a limit."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    mapped = _proc_kib("/proc/self/status", "VmSize")
    if soft == resource.RLIM_INFINITY or mapped is None:
        return None
    return max(0, soft - mapped)


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can take: a GPU's free memory; on the CPU the least of the
    memory the kernel reports available (swap included), the cgroup's room and the `ulimit -v` room.
    None where none of these can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    ram = _proc_kib("/proc/meminfo", "MemAvailable")
    if ram is not None:
        ram += _proc_kib("/proc/meminfo", "SwapFree") or 0
    elif hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    known = [room for room in (ram, _cgroup_room(), _address_space_room()) if room is not None]
    return min(known) if known else None


def size_text(nbytes: float) -> str:
    """A byte count as people read it: 512 MB, 3.2 GB, 4,160 TB (powers of 1,000)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:,.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{nbytes:.0f} bytes"


def check_memory(need: int, what: str, device: torch.device, fix: str, python_fix: str | None = None) -> None:
    """Refuse, in one line, a request that needs more memory on `device` than it has available, before
    anything is allocated. `need` is a lower bound of what the request takes (so a request that could
    run is never refused); `what` says what it is, `fix` (command line) and `python_fix` what to change."""
    free = available_memory(device)
    if free is None or need <= free:
        return
    where = "free on the GPU" if device.type == "cuda" else "available to this process"
    head = f"{what} needs at least {size_text(need)} of memory, and only {size_text(free)} is {where}"
    raise BdvaeError(f"{head}: {fix}", python=f"{head}: {python_fix or fix}")
