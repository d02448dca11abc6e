"""Property-based fuzzing: random and mutated bytes fed to every loader and to the config parser.
Whatever the input, the only exception that may come out is the project's own BdvaeError (which the
command turns into one line and exit code 2): never a traceback from numpy, PIL, pickle or torch."""

from __future__ import annotations

import gzip
import io
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bdvae import config as config_lib, data, rundir, states
from bdvae.classifier import load_classifier
from bdvae.config import DataConfig
from bdvae.errors import BdvaeError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def idx_bytes(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
LABELS = RNG.integers(0, 10, size=12).astype(np.uint8)


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x_train=IMAGES[:8], y_train=LABELS[:8], x_test=IMAGES[8:], y_test=LABELS[8:])
    return buf.getvalue()


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(IMAGES[0]).save(buf, format="PNG")
    return buf.getvalue()


def _pickle() -> bytes:
    split = (IMAGES.reshape(12, -1).astype(np.float32) / 256, LABELS.astype(np.int64))
    return gzip.compress(pickle.dumps((split, split, split), protocol=2))


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """`valid` truncated, with bytes overwritten, inserted or deleted, or replaced by random bytes."""
    kind = draw(st.sampled_from(["random", "truncate", "overwrite", "insert", "delete"]))
    raw = bytearray(valid)
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "truncate":
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    position = draw(st.integers(0, len(raw) - 1))
    if kind == "overwrite":
        for offset, byte in enumerate(draw(st.binary(min_size=1, max_size=8))):
            if position + offset < len(raw):
                raw[position + offset] = byte
        return bytes(raw)
    if kind == "insert":
        return bytes(raw[:position]) + draw(st.binary(min_size=1, max_size=16)) + bytes(raw[position:])
    return bytes(raw[:position] + raw[position + draw(st.integers(1, 16)):])


def _only_our_error(fn) -> None:
    try:
        fn()
    except BdvaeError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(e)  # one line


@pytest.fixture
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FUZZ
@given(images=mutated(idx_bytes(IMAGES)), labels=mutated(idx_bytes(LABELS)))
def test_idx_loader(folder, images, labels):
    (folder / "x.idx").write_bytes(images)
    (folder / "y.idx").write_bytes(labels)
    cfg = DataConfig(name="idx", path=str(folder / "x.idx"), labels_path=str(folder / "y.idx"))
    _only_our_error(lambda: data.load_dataset(cfg, log=lambda _: None))


@FUZZ
@given(raw=mutated(gzip.compress(idx_bytes(IMAGES))))
def test_gzipped_idx_loader(folder, raw):
    (folder / "x.idx.gz").write_bytes(raw)
    _only_our_error(lambda: data.load_dataset(DataConfig(name="idx", path=str(folder / "x.idx.gz")), log=lambda _: None))


@FUZZ
@given(raw=mutated(_npz()))
def test_npz_loader(folder, raw):
    (folder / "d.npz").write_bytes(raw)
    _only_our_error(lambda: data.load_dataset(DataConfig(name="npz", path=str(folder / "d.npz")), log=lambda _: None))


@FUZZ
@given(raw=mutated(_png()))
def test_image_folder_loader(folder, raw):
    (folder / "3").mkdir(exist_ok=True)
    (folder / "3" / "a.png").write_bytes(_png())
    (folder / "3" / "b.png").write_bytes(raw)
    _only_our_error(lambda: data.load_dataset(DataConfig(name="folder", path=str(folder)), log=lambda _: None))


@FUZZ
@given(raw=mutated(_pickle()))
def test_mnist_pickle_source(raw):
    _only_our_error(lambda: data.mnist_from_pickle(raw, "fuzz.pkl.gz"))


@FUZZ
@given(raw=mutated(_npz()))
def test_npz_download_source(raw):
    _only_our_error(lambda: data.from_npz_bytes(raw, "fuzz.npz"))


VALID_TOML = config_lib.dumps(config_lib.Config(data=DataConfig(train_size=100)))


@FUZZ
@given(text=st.one_of(st.text(max_size=300), mutated(VALID_TOML.encode()).map(lambda b: b.decode("utf-8", "replace"))))
def test_config_parser(folder, text):
    (folder / "c.toml").write_text(text, encoding="utf-8")
    _only_our_error(lambda: config_lib.load(folder / "c.toml"))


toml_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)


@FUZZ
@given(raw=st.dictionaries(st.sampled_from(["data", "model", "objective", "train", "other"]),
                           st.dictionaries(st.sampled_from(["name", "arch", "beta", "epochs", "widths", "seed", "alpha",
                                                            "latent_dim", "pad", "skip_nonfinite", "x"]), toml_values,
                                           max_size=4), max_size=4))
def test_config_values(raw):
    _only_our_error(lambda: config_lib.from_dict(raw))


def _state_file() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = rundir.save_state(Path(d), 3, {"a": torch.arange(6.0), "rng.torch": torch.get_rng_state()[:64]},
                                     {"epoch": 1, "rows": []})
        return path.read_bytes()


@FUZZ
@given(raw=mutated(_state_file()))
def test_training_state_loader(folder, raw):
    (folder / "step-000000003.safetensors").write_bytes(raw)
    _only_our_error(lambda: states.load(folder / "step-000000003.safetensors"))


def _classifier_file() -> bytes:
    from bdvae.classifier import SHIPPED

    return (Path(data.__file__).parent / "assets" / SHIPPED).read_bytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mutated(_classifier_file()[:4096]))  # the header and the first tensors
def test_classifier_loader(folder, raw):
    (folder / "c.safetensors").write_bytes(raw)
    _only_our_error(lambda: load_classifier(folder / "c.safetensors"))
