"""Where a training step's time goes, layer by layer, against the machine's matmul rate.

One optimizer step of bdvae's training (channels-last, the objective's loss, Adam) is timed layer
by layer: each convolution, transposed convolution, linear layer, BatchNorm and ReLU forward
(between a forward pre-hook and a forward hook) and backward (between a full backward pre-hook and
a full backward hook; CPU kernels run synchronously, so wall-clock differences are the layer's
own time). What no layer holds is the element-wise tail (reparameterisation, likelihood,
regularizer, their gradients) and Adam's update, timed apart. The first layer's weight gradient
is in that tail too: its input needs no gradient, so no hook brackets its backward. The ReLUs run
out of place here (a full backward hook's outputs cannot be modified in place), where bdvae's
models run them in place. Each layer's FLOPs (2 per multiply-add; backward twice the forward for
layers with weights) give its GFLOP/s, beside the fp32 matmul rate measured in the same run.

    python benchmarks/layers.py                       # the reference model and the quality preset, fp32
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/layers.py   # as on a CPU without AVX-512
    python benchmarks/layers.py --json benchmarks/layers.json
    python benchmarks/layers.py --default-heap        # glibc's malloc as it is, not as bdvae's training sets it

Median over --steps steps after --warmup, batch 128; `--precision bf16` times the bf16 autocast
forward instead. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from bdvae.config import load
from bdvae.devices import keep_freed_memory
from bdvae.model import build_model
from bdvae.objective import loss_terms
from performance import machine, matmul_gflops  # benchmarks/ is on the path of a script run from it

TIMED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.ReLU)


def layer_flops(module: nn.Module, out: torch.Tensor) -> float:
    """Forward FLOPs of one call producing `out` (2 per multiply-add); 0 for element-wise layers."""
    if isinstance(module, nn.Conv2d):
        return 2.0 * out.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1] / module.groups
    if isinstance(module, nn.ConvTranspose2d):  # each input pixel scatters a k x k kernel to every output channel
        b, _, h, w = out.shape
        h_in, w_in = (h + 2 * module.padding[0] - module.kernel_size[0]) // module.stride[0] + 1, \
                     (w + 2 * module.padding[1] - module.kernel_size[1]) // module.stride[1] + 1
        return 2.0 * b * h_in * w_in * module.in_channels * module.out_channels * module.kernel_size[0] * module.kernel_size[1]
    if isinstance(module, nn.Linear):
        return 2.0 * out.numel() * module.in_features
    return 0.0


def profile(preset: str, steps: int, warmup: int, batch: int, bf16: bool) -> dict:
    config = load(preset=preset)
    torch.manual_seed(0)
    model = build_model(config.model, config.objective, (1, 32, 32)).to(memory_format=torch.channels_last).train()
    for m in model.modules():  # a full backward hook's outputs must not be modified in place
        if isinstance(m, nn.ReLU):
            m.inplace = False
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    eps = torch.randn(batch, config.model.latent_dim)
    names = {m: n for n, m in model.named_modules() if isinstance(m, TIMED)}
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    flops: dict[str, float] = {}
    started: dict[tuple[nn.Module, str], float] = {}

    leaves: set[str] = set()  # layers whose input needs no gradient: their backward is not bracketed

    def pre(kind):
        def hook(m, inputs):
            if kind == "forward" and not inputs[0].requires_grad:
                leaves.add(names[m])
            started[(m, kind)] = time.perf_counter()
        return hook

    def post(kind):
        def hook(m, _inputs, out):
            times[names[m]][kind].append(time.perf_counter() - started[(m, kind)])
            if kind == "forward":
                flops[names[m]] = layer_flops(m, out[0] if isinstance(out, tuple) else out)
        return hook

    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # the first layer: see leaves
    for m in names:
        m.register_forward_pre_hook(pre("forward"))
        m.register_forward_hook(post("forward"))
        m.register_full_backward_pre_hook(pre("backward"))
        m.register_full_backward_hook(post("backward"))
    step_times, adam_times = [], []
    for i in range(warmup + steps):
        if i == warmup:
            times.clear()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_terms(model, x, config.objective, eps).loss
        loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        if i >= warmup:
            step_times.append(t2 - t0)
            adam_times.append(t2 - t1)
    step = statistics.median(step_times)
    layers = []
    for name, kinds in times.items():
        fwd = statistics.median(kinds["forward"])
        bwd = 0.0 if name in leaves else statistics.median(kinds.get("backward", [0.0]))
        f = flops[name]
        layers.append({"layer": name, "type": type(dict(model.named_modules())[name]).__name__,
                       "forward_ms": 1e3 * fwd, "backward_ms": 1e3 * bwd, "share_of_step": (fwd + bwd) / step,
                       "forward_gflops": f / fwd / 1e9 if f else None,
                       "backward_gflops": 2 * f / bwd / 1e9 if f and bwd else None,
                       "backward_in_tail": name in leaves})
    in_layers = sum(lay["forward_ms"] + lay["backward_ms"] for lay in layers) / 1e3
    adam = statistics.median(adam_times)
    return {"preset": preset, "precision": "bf16 autocast" if bf16 else "fp32", "batch": batch,
            "step_ms": 1e3 * step, "images_per_second": batch / step, "adam_ms": 1e3 * adam,
            "outside_layers_ms": 1e3 * (step - in_layers - adam), "layers": layers,
            "step_gflops": 3 * sum(flops.values()) / step / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="reference,quality")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--default-heap", action="store_true",
                        help="leave glibc's malloc as it is (bdvae's training keeps freed memory: devices.keep_freed_memory)")
    args = parser.parse_args()
    kept = not args.default_heap and keep_freed_memory()
    results = {"machine": machine(), "kept_heap": kept, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "matmul_fp32_gflops": statistics.median(matmul_gflops(torch.float32)),
               "profiles": [profile(p, args.steps, args.warmup, args.batch, args.precision == "bf16")
                            for p in args.presets.split(",")]}
    print(f"{results['cpu_capability']}, {results['threads']} threads; fp32 matmul {results['matmul_fp32_gflops']:.0f} GFLOP/s; "
          f"{'kept' if kept else 'glibc default'} heap")
    for prof in results["profiles"]:
        print(f"\n{prof['preset']} ({prof['precision']}): {prof['step_ms']:.1f} ms a step, "
              f"{prof['images_per_second']:,.0f} images/s, {prof['step_gflops']:.0f} GFLOP/s; "
              f"Adam {prof['adam_ms']:.1f} ms, outside the layers {prof['outside_layers_ms']:.1f} ms")
        print(f"  {'layer':<22}{'type':<17}{'fwd ms':>8}{'bwd ms':>8}{'share':>7}{'fwd GF/s':>10}{'bwd GF/s':>10}")
        for lay in prof["layers"]:
            fg = f"{lay['forward_gflops']:.0f}" if lay["forward_gflops"] else "-"
            bg = f"{lay['backward_gflops']:.0f}" if lay["backward_gflops"] else "-"
            bwd = "tail" if lay["backward_in_tail"] else f"{lay['backward_ms']:.2f}"
            print(f"  {lay['layer']:<22}{lay['type']:<17}{lay['forward_ms']:>8.2f}{bwd:>8}"
                  f"{lay['share_of_step']:>7.0%}{fg:>10}{bg:>10}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
