"""Where a training step runs (train.step), and the update of a step on the device.

On the host (a CPU's default) every step's loss and gradient norm come back to check them. On
the device (a GPU's default) nothing comes back between the progress, log and checkpoint points:
the step's flag makes fused Adam skip the update (`found_inf`), and DeferredChecks keeps the
counts there. On a CUDA device the update (forward, backward, gradient norm, Adam) is captured
once in a CUDA graph and replayed, as PyTorch's whole-network capture does, with an eager step
wherever capture is impossible; DeviceStep says which it used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bdvae.aggregates import CHECKED_ON_THE_HOST
from bdvae.config import Config, TrainConfig
from bdvae.distributed import Context
from bdvae.errors import BdvaeError, first_line
from bdvae.states import Position

WARMUP_STEPS = 3  # eager steps of the full batch on a side stream before the capture, as PyTorch's example


class NonFiniteError(BdvaeError):
    """A non-finite loss or gradient, with train.skip_nonfinite off."""


def place(train: TrainConfig, device: torch.device) -> str:
    """Where train.step runs the step on `device`: "host", "device" or "graph" (on the device,
    captured where it can be); "auto" is "graph" on a GPU and "host" on a CPU."""
    if train.step == "auto":
        return "host" if device.type == "cpu" else "graph"
    return train.step


def step_on_device(train: TrainConfig, device: torch.device) -> bool:
    """Whether train.step keeps the training step on `device`."""
    return place(train, device) != "host"


def make_optimizer(model: nn.Module, train: TrainConfig, on_device: bool) -> torch.optim.Adam:
    """Adam at train.lr; fused for a step on the device: one kernel for every parameter, and its
    `found_inf` flag makes a non-finite step no update without the host looking."""
    return torch.optim.Adam(model.parameters(), lr=train.lr, fused=True if on_device else None)


def step_parts(model: nn.Module, config: Config, device: torch.device, images: Tensor,
               generator: torch.Generator) -> tuple[bool, torch.optim.Adam, Tensor, torch.Generator]:
    """Where train.step puts the step on `device`, and its optimizer, training images and
    generator: with the step on a GPU, fused Adam, the images copied there once and a generator
    there seeded by train.seed; else the host's images and `generator` (the CPU's draws)."""
    on_device = step_on_device(config.train, device)
    if on_device and device.type != "cpu":
        images, generator = images.to(device), torch.Generator(device).manual_seed(config.train.seed)
    return on_device, make_optimizer(model, config.train, on_device), images, generator


def backward_shard(loss: nn.Module, x: Tensor, eps: Tensor, total: int, beta: float | Tensor, ctx: Context = Context(),
                   mixed_precision: bool = False, prior: Tensor | None = None, cache: bool = True) -> Tensor:
    """One step's loss and gradient, this rank's part: x (B_r, C, H, W) and its noise eps (B_r, D)
    are this rank's shard of a global batch of `total` images. `loss` is an Objective, under
    DistributedDataParallel when there are several ranks. Leaves in each parameter's .grad the
    gradient of the mean loss over the `total` images; returns the loss sums over them (3,), the
    same on every rank. `mixed_precision`: the forward under bf16 autocast (the loss terms are
    summed in fp32; `cache` False: without autocast's weight cache, as a CUDA graph's capture
    needs). `prior`: the global batch's N(0, I) draws (total, D), for an aggregate term that needs them."""
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=mixed_precision, cache_enabled=cache):
        sums = loss(x.to(ctx.device, memory_format=torch.channels_last), eps.to(ctx.device), beta, total,
                    None if prior is None else prior.to(ctx.device))
    # DDP averages the ranks' gradients; scaling each rank's sum by world_size / total makes that
    # average the gradient of the sum over all images divided by their number, whatever the shard sizes.
    (sums[0] * (ctx.world_size / total)).backward()
    return ctx.all_reduce_sum(sums.detach())  # in place: `sums` is not used after its backward


def nonfinite_message(step: int, loss: float, recon: float, reg: float, grad_norm: float) -> str:
    return f"step {step}: non-finite loss or gradient (loss={loss}, recon_nll={recon}, reg={reg}, gradient norm={grad_norm})"


def is_bad(sums: Tensor, grad_norm: Tensor) -> Tensor:
    """Whether a step's loss sums or gradient norm is NaN or infinite (bool, 0-dim, where they are)."""
    return ~(torch.isfinite(sums).all() & torch.isfinite(grad_norm))


class DeferredChecks:
    """The non-finite checks of a step on the device, where the host does not look at every step:
    device-side counts, and the first bad step's figures kept there. `settle` reads them (one host
    synchronisation) at the progress, log and checkpoint points and at the epoch's end, so a
    non-finite step is reported no later than the next one, before any training state is saved."""

    def __init__(self, device: torch.device):
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)  # first bad step (0: none), batches, images
        self.figures = torch.zeros(4, device=device)  # the first bad step's loss, recon_nll, reg means, gradient norm

    def record(self, step: int, sums: Tensor, grad_norm: Tensor, images: int) -> Tensor:
        """Note one step's loss sums (3,) and gradient norm over `images` images; its flag (bool, 0-dim)."""
        bad = is_bad(sums, grad_norm)
        first = bad & (self.counts[0] == 0)
        self.figures.copy_(torch.where(first, torch.cat([sums / images, grad_norm.reshape(1)]), self.figures))
        self.counts += torch.stack([first.long() * step, bad.long(), bad.long() * images])
        return bad

    def settle(self, pos: Position, skip: bool) -> None:
        """Raise NonFiniteError for the first bad step unless `skip`; else count the skipped batches into `pos`."""
        first_bad, batches, images = self.counts.tolist()
        if first_bad and not skip:
            raise NonFiniteError(nonfinite_message(first_bad, *self.figures.tolist()))
        pos.skipped += batches
        pos.skipped_images += images
        self.counts.zero_()


def capture_obstacle(config: Config, ctx: Context) -> str | None:
    """Why the update cannot be captured in a CUDA graph on ctx's device, or None."""
    if ctx.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if ctx.world_size > 1:
        return "CUDA graphs are not used with several processes"
    if config.objective.aggregate in CHECKED_ON_THE_HOST:
        return f"objective.aggregate = {config.objective.aggregate!r} checks its linear algebra on the host"
    return None


def device_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: nn.Module, config: Config, ctx: Context,
                mixed_precision: bool, log: Callable[[str], None] = lambda _: None) -> DeviceStep:
    """The DeviceStep train.step asks for: captured for "graph" (and "auto" on a GPU) where it can be."""
    capture = place(config.train, ctx.device) == "graph"
    return DeviceStep(model, optimizer, loss, ctx, mixed_precision, config.train.batch_size * ctx.world_size,
                      capture_obstacle(config, ctx) if capture else None, capture, log)


class DeviceStep:
    """A step's update on the device: loss, gradient, its norm, and fused Adam with the step's
    non-finite flag as found_inf (no update where it is set); (loss sums (3,), gradient norm).

    With `capture`, on one CUDA device: after WARMUP_STEPS eager steps of the full batch size on a
    side stream, the update is captured in a CUDA graph (static inputs, the learning rate and beta
    as device tensors, Adam capturable during the capture) and replayed for every batch of that
    size; the epoch's last, smaller batch runs eagerly. Where capture is impossible (a CPU, several
    processes, an operation that waits for the host) every step runs eagerly; `how` says which.
    `device_step` makes one as train.step asks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss: nn.Module, ctx: Context,
                 mixed_precision: bool, full: int, why_not: str | None, capture: bool,
                 log: Callable[[str], None] = lambda _: None):
        """`full`: the global batch size, the one captured; `why_not`: why it cannot be (capture_obstacle);
        `log` hears of the capture or why it failed."""
        self.model, self.optimizer, self.loss, self.ctx = model, optimizer, loss, ctx
        self.mixed_precision, self.full, self.log = mixed_precision, full, log
        self.why_not, self.capture = why_not, capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0  # eager steps of the full batch so far
        self.static: dict[str, Tensor] = {}
        self.out: tuple[Tensor, Tensor] | None = None

    @property
    def how(self) -> str:
        """What the run's facts and the log say: "CUDA graph", "eager" or "eager (why)"."""
        if self.graph is not None:
            return "CUDA graph"
        return "eager" if not self.capture else f"eager ({self.why_not or 'no full batch to capture'})"

    def update(self, x: Tensor, eps: Tensor, prior: Tensor | None, total: int, beta: float | Tensor,
               cache: bool = True) -> tuple[Tensor, Tensor]:
        """One eager update (or, under capture, the one captured)."""
        sums = backward_shard(self.loss, x, eps, total, beta, self.ctx, self.mixed_precision, prior, cache)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.found_inf = is_bad(sums, grad_norm).float()  # type: ignore[attr-defined]  # read by fused Adam
        self.optimizer.step()
        return sums, grad_norm

    def __call__(self, x: Tensor, eps: Tensor, prior: Tensor | None, total: int, beta: float,
                 lr: float) -> tuple[Tensor, Tensor]:
        """The update of one batch at learning rate `lr` (the optimizer's groups hold it too)."""
        if self.graph is not None and total == self.full:
            return self._replay(x, eps, prior, beta, lr)
        self.optimizer.zero_grad(set_to_none=True)  # grads from the graph's pool must not be added to
        if self.why_not is not None or not self.capture or total != self.full:
            return self.update(x, eps, prior, total, beta)
        if self.warm < WARMUP_STEPS:
            self.warm += 1
            return self._warm_up(x, eps, prior, total, beta, last=self.warm == WARMUP_STEPS)
        if self._capture(x, eps, prior, total, lr):
            return self._replay(x, eps, prior, beta, lr)
        return self.update(x, eps, prior, total, beta)

    def _warm_up(self, x: Tensor, eps: Tensor, prior: Tensor | None, total: int, beta: float,
                 last: bool) -> tuple[Tensor, Tensor]:
        """An eager update on a side stream, as before a capture; the `last` one under CUDA's sync
        debug mode, so that a step that waits for the host is found before it breaks a capture."""
        device = self.ctx.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with warnings.catch_warnings(record=True) as caught, torch.cuda.stream(side):
            warnings.simplefilter("always")
            mode = torch.cuda.get_sync_debug_mode()
            if last:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                out = self.update(x, eps, prior, total, beta)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream(device).wait_stream(side)
        waits = [w for w in caught if "synchroniz" in str(w.message)]
        if waits:
            self.why_not = f"the step waits for the host ({first_line(waits[0].message)})"
            self.log(f"the training step runs eagerly: {self.why_not}")
        for w in caught:
            if w not in waits:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out

    def _capture(self, x: Tensor, eps: Tensor, prior: Tensor | None, total: int, lr: float) -> bool:
        """Capture the update on static copies of this batch's inputs; False (and why_not) where it fails."""
        device = self.ctx.device
        self.static = {"x": x.clone(), "eps": eps.clone(), "beta": torch.zeros((), dtype=torch.float32, device=device),
                       "lr": torch.full((), lr, dtype=torch.float32, device=device)}  # fused Adam reads fp32
        if prior is not None:
            self.static["prior"] = prior.clone()
        groups = self.optimizer.param_groups
        saved = [(g["lr"], g["capturable"]) for g in groups]
        for g in groups:  # read from the device by every replay; set back to floats for the eager steps
            g["lr"], g["capturable"] = self.static["lr"], True
        graph, pool, stream = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle(), torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(graph, pool=pool):
                self.out = self.update(self.static["x"], self.static["eps"], self.static.get("prior"), total,
                                       self.static["beta"], cache=False)
        except Exception as e:  # an operation that cannot be captured, which the sync debug mode did not see
            _abandon_capture(device, pool, stream)
            self.why_not = f"capture failed: {first_line(e.__context__ or e)}"
            self.log(f"the training step runs eagerly: its {self.why_not}")
            self.static, self.out = {}, None
            self.optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            for g, (group_lr, capturable) in zip(groups, saved):
                g["lr"], g["capturable"] = group_lr, capturable
        self.graph = graph
        self.log("the training step is captured in a CUDA graph and replayed")
        return True

    def _replay(self, x: Tensor, eps: Tensor, prior: Tensor | None, beta: float, lr: float) -> tuple[Tensor, Tensor]:
        self.static["x"].copy_(x)
        self.static["eps"].copy_(eps)
        if prior is not None:
            self.static["prior"].copy_(prior)
        self.static["beta"].fill_(beta)
        self.static["lr"].fill_(lr)
        self.graph.replay()  # type: ignore[union-attr]
        return self.out  # type: ignore[return-value]


def _abandon_capture(device: torch.device, pool: tuple[int, int], stream: torch.cuda.Stream) -> None:
    """Undo what a capture that failed midway left: torch.cuda.graph's exit raises before it gives
    the stream and the allocator back (the allocator would go on routing to the graph's pool, and
    empty_cache would fail). As torch.cuda.memory.use_mem_pool ends its pool."""
    if torch.cuda.current_stream(device) == stream:
        return  # the capture did end (its body raised): the graph holds its pool and frees it when freed
    torch.cuda.set_stream(stream)
    index = device.index if device.index is not None else torch.cuda.current_device()
    for end in (torch._C._cuda_endAllocateToPool, torch._C._cuda_releasePool):
        try:
            end(index, pool)
        except RuntimeError:  # already ended, where capture_end got that far
            pass


def host_update(model: nn.Module, optimizer: torch.optim.Optimizer, loss: nn.Module, x: Tensor, eps: Tensor,
                prior: Tensor | None, total: int, beta: float, ctx: Context,
                mixed_precision: bool) -> tuple[Tensor, Tensor, bool]:
    """A step checked on the host: (loss sums (3,) on the CPU, gradient norm, whether it was
    finite). The update is made only when it was; the check costs one host synchronisation per
    step, which on a CPU (where ops run eagerly) is nearly free. After DDP's all-reduce every rank
    holds the same gradients and sums: all decide alike."""
    optimizer.zero_grad(set_to_none=True)
    sums = backward_shard(loss, x, eps, total, beta, ctx, mixed_precision, prior).cpu()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)  # NaN or inf if any gradient is
    finite = not bool(is_bad(sums, grad_norm.cpu()))
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)  # the batch is skipped: no update
    return sums, grad_norm, finite
