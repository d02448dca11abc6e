"""The training state's format: everything a resumed training needs to continue exactly (weights,
Adam's moments and step counts, the training generator's state, the epoch's data order, running
sums and rows), as one safetensors file of tensors plus JSON metadata, sealed by a sha256 over
both that is checked on load. The same sealed format keeps an unfinished IWAE. rundir.py names
the files and keeps the newest; this module packs, writes, reads and unpacks one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from bdvae._version import __version__
from bdvae.errors import BdvaeError, first_line
from bdvae.files import atomic_path

# The generator's state keeps the name it had when training drew from torch's global generator,
# whose state it was: a state saved then resumes exactly as before.
GENERATOR_KEY = "rng.torch"
IMPLEMENTATION = ("fused", "foreach", "capturable")  # Adam's settings that say how it computes, not what


@dataclass
class Position:
    """Where training stands: the next epoch (1-based), the next image of that epoch's order, the
    optimizer steps taken, the epoch's data order and running sums, and the finished epochs' rows."""

    epoch: int = 1
    next_start: int = 0
    global_step: int = 0
    order: Tensor | None = None  # this epoch's permutation; None before it is drawn
    totals: Tensor = dataclasses.field(default_factory=lambda: torch.zeros(3))  # loss, recon_nll, reg sums
    rows: list[dict[str, float]] = dataclasses.field(default_factory=list)
    skipped: int = 0  # batches of this epoch skipped for a non-finite loss or gradient
    skipped_images: int = 0



def digest(tensors: dict[str, Tensor], text: str = "") -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in name order), then `text`: what
    seals a training state (with its JSON state) and a sampler's arrays (alone)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(text.encode())
    return h.hexdigest()


def save_sealed(path: Path, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
    """One safetensors file of tensors and JSON state, sealed by a sha256 over both."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    state_json = json.dumps(state)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": state_json, "sha256": digest(tensors, state_json),
                                               "bdvae_version": __version__})


def load_sealed(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The inverse of save_sealed, after checking the sha256; SafetensorError, OSError, KeyError
    or ValueError when the file is missing or damaged."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state_json, expected = meta["state"], meta["sha256"]
    if digest(tensors, state_json) != expected:
        raise ValueError("checksum mismatch")
    return tensors, json.loads(state_json)


def load(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and JSON state of a training state file, after checking its sha256."""
    try:
        return load_sealed(path)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise BdvaeError(f"{path}: damaged checkpoint ({first_line(e)})") from None


def pack(model: nn.Module, optimizer: torch.optim.Optimizer, pos: Position,
         generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Everything a resumed training needs to continue exactly, as (tensors, JSON state): weights,
    Adam's moments and step counts, the state of the generator training draws from, the epoch's
    data order and running sums, and the rows so far."""
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"optimizer.{i}.{name}": t for i, st in opt["state"].items() for name, t in st.items()}
    tensors |= {GENERATOR_KEY: generator.get_state(), "totals": pos.totals}
    if pos.order is not None:
        tensors["order"] = pos.order
    state = {"epoch": pos.epoch, "next_start": pos.next_start, "global_step": pos.global_step, "rows": pos.rows,
             "skipped": pos.skipped, "skipped_images": pos.skipped_images, "param_groups": opt["param_groups"],
             "generator_device": generator.device.type}
    return tensors, state


def unpack(tensors: dict[str, Tensor], state: dict[str, Any], model: nn.Module,
           optimizer: torch.optim.Optimizer, generator: torch.Generator | None) -> Position:
    """The inverse of pack: loads weights, optimizer and generator (None: the generator is left as
    it is, for a state drawn on another device); returns the position. The optimizer keeps its own
    implementation (fused or not), whichever saved the state. A state from another model or layout
    raises RuntimeError, KeyError, ValueError or TypeError."""
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = t
    own = [{k: group[k] for k in IMPLEMENTATION if k in group} for group in optimizer.param_groups]
    groups = [{**saved, **own[i]} if i < len(own) else saved for i, saved in enumerate(state["param_groups"])]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    for param, moments in optimizer.state.items():  # saved contiguous: the moments go back to the
        for name, t in moments.items():           # weights' layout (channels-last), as Adam made them
            if name != "step":                    # (the step count stays where Adam keeps it)
                moments[name] = torch.empty_like(param).copy_(t)
    if generator is not None:
        generator.set_state(tensors[GENERATOR_KEY])
    return Position(epoch=state["epoch"], next_start=state["next_start"], global_step=state["global_step"],
                    order=tensors.get("order"), totals=tensors["totals"].clone(), rows=state["rows"],
                    skipped=state["skipped"], skipped_images=state["skipped_images"])
