"""Data-parallel training on torch.distributed: one process per rank, launched by torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous) in each process's environment;
`setup` reads them and joins the process group (gloo on CPU, NCCL on CUDA). Without them the
context is a single process and every collective below is a no-op, so one code path trains both.

How a step is shared (train.train_epoch): every rank draws the same epoch permutation and the same
noise for the whole global batch (its RNGs stay in lockstep, seeded alike), then computes the
loss on its own contiguous part of that batch (`shard`). DistributedDataParallel averages the
gradients over the ranks, and each rank's loss is scaled so that this average is the gradient of
the mean over the global batch, even when the parts differ in size. The loss sums are all-reduced
every step, so every rank holds the epoch's metrics. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bdvae.devices import check_gpus, fast_bf16, resolve_device
from bdvae.errors import BdvaeError

ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")  # set by torchrun in every process it starts


@dataclass(frozen=True)
class Context:
    """This process's place in the job: its rank among `world_size` and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup joined the process group, so teardown leaves it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    def bf16_autocast(self, mixed_precision: bool) -> bool:
        """Whether training runs under bf16 autocast: train.mixed_precision asks for it, and it takes
        effect where bf16 is faster than fp32, CUDA GPUs of compute capability 8+ and CPUs with AMX
        (devices.fast_bf16)."""
        return mixed_precision and fast_bf16(self.device)

    def sync_buffers(self, module: nn.Module) -> None:
        """Every rank's buffers (BatchNorm's running statistics) set to rank 0's, in place."""
        if self.world_size == 1:
            return
        for buffer in module.buffers():
            sent = buffer.detach().to(self.device)
            torch.distributed.broadcast(sent, src=0)
            buffer.copy_(sent)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """The sum of `t` over the ranks, on t's device (NCCL reduces on the GPU, so a CPU tensor
        goes there and back); `t` itself in a single process."""
        if self.world_size == 1:
            return t
        buffer = t.to(self.device)
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
        return buffer.to(t.device)

    def gather_rows(self, t: Tensor, total: int) -> Tensor:
        """The rows of every rank's `t`, this rank's shard of a global batch of `total` rows, in rank
        order: the global batch (total, ...), differentiable (the gradient of each rank's rows
        sums what every rank's loss sends back to them); `t` itself in a single process. Shards
        may differ by a row (`shard`), so each is padded to the largest for the all-gather."""
        if self.world_size == 1:
            return t
        import torch.distributed.nn.functional as dist_fn

        sizes = [len(range(total)[shard(total, r, self.world_size)]) for r in range(self.world_size)]
        padded = torch.cat([t, t.new_zeros(max(sizes) - len(t), *t.shape[1:])])
        parts = dist_fn.all_gather(padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in ENV_VARS)


def is_main_process() -> bool:
    """Whether this process is rank 0 (or alone): the one that prints results."""
    return os.environ.get("RANK", "0") == "0" or not launched_by_torchrun()


def setup(device: str = "auto") -> Context:
    """The context of this process; joins torchrun's process group when launched by it."""
    if not launched_by_torchrun():
        return Context(device=resolve_device(device))
    try:
        rank, local_rank, world_size = (int(os.environ[v]) for v in ENV_VARS)
    except ValueError:
        raise BdvaeError(f"{', '.join(ENV_VARS)} must be integers (torchrun sets them)") from None
    check_gpus(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    ctx = Context(rank=rank, world_size=world_size, device=resolve_device(device, local_rank))
    if ctx.device.type == "cuda":  # this process's GPU (LOCAL_RANK), before anything (NCCL too) touches one
        torch.cuda.set_device(ctx.device)
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        # Rank 0 alone writes pictures and checkpoints (seconds) while the others wait; a peer that
        # died is noticed after this long.
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        ctx = dataclasses.replace(ctx, owns_group=True)
    return ctx


def teardown(ctx: Context) -> None:
    """Wait for every rank, then leave the process group `setup` joined (one a caller made is not
    destroyed; its ranks wait here all the same). The wait keeps a rank from exiting while rank 0
    still writes the run's last files: one that left first could take torchrun's worker down with
    it (gloo aborted so, now and then)."""
    if ctx.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def joined(device: str = "auto") -> Iterator[Context]:
    """`setup`, then `teardown` when the block ends normally. After an error the group is left to
    the process's exit, as torchrun stops the other ranks: leaving it while they may still be in a
    collective can hang (NCCL's in particular). A caller that catches the error and trains again
    in the same process trains in that group, which is then the caller's to destroy."""
    ctx = setup(device)
    yield ctx
    teardown(ctx)


def shard(n: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous part of a global batch of n items: sizes differ by at most one,
    the larger parts first, and the parts of ranks 0 .. world_size-1 tile range(n) in order."""
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def wrap(module: nn.Module, ctx: Context) -> nn.Module:
    """`module` under DistributedDataParallel when there are several ranks, else itself."""
    if ctx.world_size == 1:
        return module
    ddp = nn.parallel.DistributedDataParallel
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # No buffer is sent before each forward: log sigma never changes, and BatchNorm's running
    # statistics are used only by the test pass, which sets every rank's to rank 0's first
    # (Context.sync_buffers); a training forward normalises by its own batch.
    # torch 2.13 renamed the switch; older versions know only broadcast_buffers.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    for p in module.parameters():
        p.register_hook(_with_strides_of(p))
    return ddp(module, device_ids=device_ids, **no_sync)


def _with_strides_of(param: Tensor) -> Callable[[Tensor], Tensor]:
    """A gradient hook that gives `param`'s gradient `param`'s own strides where the two differ
    only in dimensions of size 1, which are then the same bytes (a view, no copy).
    A weight with one channel (the first convolution's, the image layer's) is contiguous and
    channels-last at once, and a kernel may return its gradient in either; DDP's bucket views
    take the parameter's strides and would warn, on every rank, that the two differ."""
    def hook(grad: Tensor) -> Tensor:
        same_bytes = all(n == 1 or a == b for n, a, b in zip(param.shape, grad.stride(), param.stride()))
        return grad.as_strided(param.shape, param.stride()) if same_bytes and grad.stride() != param.stride() else grad
    return hook


LAUNCHED = "BDVAE_LAUNCHED"  # set by `launch` in the processes it starts: they leave the reporting to it
# (__main__.py reads the same name without importing this module)


def report_error(message: str) -> None:
    """A worker's one-line error. Written into torchrun's error file for this process when there
    is one (torchrun's own report then names it); printed, prefixed by the rank when torchrun
    started several processes, unless `launch` started them: it prints the message once."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE") if launched_by_torchrun() else None
    if error_file:
        with open(error_file, "w", encoding="utf-8") as f:
            json.dump({"message": message, "timestamp": int(time.time()), "bdvae": True}, f)
        if os.environ.get(LAUNCHED):
            return
    several = launched_by_torchrun() and os.environ.get("WORLD_SIZE", "1") != "1"
    prefix = f"rank {os.environ['RANK']}: " if several else ""
    print(f"bdvae: error: {prefix}{message}", file=sys.stderr)


def launch(nproc: int, args: list[str]) -> None:
    """Run `bdvae ARGS` in `nproc` processes on this machine, through torchrun's own launcher
    (`torchrun --standalone --nproc-per-node NPROC -m bdvae ARGS`). Each process gets an equal share
    of the CPU cores as its threads unless OMP_NUM_THREADS says otherwise. A failed run becomes one
    line: the workers' own error (they write it to torchrun's error files), else the rank and exit
    status; Ctrl-C is a KeyboardInterrupt, as in one process."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHED] = "1"
    for name in list(logging.root.manager.loggerDict):  # torchrun's loggers each have their own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # failures and Ctrl-C are reported below
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "bdvae", *args]))
    except SignalException:
        raise KeyboardInterrupt from None
    except ChildFailedError as e:
        ours = sorted((rank, f.message) for rank, f in e.failures.items() if f.error_file_data.get("bdvae"))
        if ours:
            rank, message = ours[0]
            several = len({m for _, m in ours}) > 1
            raise BdvaeError(f"rank {rank}: {message}" if several else message) from None
        rank, failure = e.get_first_failure()
        raise BdvaeError(f"training with {nproc} processes stopped: rank {rank} exited with status "
                         f"{failure.exitcode}") from None
    finally:
        del os.environ[LAUNCHED]
