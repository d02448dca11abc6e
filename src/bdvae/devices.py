"""Where computation runs: --device (auto, cpu, cuda), and whether a device computes bf16 natively."""

from __future__ import annotations

import torch

from bdvae.errors import BdvaeError

DEVICES = ("auto", "cpu", "cuda")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16
    (AMX too); elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":  # Ampere and later; torch's is_bf16_supported() also counts emulation
        return torch.cuda.get_device_properties(device).major >= 8
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """--device: "cpu", "cuda" (an error without a GPU) or "auto" (cuda when there is one). A CUDA
    device is GPU `local_rank` (torchrun's, one per process), else the process's current GPU
    (0 unless torch.cuda.set_device chose another, as compare --jobs does for its workers)."""
    if name not in DEVICES:
        raise BdvaeError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise BdvaeError("--device cuda: torch sees no CUDA GPU here (use --device cpu or auto)")
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
