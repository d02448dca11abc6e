"""Issue 4's figures in one table: bdvae against pythae 0.1.2 and against the arithmetic.

Measured in one run, the contenders taking turns window by window so that their ratios hold on a
noisy machine:
- training images/s (median over the timed windows, after a warm-up window) of the reference
  model, batch 128, Adam, Bernoulli likelihood, 32x32 MNIST, each contender from the same initial
  weights: bdvae's real path (`train_epoch` with its progress bar, running sums, non-finite check
  and a training state every `checkpoint_every` steps, BD regularizer) with its default config
  ("bdvae": bf16 autocast where train.mixed_precision takes effect on this machine) and in given
  settings ("bdvae:fp32", "bdvae:bf16"); pythae 0.1.2's real path
  (`BaseTrainer.train_step`: its DataLoader over a `BaseDataset`, `VAE.forward` with its BCE + KL
  loss, Adam, `loss.item()` and its progress-bar callback); a minimal hand-written loop over the
  images held on the device, `X[perm[i:i+128]]` (bdvae's loss, Adam, nothing else), in fp32
  ("minimal") or under bf16 autocast where the device has native bf16 ("minimal:bf16"); on a CUDA
  GPU the same step (forward, backward, Adam with capturable=True) captured once in a CUDA graph and
  replayed ("captured", "captured:bf16"): the ceiling, with no Python or launch overhead left
  (reported as not applicable on the CPU);
- FLOPs per training image (torch.utils.flop_counter over one forward + backward of a batch) and the
  utilisation: achieved FLOP/s over the fp32 and the bf16 matmul rates measured in the same run,
  on the device the contenders train on (`--device cpu|cuda`; on CUDA every timed window is
  bracketed by torch.cuda.synchronize());
- importance samples/s of bdvae's IWAE (fp32, and bf16 autocast where the CPU has native bf16)
  against pythae's `VAE.get_nll` on the same trained weights with the same K, and how far the bf16
  estimate is from the fp32 one;
- the wall time and peak resident memory of `bdvae evaluate` on a trained run (a copy of it), and
  the peak resident memory of each contender's training, each in a fresh process.

pythae trains with KL where bdvae uses BD: both closed forms cost a few element-wise operations on
(128, 16) tensors against ~52 MFLOP of convolutions per image, nothing measurable. pythae's decoder
ends in a sigmoid and its loss is `F.binary_cross_entropy` on probabilities, bdvae's is the
BCE-with-logits of the same logits: the same function, one element-wise pass apart. Both wrap the
very modules `bdvae.model.build_model` makes, with the same initial (or trained) weights.

The benchmark has its own environment, so that pythae never becomes a dependency of bdvae:

    python3 -m venv benchmarks/.venv
    benchmarks/.venv/bin/pip install -r benchmarks/requirements.txt -e .
    benchmarks/.venv/bin/python benchmarks/performance.py          # ~15 min on 2 cores; benchmarks/performance.json
    benchmarks/.venv/bin/python benchmarks/performance.py --smoke  # ~30 s: every part runs, numbers meaningless

On a GPU, the training part alone, side by side with the CUDA-graph ceiling (benchmarks/gpu_check.sh
runs this, with the wheels pythae needs, on a machine that cannot download):

    python3 benchmarks/performance.py --device cuda --contenders bdvae,bdvae:fp32,pythae,minimal,minimal:bf16,captured,captured:bf16 \
        --skip-likelihood --skip-evaluate --rss-batches 0

Test-loss parity of a reduced-precision (or other) training setting against fp32, both trained
the same number of epochs from the same seed through bdvae's train_epoch (~3 min for bf16):

    benchmarks/.venv/bin/python benchmarks/performance.py parity --setting bf16 [--epochs 5]
    benchmarks/.venv/bin/python benchmarks/performance.py parity --setting fp32-plain  # bdvae's layers against plain ones

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import dataclasses
import json
import logging
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bdvae import rundir
from bdvae.api import Run, load_run
from bdvae.config import Config, DataConfig
from bdvae.data import Dataset, load_dataset
from bdvae.devices import fast_bf16, keep_freed_memory
from bdvae.distributed import Context
from bdvae.evaluation import EvalOptions, iwae_nll
from bdvae.likelihoods import LIKELIHOODS, binarized, to_float
from bdvae.kernels import ImageConvTranspose2d
from bdvae.model import VAE, build_model
from bdvae.objective import Objective, loss_terms
from bdvae.rundir import save_training_state
from bdvae.states import Position
from bdvae.steps import device_step, step_parts
from bdvae.training import evaluate_terms, train_epoch

DEFAULT_RUN = Path("runs/compare-bd-kl/runs/bhattacharyya-beta1-seed0")  # the default config, 10 epochs
# Training contenders: bdvae's train_epoch with its default config ("bdvae") or in a setting
# ("bdvae:SETTING"), pythae, a minimal loop and its CUDA-graph capture (each fp32 or ":bf16").
DEFAULT_CONTENDERS = ("bdvae", "bdvae:fp32", "pythae", "minimal")
LOOPS = ("minimal", "minimal:bf16", "captured", "captured:bf16")
PARITY_TOLERANCE = 0.01  # the bar: test loss within 1% of the fp32 result


# ----------------------------------------------------------------------------- training settings

# bdvae's training settings: train.mixed_precision off or on (bf16 autocast, where the hardware has
# bf16; see distributed.Context.bf16_autocast()), or train.step (host, device, graph) in the default
# precision. All train in channels-last layout, as bdvae does.
SETTINGS = {"fp32": {"mixed_precision": False}, "bf16": {"mixed_precision": True},
            "fp32-plain": {"mixed_precision": False}, "host": {"step": "host"}, "device": {"step": "device"},
            "graph": {"step": "graph"}}
PLAIN = {"fp32-plain"}  # settings whose model is in plain layers (plain_layers): bdvae's layer levers undone


def with_setting(config: Config, setting: str) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **SETTINGS[setting]))


def bdvae_default_precision(device: torch.device = torch.device("cpu"), config: Config = Config()) -> str:
    """What bdvae's default config trains in on `device`: "bf16" where train.mixed_precision
    takes effect (distributed.Context decides), else "fp32"."""
    return "bf16" if Context(device=device).bf16_autocast(config.train.mixed_precision) else "fp32"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA runs asynchronously, so a timed window must start
    and end with an idle GPU. The CPU computes eagerly and has nothing to wait for."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def not_applicable(name: str, device: torch.device) -> str | None:
    """Why contender `name` cannot run on `device`, or None."""
    if name.partition(":")[0] == "captured" and device.type != "cuda":
        return "needs CUDA (torch.cuda.graph)"
    return None


# ----------------------------------------------------------------------------- the contenders

class BdvaeContender:
    """bdvae's own training path: train_epoch over the window's images with a progress bar, the
    per-step checks and running sums, and a training state every checkpoint_every steps."""

    def __init__(self, base: VAE, config: Config, images: Tensor, run_dir: Path, setting: str | None = None,
                 device: torch.device = torch.device("cpu")):
        """`setting` None: `config` as it is, bdvae's default path; else with that setting. The
        images stay in host memory as uint8, as in a real training; each step copies its batch."""
        model = plain_layers(base) if setting in PLAIN else copy.deepcopy(base)
        self.model = model.to(device, memory_format=torch.channels_last)  # as training._setup and _fit do
        self.ctx = Context(device=device)
        keep_freed_memory()  # as training._fit does: this process's malloc keeps freed activations
        config = config if setting is None else with_setting(config, setting)
        generator = torch.Generator().manual_seed(config.train.seed)  # data order, binarization, noise
        # As training._fit: train.step decides where the images, the draws and the checks are, and
        # whether the update is captured (once, kept across windows as across a run's epochs).
        on_device, self.optimizer, self.images, self.generator = step_parts(self.model, config, device, images, generator)
        self.loss = Objective(self.model, config.objective)
        self.update = (device_step(self.model, self.optimizer, self.loss, config, self.ctx,
                                   self.ctx.bf16_autocast(config.train.mixed_precision)) if on_device else None)
        self.config, self.run_dir = config, run_dir
        self.pos = Position()  # global_step carries over windows, so states are saved at the real rate
        self.model.train()

    def window(self, batches: int) -> float:
        """Train on the first `batches` batches of the images as one epoch; images per second."""
        images = self.images[: batches * self.config.train.batch_size]
        pos, every = self.pos, self.config.train.checkpoint_every
        pos.order, pos.next_start = None, 0  # a new epoch over the window's images

        def after_step() -> None:
            if every and pos.global_step % every == 0:
                save_training_state(self.run_dir, self.model, self.optimizer, pos, self.generator)

        synchronize(self.ctx.device)
        t0 = time.perf_counter()
        with tqdm(total=len(images), desc="bdvae", unit="img", leave=False, disable=False) as bar:
            train_epoch(self.model, self.optimizer, images, self.config, bar, pos, self.generator, after_step, self.ctx,
                        self.loss, device_step=self.update)
        synchronize(self.ctx.device)
        return len(images) / (time.perf_counter() - t0)


class MinimalContender:
    """The arithmetic alone: bdvae's loss, backward and an Adam step, the images held on the device
    (uint8) and each batch gathered there as `X[perm[i:i+B]]` from a fresh permutation per window.
    `bf16`: the forward under bf16 autocast where the device computes bf16 natively (as bdvae's
    train.mixed_precision), else fp32."""

    def __init__(self, base: VAE, config: Config, images: Tensor, device: torch.device = torch.device("cpu"),
                 bf16: bool = False):
        self.model = copy.deepcopy(base).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.train.lr)
        self.config, self.images, self.device = config, images.to(device), device
        self.bf16 = bf16 and fast_bf16(device)
        self.model.train()

    def step(self, x: Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = loss_terms(self.model, to_float(x), self.config.objective).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def window(self, batches: int) -> float:
        batch = self.config.train.batch_size
        synchronize(self.device)
        t0 = time.perf_counter()
        perm = torch.randperm(len(self.images), device=self.device)
        for i in range(0, batches * batch, batch):
            self.train_on(perm[i: i + batch])
        synchronize(self.device)
        return batches * batch / (time.perf_counter() - t0)

    def train_on(self, indices: Tensor) -> None:
        """One step on the images at `indices` (on the device)."""
        self.step(self.images[indices])  # (B, C, H, W) uint8, on the device


class CapturedContender(MinimalContender):
    """The minimal loop's step (forward, backward, Adam with capturable=True) captured once in a
    CUDA graph and replayed, as the whole-network capture example of PyTorch's CUDA semantics
    notes does: static input tensors, warm-up steps on a side stream, g.replay(). No Python, no
    kernel launches and no allocator left per step: the ceiling of this model at this batch size.
    Only the gather of the batch into the static input runs outside the graph."""

    def __init__(self, base: VAE, config: Config, images: Tensor, device: torch.device, bf16: bool = False):
        super().__init__(base, config, images, device, bf16)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.train.lr, capturable=True)
        batch = config.train.batch_size
        self.static_x = self.images[:batch].clone()  # (B, C, H, W) uint8: the graph's input
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: cuDNN's choices, Adam's state, the allocator's pools
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self.step(self.static_x)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward makes .grad in the graph's private pool
        with torch.cuda.graph(self.graph):
            self.step(self.static_x)  # the noise eps too is drawn in the graph, anew at every replay

    def step(self, x: Tensor) -> None:
        # Autocast's weight cache must be off under capture (PyTorch's CUDA graphs notes).
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            loss = loss_terms(self.model, to_float(x), self.config.objective).loss
        loss.backward()
        self.optimizer.step()  # no zero_grad: the captured backward writes the same .grad tensors anew

    def train_on(self, indices: Tensor) -> None:
        torch.index_select(self.images, 0, indices, out=self.static_x)
        self.graph.replay()


def import_pythae():
    """pythae's modules, or a clear exit where the benchmark's environment is missing."""
    try:
        import pythae  # noqa: F401
    except ImportError:
        sys.exit("pythae is not installed here: run this in the benchmark's environment (see the docstring: "
                 "python3 -m venv benchmarks/.venv && benchmarks/.venv/bin/pip install -r benchmarks/requirements.txt -e .)")
    for name in ("pythae", "pythae.models.base.base_model", "pythae.trainers.base_trainer.base_trainer"):
        logging.getLogger(name).setLevel(logging.WARNING)  # its INFO lines would break up the table
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE as PythaeVAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    return BaseDataset, PythaeVAE, VAEConfig, ModelOutput, BaseDecoder, BaseEncoder, BaseTrainer, BaseTrainerConfig


def plain_layers(module: nn.Module) -> nn.Module:
    """A copy of `module` in the layers a pythae user writes: nn.ConvTranspose2d for bdvae's image
    layer (the same weights, oneDNN's own kernel) and ReLUs that are not in place."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, ImageConvTranspose2d):
            m.__class__ = nn.ConvTranspose2d  # the same attributes and parameters
        elif isinstance(m, nn.ReLU):
            m.inplace = False
    return module


def pythae_vae(model: VAE):
    """pythae's VAE around copies of bdvae's encoder and decoder in plain layers (plain_layers): the
    same architecture and weights. Its loss wants probabilities, so the decoder ends in a sigmoid."""
    _, PythaeVAE, VAEConfig, ModelOutput, BaseDecoder, BaseEncoder, _, _ = import_pythae()

    class Encoder(BaseEncoder):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: Tensor):
            mu, logvar = self.net(x).chunk(2, dim=1)  # as bdvae's VAE.encode
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, z: Tensor):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    latent_dim = model.encoder[-1].out_features // 2
    shape = tuple(model.decoder(torch.zeros(1, latent_dim)).shape[1:])
    config = VAEConfig(input_dim=shape, latent_dim=latent_dim, reconstruction_loss="bce")
    return PythaeVAE(config, encoder=Encoder(plain_layers(model.encoder)), decoder=Decoder(plain_layers(model.decoder)))


class PythaeContender:
    """pythae's own training path: BaseTrainer.train_step, i.e. its DataLoader over a BaseDataset
    (one item at a time, collated), VAE.forward (BCE + KL), zero_grad/backward/Adam step,
    loss.item() and its progress-bar callback. The BaseDataset holds the whole training set as
    floats, as pythae's users give it; each window's loader covers its first batches."""

    def __init__(self, base: VAE, config: Config, data: Dataset, out_dir: Path,
                 device: torch.device = torch.device("cpu")):
        """On a CUDA `device` pythae's trainer moves the model there and each batch as it comes
        (its `no_cuda=False`, with the current CUDA device)."""
        BaseDataset, _, _, _, _, _, BaseTrainer, BaseTrainerConfig = import_pythae()
        self.dataset = BaseDataset(to_float(data.train_images), data.train_labels)
        self.model = pythae_vae(base)
        training = BaseTrainerConfig(output_dir=str(out_dir), per_device_train_batch_size=config.train.batch_size,
                                     num_epochs=1, learning_rate=config.train.lr, optimizer_cls="Adam",
                                     no_cuda=device.type != "cuda")
        self.trainer = BaseTrainer(self.model, self.dataset, training_config=training)
        self.trainer.prepare_training()  # seed, Adam, output folder, callbacks (as BaseTrainer.train does)
        self.batch, self.epoch, self.loaders, self.device = config.train.batch_size, 0, {}, device

    def window(self, batches: int) -> float:
        if batches not in self.loaders:
            subset = torch.utils.data.Subset(self.dataset, range(batches * self.batch))
            self.loaders[batches] = self.trainer.get_train_dataloader(subset)  # pythae's own loader settings
        self.trainer.train_loader = self.loaders[batches]
        self.epoch += 1
        synchronize(self.device)
        t0 = time.perf_counter()
        self.trainer.train_step(self.epoch)
        self.trainer.callback_handler.on_epoch_end(training_config=self.trainer.training_config)  # closes its bar
        synchronize(self.device)
        return batches * self.batch / (time.perf_counter() - t0)


def training_setup(seed: int = 0) -> tuple[Config, Dataset, VAE]:
    """The default config (reference model, batch 128, Adam 1e-3, Bernoulli, BD), the full MNIST
    and the freshly initialised model every contender copies."""
    config = Config()
    data = load_dataset(config.data, log=lambda _: None)
    torch.manual_seed(seed)
    return config, data, build_model(config.model, config.objective, data.shape)


def check_contender(name: str) -> str:
    """`name` if it is a contender: pythae, minimal[:bf16], captured[:bf16], bdvae or bdvae:SETTING."""
    kind, _, setting = name.partition(":")
    if not (name in ("pythae", "bdvae", *LOOPS) or (kind == "bdvae" and setting in SETTINGS)):
        raise argparse.ArgumentTypeError(f"unknown contender {name!r}; valid: pythae, {', '.join(LOOPS)}, bdvae, "
                                         + ", ".join(f"bdvae:{s}" for s in SETTINGS))
    return name


def precision(name: str, device: torch.device) -> str:
    """The arithmetic contender `name` trains in on `device`: "fp32" or "bf16" (autocast)."""
    kind, _, setting = name.partition(":")
    if kind == "pythae":
        return "fp32"  # its trainer's amp option is fp16 autocast, and it turns that off for a BCE loss
    if kind == "bdvae" and "mixed_precision" not in SETTINGS.get(setting, {}):
        return bdvae_default_precision(device)
    return "bf16" if setting == "bf16" and fast_bf16(device) else "fp32"


def label(name: str, device: torch.device = torch.device("cpu")) -> str:
    kind, _, setting = name.partition(":")
    arithmetic = precision(name, device)
    if setting == "bf16" and arithmetic != "bf16":
        arithmetic = "fp32 (no native bf16 here)"
    elif arithmetic == "bf16":
        arithmetic = "bf16 autocast"
    what = {"pythae": "pythae BaseTrainer.train_step", "minimal": "minimal loop",
            "captured": "minimal step in a CUDA graph"}.get(kind, "bdvae train_epoch")
    step = f", train.step = {SETTINGS[setting]['step']}" if "step" in SETTINGS.get(setting, {}) else ""
    return f"{what}, {'default config: ' if kind == 'bdvae' and not setting else ''}{arithmetic}{step}"


def make_contender(name: str, config: Config, data: Dataset, base: VAE, tmp: Path,
                   device: torch.device = torch.device("cpu")):
    folder = tmp / name.replace(":", "-")
    folder.mkdir(parents=True, exist_ok=True)
    kind, _, setting = name.partition(":")
    if kind == "pythae":
        return PythaeContender(base, config, data, folder, device)
    if kind in ("minimal", "captured"):
        loop = CapturedContender if kind == "captured" else MinimalContender
        return loop(base, config, data.train_images, device, bf16=setting == "bf16")
    return BdvaeContender(base, config, data.train_images, folder, setting or None, device)


def training_rates(names: list[str], windows: int, batches: int, warmup: int,
                   device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Images/s of each contender in `windows` timed windows of `batches` steps, taking turns (the
    order rotates each window), after one warm-up window each. Each contender lives in a process of
    its own (`window-child`), idle while another one's window runs: what one sets process-wide
    (bdvae its malloc thresholds, say) must not reach the others."""
    children = {}
    try:
        for name in names:  # one after another: the warm-ups do not overlap
            cmd = [sys.executable, str(Path(__file__).resolve()), "window-child", name, "--warmup", str(warmup),
                   "--device", str(device)]
            children[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            _child_line(children[name], name)  # "ready"
        rates: dict[str, list[float]] = {name: [] for name in names}
        for w in range(windows):
            for name in names[w % len(names):] + names[: w % len(names)]:
                print(batches, file=children[name].stdin, flush=True)
                rates[name].append(float(_child_line(children[name], name)))
        return rates
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait()


def _child_line(child: subprocess.Popen, name: str) -> str:
    line = child.stdout.readline()
    if not line:
        raise RuntimeError(f"the {name} contender's process ended (exit {child.wait()}); its error is above")
    return line.strip()


def window_child(args: argparse.Namespace) -> None:
    """Internal: one contender in this process; a window of N steps for each line N on stdin, its
    images/s on stdout. The progress bars go to stderr."""
    config, data, base = training_setup()
    with tempfile.TemporaryDirectory() as tmp:
        contender = make_contender(args.name, config, data, base, Path(tmp), torch.device(args.device))
        contender.window(args.warmup)
        print("ready", flush=True)
        for line in sys.stdin:
            print(contender.window(int(line)), flush=True)


def flops_per_image(batch: int = 128) -> float:
    """FLOPs of one training step (forward + backward) of the reference model per image, counted
    by torch.utils.flop_counter on a batch of real images (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    config, data, base = training_setup()
    x = to_float(data.train_images[:batch])
    with FlopCounterMode(display=False) as counter:
        loss_terms(base, x, config.objective).loss.backward()
    return counter.get_total_flops() / batch


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 7,
                  device: torch.device = torch.device("cpu")) -> list[float]:
    """GFLOP/s of n x n matmuls in `dtype` on `device`, each timed alone after a warm-up (with
    torch's default precision settings: no TF32 for fp32 matmuls on CUDA)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    rates = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


# ----------------------------------------------------------------------------- likelihood

def test_images(run: Run, n: int) -> Tensor:
    """The first n test images as `bdvae evaluate` scores them (binarized once for binarized models)."""
    data = load_dataset(DataConfig(**{**run.config.data.__dict__, "test_size": max(n, 16)}), log=lambda _: None)
    x = to_float(data.test_images)
    if LIKELIHOODS[run.config.objective.likelihood].binarize:
        x = binarized(x, torch.Generator().manual_seed(0))
    return x[:n]


def bdvae_iwae(run: Run, x: Tensor, k: int, precision: str, seed: int) -> tuple[Tensor, float]:
    """-ln p(x) per image by bdvae's IWAE (as `bdvae evaluate` calls it), and samples per second."""
    t0 = time.perf_counter()
    nll = iwae_nll(run, x, EvalOptions(k=k, dtype=precision), torch.Generator().manual_seed(seed), progress=False)
    return nll, len(x) * k / (time.perf_counter() - t0)


def pythae_nll(model, x: Tensor, k: int, batch: int, seed: int, no_grad: bool = False) -> tuple[float, float]:
    """pythae's estimate -ln p(x), averaged over the images, and samples per second. get_nll sets
    no gradient mode of its own, so a plain call records the autograd graph; `no_grad` calls it
    under torch.no_grad() instead. (Despite its name get_nll returns the mean of ln p(x).)"""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        log_p = model.get_nll(x, n_samples=k, batch_size=batch)
    return -float(log_p), len(x) * k / (time.perf_counter() - t0)


def pythae_child(args: argparse.Namespace) -> None:
    """Internal: pythae's get_nll on the saved images in this fresh process, as called and under
    no_grad, after a warm-up; prints {"nll", "rate", "rate_no_grad"} as JSON."""
    model = pythae_vae(load_run(args.run).model)  # the trained weights
    model.eval()
    x = torch.load(args.images)
    pythae_nll(model, x[:1], args.k, args.batch, 0)
    nll, rate = pythae_nll(model, x, args.k, args.batch, args.seed)
    print(json.dumps({"nll": nll, "rate": rate, "rate_no_grad": pythae_nll(model, x, args.k, args.batch, args.seed, no_grad=True)[1]}))


def likelihood_figures(run_dir: Path, k: int, images: int, pythae_images: int, rounds: int,
                       pythae_batch: int, accuracy_images: int) -> dict:
    """IWAE throughput of bdvae (fp32, and bf16 where the CPU has native bf16: emulated, it would
    take hours) and pythae's get_nll on the same weights, alternating round by round; and the bf16
    estimate against the fp32 one with the same draws. pythae runs in a fresh process each time
    (`pythae-child`): bdvae's IWAE sets this process's malloc thresholds (devices.keep_freed_memory),
    which would speed pythae up too."""
    run = load_run(run_dir)
    x = test_images(run, max(images, pythae_images, accuracy_images))
    precisions = ["fp32", "bf16"] if bdvae_default_precision() == "bf16" else ["fp32"]
    rates: dict[str, list[float]] = {**{f"bdvae {p}": [] for p in precisions}, "pythae get_nll": [],
                                     "pythae get_nll, no_grad": []}
    with tempfile.TemporaryDirectory() as tmp:
        images_file = Path(tmp) / "pythae-images.pt"
        torch.save(x[:pythae_images].clone(), images_file)

        def pythae(seed: int) -> dict[str, float]:
            cmd = [sys.executable, str(Path(__file__).resolve()), "pythae-child", str(run_dir), str(images_file),
                   "--k", str(k), "--batch", str(pythae_batch), "--seed", str(seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise RuntimeError(f"pythae's get_nll process failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            return json.loads(proc.stdout)

        for precision in precisions:  # warm-ups
            bdvae_iwae(run, x[:2], k, precision, 0)
        for r in range(rounds):
            for precision in precisions:
                rates[f"bdvae {precision}"].append(bdvae_iwae(run, x[:images], k, precision, r)[1])
            theirs = pythae(r)
            rates["pythae get_nll"].append(theirs["rate"])
            rates["pythae get_nll, no_grad"].append(theirs["rate_no_grad"])
        # The same estimate by both on pythae's images: they should differ as two seeds of one do.
        pythae_value = pythae(1000)["nll"]
    bdvae_value, bdvae_other_seed = (bdvae_iwae(run, x[:pythae_images], k, "fp32", seed)[0].mean().item()
                                     for seed in (1000, 1001))
    figures = {
        "run": str(run_dir), "k": k, "images": images, "pythae_images": pythae_images, "pythae_batch_size": pythae_batch,
        "importance_samples_per_second": rates,
        "medians": {name: statistics.median(v) for name, v in rates.items()},
        "nll_on_pythae_images": {"bdvae fp32": bdvae_value, "bdvae fp32, another seed": bdvae_other_seed,
                                 "pythae get_nll": pythae_value},
    }
    if "bf16" in precisions:  # bf16 against fp32 with the same seed, hence the same draws: only the arithmetic differs
        fp32 = bdvae_iwae(run, x[:accuracy_images], k, "fp32", 2000)[0].double()
        bf16 = bdvae_iwae(run, x[:accuracy_images], k, "bf16", 2000)[0].double()
        figures["bf16_vs_fp32"] = {"images": accuracy_images, "nll_fp32": fp32.mean().item(),
                                   "nll_bf16": bf16.mean().item(), "mean_difference": (bf16 - fp32).mean().item(),
                                   "max_abs_difference": (bf16 - fp32).abs().max().item()}
    return figures


# ----------------------------------------------------------------------------- processes

PEAK_MARKER = "peak resident memory (VmHWM), KiB:"


def report_peak_at_exit() -> None:
    """Make this process print its peak resident memory as the last line of stderr when it exits.
    VmHWM of /proc/self/status, not ru_maxrss: Linux starts a child's ru_maxrss at its parent's
    RSS at the fork, which would give every child at least the size of this benchmark's process."""
    def report() -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                print(f"{PEAK_MARKER} {line.split()[1]}", file=sys.stderr, flush=True)

    atexit.register(report)


def measured(args: list[str]) -> dict:
    """Run this script with `args` (a child mode that reports its peak) to the end: wall seconds,
    peak resident memory in GiB, and its output. A RuntimeError with the child's last words on failure."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()[-3000:]}")
    peaks = [line for line in proc.stderr.splitlines() if line.startswith(PEAK_MARKER)]
    peak = int(peaks[-1].rsplit(None, 1)[1]) / 2**20 if peaks else math.nan  # no /proc: not Linux
    return {"wall_seconds": wall, "peak_rss_gib": peak, "stdout": proc.stdout}


def training_peak_rss(name: str, batches: int, device: torch.device = torch.device("cpu")) -> float:
    """Peak resident memory (GiB) of a fresh process that loads the data and trains `batches`
    steps by contender `name`, as a real training holds it (the whole training set in memory)."""
    return measured(["train-child", name, "--batches", str(batches), "--device", str(device)])["peak_rss_gib"]


def evaluate_command(run_dir: Path, k: int, test_size: int | None, extra: list[str]) -> dict:
    """`bdvae evaluate` on a copy of the run (the run's own metrics.json is left alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy_dir = Path(tmp) / run_dir.name
        copy_dir.mkdir()
        for name in rundir.FINISHED:
            shutil.copy2(run_dir / name, copy_dir / name)
        cmd = ["bdvae", "evaluate", str(copy_dir), "-k", str(k), "--quiet", *extra]
        if test_size is not None:
            cmd += ["--test-size", str(test_size)]
        result = measured(cmd)  # `python -m bdvae evaluate ...`, run in this script's "bdvae" mode
        metrics = json.loads((copy_dir / "metrics.json").read_text())
    return {"run": str(run_dir), "k": k, "test_images": metrics["test_images"], "extra_args": extra,
            "wall_seconds": result["wall_seconds"], "peak_rss_gib": result["peak_rss_gib"],
            "iwae_nll": metrics["iwae_nll"]["mean"],
            "iwae_importance_samples_per_second": metrics["iwae_nll"]["importance_samples_per_second"]}


# ----------------------------------------------------------------------------- report

def machine(device: torch.device = torch.device("cpu")) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": str(device),
            "bdvae_default_training_precision": bdvae_default_precision(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    # torch's defaults, which every contender trains with: TF32 convolutions, fp32 matmuls
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split())
        info["bf16_units"] = sorted(flags & {"avx512_bf16", "amx_bf16"})
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or platform.machine()
    try:
        from importlib.metadata import version
        info["pythae"] = version("pythae")
    except Exception:  # not installed: the pythae figures are missing too
        info["pythae"] = None
    return info


def ratios(medians: dict[str, float], device: torch.device) -> dict[str, dict[str, float]]:
    """Each contender's median images/s over pythae's, over the minimal loop's in the same
    arithmetic, and over the captured step's in the same arithmetic (the ceiling), where measured."""
    def same(kind: str, name: str) -> str | None:
        return next((other for other in medians if other.partition(":")[0] == kind
                     and precision(other, device) == precision(name, device)), None)

    out = {}
    for name, rate in medians.items():
        row = {"pythae": rate / medians["pythae"]} if "pythae" in medians else {}
        for kind in ("minimal", "captured"):
            if (other := same(kind, name)) is not None:
                row[kind] = rate / medians[other]
        out[name] = row
    return out


def table(results: dict) -> str:
    rows: list[tuple[str, str, str]] = []
    train = results.get("training")
    device = torch.device(results["machine"].get("device", "cpu"))
    if train:
        med, fpi = train["medians"], results["flops_per_image"]
        fp32, bf16 = results["matmul_gflops"]["fp32_median"], results["matmul_gflops"]["bf16_median"]
        for name, values in train["rates"].items():
            util = med[name] * fpi / 1e9
            of_bf16 = f", {util / bf16:.0%} of bf16" if bf16 > fp32 else ""  # else emulated bf16: no yardstick
            rows.append((f"train img/s, {label(name, device)}", f"{med[name]:,.0f}",
                         f"{util / fp32:.0%} of fp32{of_bf16} matmul; windows " + ", ".join(f"{v:,.0f}" for v in values)))
        for name, why in train.get("not_applicable", {}).items():
            rows.append((f"train img/s, {label(name, device)}", "n/a", why))
        for name, r in train.get("ratios", {}).items():
            if any(k != name.partition(":")[0] for k in r):  # a yardstick other than itself
                rows.append((f"  {name} against pythae / minimal / captured",
                             " / ".join(f"{r[k]:.2f}x" if k in r else "-" for k in ("pythae", "minimal", "captured")),
                             "median over median; the minimal loop and the captured step in the same arithmetic"))
        for name in med if device.type == "cpu" else ():  # the CPU issue's targets
            if name.startswith("bdvae") and "pythae" in med:
                rows.append((f"  {name} / pythae", f"{med[name] / med['pythae']:.2f}x",
                             "target >= 1.5x with the test loss within 1% of fp32 (see `parity`)"))
        if "minimal" in med and "bdvae:fp32" in med and device.type == "cpu":
            rows.append(("  bdvae:fp32 / minimal loop", f"{med['bdvae:fp32'] / med['minimal']:.3f}",
                         "bdvae's own overhead and its kept heap (the minimal loop has glibc's default), both fp32"))
        rows.append(("FLOP per training image (fwd + bwd)", f"{fpi / 1e6:.1f} M", "torch.utils.flop_counter, batch 128"))
        fp32_n, bf16_n = results["matmul_gflops"].get("fp32_n", 2048), results["matmul_gflops"].get("bf16_n", 2048)
        rows.append(("matmul GFLOP/s, fp32 / bf16", f"{fp32:.0f} / {bf16:.{0 if bf16 > 10 else 2}f}",
                     f"{fp32_n} x {fp32_n} / {bf16_n} x {bf16_n}, median of 7, this run, {device.type}"))
    if "peak_rss_gib" in results:
        rss = results["peak_rss_gib"]
        rows.append(("peak RSS of training, GiB", " / ".join(f"{rss[n]:.2f}" for n in rss), " / ".join(rss)))
    lik = results.get("likelihood")
    if lik:
        med = lik["medians"]
        rows.append((f"IWAE samples/s, bdvae fp32, K={lik['k']}", f"{med['bdvae fp32']:,.0f}",
                     ", ".join(f"{v:,.0f}" for v in lik["importance_samples_per_second"]["bdvae fp32"])))
        if "bdvae bf16" in med:
            rows.append(("IWAE samples/s, bdvae bf16", f"{med['bdvae bf16']:,.0f}",
                         ", ".join(f"{v:,.0f}" for v in lik["importance_samples_per_second"]["bdvae bf16"])))
        for name in ("pythae get_nll", "pythae get_nll, no_grad"):
            rows.append((f"{name} samples/s (batch {lik['pythae_batch_size']})", f"{med[name]:,.0f}",
                         f"{lik['pythae_images']} images; "
                         + ", ".join(f"{v:,.0f}" for v in lik["importance_samples_per_second"][name])))
        pythae_best = max(med["pythae get_nll"], med["pythae get_nll, no_grad"])
        rows.append(("  bdvae fp32 / pythae's faster", f"{med['bdvae fp32'] / pythae_best:.1f}x", "target >= 3x"))
        if "bdvae bf16" in med:
            rows.append(("  bdvae bf16 / pythae's faster", f"{med['bdvae bf16'] / pythae_best:.1f}x", ""))
        same = lik["nll_on_pythae_images"]
        rows.append(("  -ln p(x) on pythae's images, bdvae / pythae", f"{same['bdvae fp32']:.2f} / {same['pythae get_nll']:.2f}",
                     f"the same estimator; bdvae with another seed: {same['bdvae fp32, another seed']:.2f}"))
        if acc := lik.get("bf16_vs_fp32"):
            rows.append(("  bf16 - fp32 IWAE -ln p(x), nats", f"{acc['mean_difference']:+.4f}",
                         f"mean over {acc['images']} images, same draws; largest |difference| {acc['max_abs_difference']:.4f}"))
    ev = results.get("evaluate")
    if ev:
        rows.append((f"bdvae evaluate, {ev['test_images']:,} images, K={ev['k']}", f"{ev['wall_seconds']:.0f} s",
                     f"target < 600 s (all 10,000, K=1000); IWAE {ev['iwae_importance_samples_per_second']:,.0f} samples/s; "
                     f"peak RSS {ev['peak_rss_gib']:.2f} GiB"))
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    m = results["machine"]
    head = f"{m.get('cpu')}, {m['threads']} threads, torch {m['torch']}, pythae {m.get('pythae')}"
    if "gpu" in m:
        head = f"{m['gpu']} (CUDA {m['cuda']}, compute capability {m['compute_capability']}); host: " + head
    return head + "\n" + "\n".join(f"{a:<{width}}  {b:>{value_width}}  {c}" for a, b, c in rows)


# ----------------------------------------------------------------------------- modes

def check_inputs(args: argparse.Namespace) -> None:
    """What the parts asked for need, checked before the first one starts (minutes of timing
    must not end in a missing run): the trained run of the likelihood and evaluate parts, and
    pythae where it is timed, a GPU for --device cuda. One line and exit 2 otherwise."""
    from bdvae.errors import BdvaeError

    needs_run = [part for part, skip in (("likelihood", args.skip_likelihood), ("evaluate", args.skip_evaluate))
                 if not skip]
    try:
        if needs_run:
            rundir.check_finished(args.run)
    except BdvaeError as e:
        sys.exit(f"performance.py: {e}; the {' and '.join(needs_run)} part(s) need a trained run: give --run RUN "
                 f"(e.g. one trained by `bdvae train`), or --skip-{' --skip-'.join(needs_run)}")
    if ("pythae" in args.contenders and not args.skip_training) or not args.skip_likelihood:
        import_pythae()
    if args.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("performance.py: --device cuda, but torch sees no CUDA GPU here (a CPU build of torch?)")


def benchmark(args: argparse.Namespace) -> None:
    """Every part asked for, in turn. A part that fails ends the run, but what the parts before it
    measured is printed and written first, with the failure."""
    check_inputs(args)
    device = args.device
    results: dict = {"machine": machine(device), "args": {k: v for k, v in vars(args).items() if k != "func"}}
    skipped = {n: why for n in args.contenders if (why := not_applicable(n, device))}
    names = [n for n in args.contenders if n not in skipped]

    def training() -> None:
        rates = training_rates(names, args.windows, args.batches, args.warmup, device)
        medians = {n: statistics.median(v) for n, v in rates.items()}
        results["training"] = {"device": str(device), "batches_per_window": args.batches, "batch_size": 128,
                               "labels": {n: label(n, device) for n in args.contenders},
                               "rates": rates, "medians": medians, "ratios": ratios(medians, device),
                               "not_applicable": skipped}
        results["flops_per_image"] = flops_per_image()  # counted on the CPU: the same operations anywhere
        # Emulated bf16 (no native bf16 here) runs at a fraction of a GFLOP/s: a smaller matrix
        # shows that in a second instead of minutes. A GPU needs larger ones to be kept busy.
        fp32_n = 8192 if device.type == "cuda" else 2048
        bf16_n = fp32_n if bdvae_default_precision(device) == "bf16" else 256
        fp32 = matmul_gflops(torch.float32, n=fp32_n, device=device)
        bf16 = matmul_gflops(torch.bfloat16, n=bf16_n, device=device)
        results["matmul_gflops"] = {"fp32": fp32, "bf16": bf16, "fp32_median": statistics.median(fp32),
                                    "bf16_median": statistics.median(bf16), "fp32_n": fp32_n, "bf16_n": bf16_n}
        if args.rss_batches:
            results["peak_rss_gib"] = {name: training_peak_rss(name, args.rss_batches, device) for name in names}

    def likelihood() -> None:
        results["likelihood"] = likelihood_figures(args.run, args.k, args.iwae_images, args.pythae_images,
                                                   args.iwae_rounds, args.pythae_batch, args.accuracy_images)

    def evaluate() -> None:
        results["evaluate"] = evaluate_command(args.run, args.evaluate_k, args.evaluate_test_size, args.evaluate_arg or [])

    parts = [(name, part) for name, part, skip in (("training", training, args.skip_training),
                                                  ("likelihood", likelihood, args.skip_likelihood),
                                                  ("evaluate", evaluate, args.skip_evaluate)) if not skip]
    failed = None
    for name, part in parts:
        try:
            part()
        except Exception as e:  # noqa: BLE001 - any failure: keep what was measured, then report it
            failed = {"part": name, "error": f"{type(e).__name__}: {e}"}
            results["failed"] = failed
            break
    if any(key in results for key in ("training", "likelihood", "evaluate")):
        print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")  # Paths in args
        print(f"wrote {args.json}" + (" (the parts measured before the failure)" if failed else ""))
    if failed:
        sys.exit(f"performance.py: the {failed['part']} part failed: {failed['error']}")


def train_child(args: argparse.Namespace) -> None:
    """Internal: one contender trains `batches` steps in this fresh process (for its peak RSS)."""
    report_peak_at_exit()
    config, data, base = training_setup()
    with tempfile.TemporaryDirectory() as tmp:
        make_contender(args.name, config, data, base, Path(tmp), torch.device(args.device)).window(args.batches)


def bdvae_child(args: argparse.Namespace) -> None:
    """Internal: bdvae's command line in this fresh process, its peak RSS reported at exit."""
    from bdvae.__main__ import main as bdvae_main

    report_peak_at_exit()
    sys.exit(bdvae_main(args.bdvae_args))


def parity(args: argparse.Namespace) -> None:
    """Train fp32 and `--setting` for `--epochs` epochs each, from the same seed, through
    train_epoch; the test loss (bdvae's evaluate_terms, fp32, fixed noise) after every epoch."""
    config, data, base = training_setup(args.seed)
    images = data.train_images[: args.train_size]
    curves: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("fp32", args.setting):
            contender = BdvaeContender(base, config, images, Path(tmp), name)
            contender.generator.manual_seed(args.seed)  # the same data order and noise for both
            curves[name] = []
            for epoch in range(1, args.epochs + 1):
                t0 = time.perf_counter()
                contender.pos.order, contender.pos.next_start = None, 0
                with tqdm(total=len(images), desc=f"{name} epoch {epoch}", unit="img", leave=False) as bar:
                    train_epoch(contender.model, contender.optimizer, contender.images, contender.config, bar,
                                contender.pos, contender.generator, ctx=contender.ctx)
                seconds = time.perf_counter() - t0
                # The test loss in fp32 whatever the training setting: how good the weights are.
                test = evaluate_terms(contender.model, data.test_images, config, seed=config.train.seed)
                curves[name].append({"epoch": epoch, "test_loss": test["loss"], "seconds": seconds})
                print(f"{name:>20} epoch {epoch}: test loss {test['loss']:.3f} ({seconds:.0f} s)", flush=True)
    final = {name: rows[-1]["test_loss"] for name, rows in curves.items()}
    relative = final[args.setting] / final["fp32"] - 1
    verdict = "within" if abs(relative) <= PARITY_TOLERANCE else "NOT within"
    print(f"after {args.epochs} epochs: test loss fp32 {final['fp32']:.3f}, {args.setting} {final[args.setting]:.3f} "
          f"({relative:+.2%}, {verdict} {PARITY_TOLERANCE:.0%})")
    result = {"machine": machine(), "setting": args.setting, "epochs": args.epochs, "seed": args.seed,
              "train_images": len(images),
              "curves": curves, "relative_difference": relative, "within_tolerance": abs(relative) <= PARITY_TOLERANCE}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


SMOKE = {"windows": 3, "batches": 5, "warmup": 2, "rss_batches": 3, "iwae_images": 4, "pythae_images": 1,
         "iwae_rounds": 1, "accuracy_images": 16, "evaluate_k": 10, "evaluate_test_size": 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.set_defaults(func=benchmark)
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help=f"trained run for the likelihood figures (default {DEFAULT_RUN})")
    parser.add_argument("--contenders", type=lambda text: [check_contender(n.strip()) for n in text.split(",") if n.strip()],
                        default=list(DEFAULT_CONTENDERS),
                        help=f"training contenders, comma-separated (default {','.join(DEFAULT_CONTENDERS)}; "
                             f"bdvae:SETTING with SETTING one of {', '.join(SETTINGS)})")
    parser.add_argument("--device", type=torch.device, choices=[torch.device("cpu"), torch.device("cuda")],
                        default=torch.device("cpu"), help="where the training contenders train: cpu (default) or cuda")
    parser.add_argument("--windows", type=int, default=5, help="timed training windows per contender (default 5)")
    parser.add_argument("--batches", type=int, default=120, help="optimizer steps per training window (default 120)")
    parser.add_argument("--warmup", type=int, default=20, help="steps of the untimed warm-up window (default 20)")
    parser.add_argument("--rss-batches", type=int, default=100, help="steps of each peak-RSS process; 0 skips them (default 100)")
    parser.add_argument("-k", type=int, default=1000, help="importance samples per image (default 1000)")
    parser.add_argument("--iwae-images", type=int, default=40, help="test images per bdvae IWAE timing (default 40)")
    parser.add_argument("--pythae-images", type=int, default=20, help="test images per pythae get_nll timing (default 20)")
    parser.add_argument("--pythae-batch", type=int, default=100, help="get_nll's batch_size (default 100, its own default)")
    parser.add_argument("--iwae-rounds", type=int, default=3, help="alternating IWAE timing rounds (default 3)")
    parser.add_argument("--accuracy-images", type=int, default=100, help="test images for bf16 against fp32 (default 100)")
    parser.add_argument("--evaluate-k", type=int, default=1000, help="-k of the timed `bdvae evaluate` (default 1000)")
    parser.add_argument("--evaluate-test-size", type=int, default=None, help="--test-size of it (default: all 10,000)")
    parser.add_argument("--evaluate-arg", action="append", metavar="ARG", help="one more argument for it (repeatable)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-likelihood", action="store_true")
    parser.add_argument("--skip-evaluate", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: every part runs once; writes no JSON unless --json")
    parser.add_argument("--json", type=Path, default=None, help="output (default benchmarks/performance.json)")
    commands = parser.add_subparsers(dest="command")
    p = commands.add_parser("parity", help="test loss of a training setting against fp32 after N epochs")
    p.add_argument("--setting", choices=sorted(set(SETTINGS) - {"fp32"}), required=True)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None, help="train on the first N images only (a quick check)")
    p.add_argument("--json", type=Path, default=None, help="output (default benchmarks/parity-SETTING.json)")
    p.set_defaults(func=parity)
    p = commands.add_parser("bdvae", help=argparse.SUPPRESS)  # `python -m bdvae ARGS`, reporting its peak RSS
    p.add_argument("bdvae_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=bdvae_child)
    p = commands.add_parser("window-child", help=argparse.SUPPRESS)
    p.add_argument("name", type=check_contender)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=window_child)
    p = commands.add_parser("pythae-child", help=argparse.SUPPRESS)
    p.add_argument("run", type=Path)
    p.add_argument("images", type=Path)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.set_defaults(func=pythae_child)
    p = commands.add_parser("train-child", help=argparse.SUPPRESS)
    p.add_argument("name", type=check_contender)
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=train_child)
    args = parser.parse_args()
    if args.func is benchmark:
        if args.smoke:
            for key, value in SMOKE.items():
                setattr(args, key, value)
        elif args.json is None:
            args.json = Path("benchmarks/performance.json")
    elif args.func is parity and args.json is None:
        args.json = Path(f"benchmarks/parity-{args.setting}.json")
    args.func(args)


if __name__ == "__main__":
    main()
