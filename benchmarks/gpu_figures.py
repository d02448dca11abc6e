"""The GPU check's figures in one table and one JSON, with the GPU's name: training throughput side
by side (bdvae, pythae 0.1.2, a minimal loop and its CUDA-graph capture, as ratios), the default
training's time, the quality preset's time per epoch and the wall time of `bdvae evaluate -k 5000`.

    python3 benchmarks/gpu_figures.py OUT RUN QUALITY_RUN   # the last step of `bash benchmarks/gpu_check.sh run`

Reads what the steps before it left: OUT/throughput.json (performance.py's training part),
OUT/evaluate-k5000.json (its evaluate part), the run.json and metrics.jsonl of RUN (the default
`bdvae train`) and QUALITY_RUN (`--preset quality`), OUT/seconds.txt (each check's wall time).
Writes OUT/gpu-figures.json. A figure whose step failed is left out, and the table says so.
docs/scaling-out.md#checking-the-gpu-paths says how to read it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

RATIO_KEYS = ("pythae", "minimal", "captured")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_run(run: Path) -> dict | None:
    """A finished run's training time: run.json's seconds (the epochs' own, test passes included,
    start-up and final writes excluded) and each epoch's from metrics.jsonl."""
    facts = read_json(run / "run.json")
    if facts is None:
        return None
    try:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        rows = []
    return {"run": str(run), "epochs": facts.get("epochs"), "train_images": facts.get("train_images"),
            "test_images": facts.get("test_images"), "device": facts.get("device"),
            "precision": facts.get("precision"), "step": facts.get("step", "host"), "seconds": facts.get("seconds"),
            "test_loss": rows[-1].get("test_loss") if rows else None,
            "seconds_per_epoch": [round(r["seconds"], 2) for r in rows if "seconds" in r]}


def step_seconds(path: Path) -> dict[str, float]:
    try:
        pairs = (line.split() for line in path.read_text().splitlines() if line.strip())
        return {name: float(seconds) for name, seconds in pairs}
    except (OSError, ValueError):
        return {}


def machine() -> dict:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}", "torch": torch.__version__,
                "cuda": torch.version.cuda}
    return {"gpu": None, "torch": torch.__version__}


def collect(out: Path, run: Path, quality: Path) -> dict:
    figures = {"machine": machine(), "steps_seconds": step_seconds(out / "seconds.txt")}
    throughput = read_json(out / "throughput.json")
    if throughput and "training" in throughput:
        train = throughput["training"]
        figures["throughput"] = {
            "device": train["device"], "batch_size": train["batch_size"], "batches_per_window": train["batches_per_window"],
            "windows": len(next(iter(train["rates"].values()), [])), "labels": train["labels"],
            "images_per_second": train["medians"], "ratios": train["ratios"], "not_applicable": train["not_applicable"],
            "host": throughput["machine"].get("cpu"), "pythae": throughput["machine"].get("pythae")}
    figures["default_training"] = training_run(run)
    figures["quality_preset"] = training_run(quality)
    evaluate = read_json(out / "evaluate-k5000.json")
    if evaluate and "evaluate" in evaluate:
        e = evaluate["evaluate"]
        figures["evaluate"] = {"k": e["k"], "test_images": e["test_images"], "wall_seconds": e["wall_seconds"],
                               "iwae_importance_samples_per_second": e["iwae_importance_samples_per_second"],
                               "iwae_nll": e["iwae_nll"], "peak_rss_gib": e["peak_rss_gib"]}
    return figures


def table(f: dict) -> str:
    m = f["machine"]
    lines = [f"GPU: {m['gpu']} (compute capability {m['compute_capability']}), torch {m['torch']}, CUDA {m['cuda']}"
             if m["gpu"] else f"no GPU: the CPU stood in, so this is a check of the script, not figures (torch {m['torch']})"]
    t = f.get("throughput")
    if t:
        lines.append(f"\ntraining throughput on {t['device']}: reference model, batch {t['batch_size']}, MNIST, "
                     f"median of {t['windows']} windows of {t['batches_per_window']} steps, the contenders taking turns")
        width = max(len(label) for label in t["labels"].values())
        lines.append(f"{'contender':<{width}}  {'img/s':>9}  {'/ pythae':>8}  {'/ minimal':>9}  {'/ captured':>10}")
        for name, label in t["labels"].items():
            if name in t["not_applicable"]:
                lines.append(f"{label:<{width}}  {'n/a':>9}  {t['not_applicable'][name]}")
            elif name in t["images_per_second"]:
                r = t["ratios"][name]
                cells = [f"{r[k]:.2f}x" if k in r else "-" for k in RATIO_KEYS]
                lines.append(f"{label:<{width}}  {t['images_per_second'][name]:>9,.0f}  {cells[0]:>8}  {cells[1]:>9}  "
                             f"{cells[2]:>10}")
        lines.append("(/ minimal and / captured: against the loop in the same arithmetic, fp32 or bf16)")
    else:
        lines.append("\ntraining throughput: no figures (the throughput step failed; see throughput.log)")
    for key, what in (("default_training", "bdvae train, default config"),
                      ("quality_preset", "bdvae train --preset quality")):
        r = f.get(key)
        if r is None:
            lines.append(f"{what}: no figures (its step failed; see its log)")
            continue
        per_epoch = r["seconds"] / r["epochs"] if r["epochs"] else float("nan")
        lines.append(f"{what}: {r['epochs']} epoch(s) of {r['train_images']:,} images on {r['device']}, {r['precision']}, "
                     f"step {r['step']}: {r['seconds']:.1f} s ({per_epoch:.1f} s per epoch, its test pass of "
                     f"{r['test_images']:,} images included); test loss {r['test_loss']}")
    e = f.get("evaluate")
    if e:
        lines.append(f"bdvae evaluate RUN -k {e['k']} (default options, {e['test_images']:,} test images): "
                     f"{e['wall_seconds']:.1f} s wall; IWAE {e['iwae_importance_samples_per_second']:,.0f} samples/s")
    else:
        lines.append("bdvae evaluate RUN -k 5000: no figure (its step failed; see evaluate_k5000.log)")
    if f["steps_seconds"]:
        lines.append("wall time of each check, s: " + ", ".join(f"{k} {v:.0f}" for k, v in f["steps_seconds"].items())
                     + f"; all {sum(f['steps_seconds'].values()):.0f}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: python3 benchmarks/gpu_figures.py OUT RUN QUALITY_RUN")
    out, run, quality = map(Path, sys.argv[1:])
    figures = collect(out, run, quality)
    print(table(figures))
    (out / "gpu-figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out / 'gpu-figures.json'}")


if __name__ == "__main__":
    main()
