"""Issue 15's fp32 training levers, each against bdvae's fp32 step, on a CPU without native bf16.

Every variant trains its own copy of the reference model (channels-last, fp32, batch 128, bdvae's
loss, Adam; plain layers unless a lever says otherwise) on the same batch; the variants take turns,
window by window, in an order that rotates from round to round, and each window is divided by the
baseline's window of the same round, so that a noisy machine's slow rounds cancel. The levers
compute the same function as the layers they replace (`check_same_function`, float64, values and
gradients; `tests/test_benchmarks.py` runs it) and keep the weights' names and shapes:

- the first convolution (1 input channel) as im2col and one GEMM whose output is already channels-last;
- the first convolution as space-to-depth: pixel-unshuffle of the padded image, a 2x2 convolution;
- the last transposed convolution (1 output channel) as one GEMM to 4x4 patches and col2im, as
  bdvae's models now compute it (`kernels.ImageConvTranspose2d`, tested in `tests/test_model.py`);
- the last transposed convolution in sub-pixel form: a 3x3 convolution to 4 channels, pixel shuffle;
- in-place ReLUs, which bdvae's models now have; Adam's fused CPU kernel;
- the batch in 2 shards on 2 threads of 1 intra-op thread each, gradients summed in a fixed order;
- and apart, since it is process-wide: malloc keeping freed memory (`devices.keep_freed_memory`,
  which bdvae's training calls; the variants above all run with it), against glibc's default,
  in fresh processes taking turns (`--heap-rounds`).

    python benchmarks/fp32_levers.py [--rounds 16] [--steps 10] [--json benchmarks/fp32-levers.json]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/fp32_levers.py   # an AVX-512 CPU as one without

Not part of the test suite (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdvae.config import Config
from bdvae.devices import keep_freed_memory
from bdvae.kernels import ImageConvTranspose2d, subpixel_weight
from bdvae.model import build_model
from bdvae.objective import loss_sums
from performance import machine, plain_layers  # benchmarks/ is on the path of a script run from it


def gemm_conv(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Conv2d(k4, s2, p1) from one channel: im2col (B, L, 16) @ (16, C_out), channels-last out."""
    batch, _, h, wd = x.shape
    cols = F.unfold(x, 4, padding=1, stride=2).transpose(1, 2)  # (B, L, 16)
    y = torch.addmm(b, cols.reshape(-1, 16), w.reshape(w.shape[0], 16).t())  # (B L, C_out)
    return y.reshape(batch, h // 2, wd // 2, w.shape[0]).permute(0, 3, 1, 2)


def space_to_depth_conv(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Conv2d(k4, s2, p1) as pad 1, pixel-unshuffle 2 and a 2x2 stride-1 convolution on 4 C_in channels."""
    c_out, c_in = w.shape[:2]
    w2 = w.reshape(c_out, c_in, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(c_out, 4 * c_in, 2, 2)
    return F.conv2d(F.pixel_unshuffle(F.pad(x, (1, 1, 1, 1)), 2), w2, b)


def sub_pixel_conv_transpose(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """ConvTranspose2d(k4, s2, p1) as a 3x3 convolution to 4 C_out channels and a pixel shuffle, the
    kernel rebuilt from the 4x4 one at every call so that training updates the 4x4 kernel."""
    return F.pixel_shuffle(F.conv2d(x, subpixel_weight(w), b.repeat_interleave(4), padding=1), 2)


def relayer(layer: nn.Module, form: Callable[[Tensor, Tensor, Tensor], Tensor]) -> nn.Module:
    """`layer` computing its output through `form`: the same parameters, names and state dict."""
    layer.forward = lambda x: form(x, layer.weight, layer.bias)
    return layer


def check_same_function() -> None:
    """Every reformulation against the plain layer in float64: outputs and all three gradients."""
    gen = torch.Generator().manual_seed(0)
    cases = [(F.conv2d, (gemm_conv, space_to_depth_conv), (3, 1, 32, 32), (32, 1, 4, 4), 32),
             (F.conv_transpose2d, (sub_pixel_conv_transpose,), (3, 32, 16, 16), (32, 1, 4, 4), 1)]
    for plain, forms, x_shape, w_shape, c_out in cases:
        args = [torch.randn(s, generator=gen, dtype=torch.float64) for s in (x_shape, w_shape, (c_out,))]
        for form in forms:
            inputs = [a.clone().requires_grad_() for a in args]
            reference = [a.clone().requires_grad_() for a in args]
            y, y_ref = form(*inputs), plain(*reference, stride=2, padding=1)
            torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
            g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
            y.backward(g)
            y_ref.backward(g)
            for a, r in zip(inputs, reference):
                torch.testing.assert_close(a.grad, r.grad, rtol=0, atol=1e-12)


def variant(config: Config, x: Tensor, eps: Tensor, pool: ThreadPoolExecutor | None, first: Callable | None = None,
            last: Callable | None = None, image_layer: bool = False, inplace: bool = False, fused: bool = False,
            shards: int = 1) -> Callable[[], None]:
    """One Adam step of the reference model with the given levers, as a function of nothing. Without
    levers its layers are plain: nn.ConvTranspose2d for the image layer, ReLUs not in place."""
    torch.manual_seed(0)
    model = plain_layers(build_model(config.model, config.objective, (1, 32, 32)))
    model.to(memory_format=torch.channels_last)
    if image_layer:
        model.decoder[-1].__class__ = ImageConvTranspose2d  # back to bdvae's: the same attributes and parameters
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = inplace
    if first:
        relayer(model.encoder[0], first)
    if last:
        relayer(model.decoder[-1], last)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=config.train.lr, fused=fused or None)
    n = len(x)

    def shard_grads(i: int) -> tuple[Tensor, ...]:
        part = slice(i * n // shards, (i + 1) * n // shards)
        return torch.autograd.grad(loss_sums(model, x[part], config.objective, eps[part])[0] / n, params)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if shards == 1:
            (loss_sums(model, x, config.objective, eps)[0] / n).backward()
        else:
            for p, *grads in zip(params, *pool.map(shard_grads, range(shards))):
                p.grad = torch.stack(grads).sum(0)
        optimizer.step()
    return step


BDVAE = {"image_layer": True, "inplace": True}  # the levers bdvae's models have
VARIANTS = {  # name -> levers; the first is the baseline
    "plain layers": {},
    "first conv: im2col GEMM": {"first": gemm_conv},
    "first conv: space-to-depth": {"first": space_to_depth_conv},
    "last transposed conv: GEMM + col2im": {"image_layer": True},
    "last transposed conv: sub-pixel": {"last": sub_pixel_conv_transpose},
    "in-place ReLUs": {"inplace": True},
    "fused Adam": {"fused": True},
    "2 shards on 2 threads of 1": {"shards": 2},
    "bdvae: GEMM + col2im, in-place ReLUs": BDVAE,
}


def one_batch(config: Config) -> tuple[Tensor, Tensor]:
    """The batch every variant trains on: 128 binary images (channels-last) and their noise."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(128, 1, 32, 32, generator=gen) < 0.3).float().contiguous(memory_format=torch.channels_last)
    return x, torch.randn(128, config.model.latent_dim, generator=gen)


def heap_child(steps: int, keep: bool) -> None:
    """Internal: `steps` timed steps of the baseline in this fresh process; prints images/s and the
    minor page faults per step."""
    import resource

    if keep:
        keep_freed_memory()
    config = Config()
    x, eps = one_batch(config)
    step = variant(config, x, eps, None, **BDVAE)
    for _ in range(5):
        step()
    faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    print(steps * len(x) / seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps)


def heap_rates(rounds: int, steps: int) -> dict[str, dict[str, list[float]]]:
    """glibc's default heap and the kept one, in fresh processes taking turns: images/s, faults a step."""
    out: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for name, flag in (("glibc default", []), ("kept (bdvae)", ["--keep"])):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--heap-child", str(steps), *flag]
            rate, faults = map(float, subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split())
            out.setdefault(name, {"images_per_second": [], "faults_per_step": []})
            out[name]["images_per_second"].append(rate)
            out[name]["faults_per_step"].append(faults)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--heap-rounds", type=int, default=6, help="rounds of the heap A/B, 2 processes each")
    parser.add_argument("--heap-steps", type=int, default=40)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/fp32-levers.json"))
    parser.add_argument("--heap-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.heap_child:
        return heap_child(args.heap_child, args.keep)

    check_same_function()
    heap = heap_rates(args.heap_rounds, args.heap_steps)
    keep_freed_memory()  # as bdvae's training does
    config = Config()
    x, eps = one_batch(config)
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,))
    list(pool.map(lambda _: None, range(2)))  # start both workers with 1 thread each ...
    torch.set_num_threads(threads)  # ... and leave this thread's count as it was
    steps = {name: variant(config, x, eps, pool, **levers) for name, levers in VARIANTS.items()}
    for step in steps.values():
        for _ in range(3):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):  # the order rotates each round: no variant always follows the same one
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            rates[name].append(args.steps * len(x) / (time.perf_counter() - t0))
    base = next(iter(rates))
    ratios = {name: statistics.median(r / b for r, b in zip(values, rates[base])) for name, values in rates.items()}
    print(f"{'variant':<40} {'median img/s':>12} {'vs fp32':>8}   rounds")
    for name, values in rates.items():
        rounds = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name:<40} {statistics.median(values):>12.0f} {ratios[name]:>7.3f}x   {rounds}")
    print(f"reference model, batch 128, {threads} threads, {args.steps} steps per window, {args.rounds} rounds; "
          "each lever equals the plain layer in float64")
    base_heap = heap["glibc default"]["images_per_second"]
    for name, figures in heap.items():
        ratio = statistics.median(r / b for r, b in zip(figures["images_per_second"], base_heap))
        print(f"heap {name:<35} {statistics.median(figures['images_per_second']):>12.0f} {ratio:>7.3f}x   "
              f"{statistics.median(figures['faults_per_step']):.0f} page faults a step "
              f"({args.heap_rounds} alternating processes of {args.heap_steps} steps each)")
        figures["ratio_to_glibc_default"] = ratio
    args.json.write_text(json.dumps({"machine": machine(), "rounds": args.rounds, "steps": args.steps, "rates": rates,
                                     "medians": {k: statistics.median(v) for k, v in rates.items()},
                                     "ratio_to_baseline": ratios, "heap": heap}, indent=2) + "\n")


if __name__ == "__main__":
    main()
