"""The run directory: --overwrite clears the old run's outputs; atomic writes leave no temporary file and give the usual permissions."""

from __future__ import annotations

import pytest

from bdvae import files, rundir
from bdvae.errors import BdvaeError


def test_overwrite_removes_the_old_runs_outputs_and_keeps_other_files(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "samplers").mkdir()  # fitted to the old model's latents: they would decode nonsense with the new one
    for name in ("run.json", "model.safetensors", "metrics.json", "metrics.jsonl", "samples.png", "eval/traversal.png",
                 "checkpoints/step-000000010.safetensors", "samplers/gmm-10.json", "samplers/gmm-10.safetensors",
                 "config.toml", "my-notes.txt"):
        (run / name).write_text("old")
    with pytest.raises(BdvaeError, match="run directory exists"):
        rundir.prepare(run, overwrite=False)
    assert (run / "run.json").exists()  # refused: nothing touched
    rundir.prepare(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "my-notes.txt"]  # config.toml is rewritten next


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    files.write_text(target, "first")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed midway")
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_files_get_the_users_usual_permissions_also_when_safetensors_writes_them(tmp_path):
    import os

    import torch

    umask = os.umask(0o022)
    try:
        rundir.save_state(tmp_path, 7, {"w": torch.zeros(3)}, {"epoch": 0})  # save_file writes its file anew
        files.write_text(tmp_path / "f.txt", "text")
    finally:
        os.umask(umask)
    for path in (tmp_path / "checkpoints" / "step-000000007.safetensors", tmp_path / "f.txt"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_metrics_json_of_the_first_format_reads_with_the_arithmetic_as_dtype(tmp_path):
    """bdvae first wrote the IWAE decoder's arithmetic as "precision"; read_metrics gives it as "dtype",
    and leaves the sample-quality metric precision, and a file already new, as they are."""
    import json

    old = {"options": {"k": 100, "precision": "auto"}, "iwae_nll": {"mean": 85.0, "precision": "bf16"},
           "sample_quality": {"precision": 0.61, "recall": 0.8}}
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    assert rundir.read_metrics(tmp_path) == {"options": {"k": 100, "dtype": "auto"}, "iwae_nll": {"mean": 85.0, "dtype": "bf16"},
                                             "sample_quality": {"precision": 0.61, "recall": 0.8}}
    new = {"options": {"dtype": "fp32"}, "iwae_nll": {"dtype": "fp32"}}
    (tmp_path / "metrics.json").write_text(json.dumps(new))
    assert rundir.read_metrics(tmp_path) == new
    assert rundir.upgrade_metrics([1, 2]) == [1, 2]  # not a metrics dict: left for the caller to refuse


def test_the_old_default_max_batch_reads_as_unset(tmp_path):
    """--max-batch's default was 1000 and is now unset (sized by the device): an evaluation made
    with the old default is still the one `compare` asks for with the default options."""
    import dataclasses
    import json

    from bdvae.options import EvalOptions

    asked = json.loads(json.dumps(dataclasses.asdict(EvalOptions())))
    for given, read in ((1000, asked), (4000, {**asked, "max_batch": 4000})):
        (tmp_path / "metrics.json").write_text(json.dumps({"options": {**asked, "max_batch": given}}))
        assert rundir.read_metrics(tmp_path)["options"] == read


def test_an_unfinished_iwae_of_the_first_format_is_taken_up(tmp_path):
    import torch

    setting = {"k": 8, "seed": 0, "images": 200, "device": "cpu", "decode_batch": 256, "weights": "abc"}
    nll, state = torch.arange(100.0), torch.Generator().manual_seed(3).get_state()
    rundir.save_iwae_progress(tmp_path, {**setting, "precision": "bf16"}, nll, state)  # as bdvae first wrote it
    found = rundir.load_iwae_progress(tmp_path, {**setting, "dtype": "bf16"}, log=print)
    assert found is not None and torch.equal(found[0], nll) and torch.equal(found[1], state)
    assert rundir.load_iwae_progress(tmp_path, {**setting, "dtype": "fp32"}, log=print) is None  # another dtype


def test_when_every_training_state_is_damaged_none_is_taken_and_the_log_says_so(tmp_path):
    folder = tmp_path / rundir.STATES_DIR
    folder.mkdir()
    for step in (3, 6):
        (folder / f"step-{step:09d}.safetensors").write_bytes(b"not a training state")
    said: list[str] = []
    assert rundir.latest_state(tmp_path, said.append) is None
    assert [line.split(": ")[0] for line in said] == [str(folder / "step-000000006.safetensors"),
                                                      str(folder / "step-000000003.safetensors")]
    assert said[0].endswith("; trying the one before it") and said[1].endswith("; no earlier one")
