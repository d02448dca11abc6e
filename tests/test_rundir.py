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
