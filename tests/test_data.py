"""Data: IDX/npz/folder parsing on small generated files, the restricted unpickler, verification."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bdvae import data
from bdvae.config import DataConfig
from bdvae.data import KNOWN, BdvaeError


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw, compresslevel=1) if compress else raw)
    return path


@pytest.fixture
def small_images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=20).astype(np.uint8)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_idx_round_trip(tmp_path, small_images, compress):
    images, _ = small_images
    path = write_idx(tmp_path / "x.idx", images, compress)
    np.testing.assert_array_equal(data.read_idx(path), images)


@pytest.mark.parametrize("mutate,message", [
    (lambda raw: b"\x01\x02" + raw[2:], "bad magic number"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "type code 0x0d is not supported"),
    (lambda raw: raw[:-5], "IDX payload has"),
    (lambda raw: raw[:9], "IDX header is truncated"),
    (lambda raw: raw + b"\x00", "IDX payload has"),
])
def test_corrupt_idx_is_refused(tmp_path, small_images, mutate, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(mutate(idx_bytes(small_images[0])))
    with pytest.raises(BdvaeError, match=message) as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_truncated_gzip_is_refused(tmp_path, small_images):
    path = tmp_path / "x.idx.gz"
    path.write_bytes(gzip.compress(idx_bytes(small_images[0]))[:-20])
    with pytest.raises(BdvaeError, match="damaged gzip"):
        data.read_idx(path)


def test_damaged_deflate_stream_is_refused(tmp_path, small_images):
    raw = bytearray(gzip.compress(idx_bytes(small_images[0])))
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the compressed data
    path = tmp_path / "x.idx.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(BdvaeError, match="damaged gzip|IDX"):
        data.read_idx(path)


def test_npy_content_is_recognised_whatever_the_suffix(tmp_path, small_images):
    with open(tmp_path / "x.npz", "wb") as f:
        np.save(f, small_images[0])
    ds = data.load_dataset(DataConfig(name="npz", path=str(tmp_path / "x.npz"), test_fraction=0.5))
    assert len(ds.train_images) == 10


def test_idx_pair_dataset_is_split_padded_and_labelled(tmp_path, small_images):
    images, labels = small_images
    write_idx(tmp_path / "x.idx", images)
    write_idx(tmp_path / "y.idx", labels)
    ds = data.load_dataset(DataConfig(name="idx", path=str(tmp_path / "x.idx"), labels_path=str(tmp_path / "y.idx"),
                                      test_fraction=0.25))
    assert ds.train_images.shape == (15, 1, 32, 32) and ds.test_images.shape == (5, 1, 32, 32)
    assert ds.train_images.dtype == torch.uint8
    # Every image comes back once, zero-padded by 2, with its own label.
    together = torch.cat([ds.train_images, ds.test_images])[:, 0, 2:30, 2:30].numpy()
    all_labels = torch.cat([ds.train_labels, ds.test_labels]).numpy()
    order = [int(np.flatnonzero((images == x).all(axis=(1, 2)))[0]) for x in together]
    assert sorted(order) == list(range(20))
    np.testing.assert_array_equal(all_labels, labels[order])
    assert ds.train_images[:, :, :2].sum() == 0 and ds.train_images[:, :, :, 30:].sum() == 0


def test_label_count_must_match(tmp_path, small_images):
    images, labels = small_images
    write_idx(tmp_path / "x.idx", images)
    write_idx(tmp_path / "y.idx", labels[:7])
    with pytest.raises(BdvaeError, match="20 images but 7 labels"):
        data.load_dataset(DataConfig(name="idx", path=str(tmp_path / "x.idx"), labels_path=str(tmp_path / "y.idx")))


def test_npz_with_a_keras_split_and_rgb_floats(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.random((12, 16, 24, 3)).astype(np.float32)
    x_test = rng.random((4, 16, 24, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=np.arange(12), x_test=x_test, y_test=np.arange(4))
    ds = data.load_dataset(DataConfig(name="npz", path=str(tmp_path / "d.npz")))
    assert ds.shape == (3, 16, 24)
    expected = np.round(x_train.transpose(0, 3, 1, 2) * 255).astype(np.uint8)
    np.testing.assert_array_equal(ds.train_images.numpy(), expected)
    assert ds.test_labels.tolist() == [0, 1, 2, 3]


def test_npy_of_images_is_split(tmp_path, small_images):
    np.save(tmp_path / "x.npy", small_images[0])
    ds = data.load_dataset(DataConfig(name="npz", path=str(tmp_path / "x.npy"), pad=0))
    assert len(ds.train_images) + len(ds.test_images) == 20
    assert ds.shape == (1, 28, 28)
    assert (ds.train_labels == -1).all()


def test_npz_without_expected_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", foo=np.zeros(3))
    with pytest.raises(BdvaeError, match="expected arrays x_train and x_test, x, or images; found foo"):
        data.load_dataset(DataConfig(name="npz", path=str(tmp_path / "d.npz")))


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_with_class_subfolders_and_resizing(tmp_path):
    rng = np.random.default_rng(2)
    for cls in ("cats", "dogs"):
        for i in range(5):
            _write_png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = data.load_dataset(DataConfig(name="folder", path=str(tmp_path), image_size=16, test_fraction=0.2))
    assert ds.shape == (3, 16, 16)
    assert len(ds.train_images) == 8 and len(ds.test_images) == 2
    assert sorted(torch.cat([ds.train_labels, ds.test_labels]).tolist()) == [0] * 5 + [1] * 5


def test_image_folder_grayscale_kept_as_one_channel(tmp_path):
    for i in range(4):
        _write_png(tmp_path / f"{i}.png", np.full((8, 8), i * 60, dtype=np.uint8))
    ds = data.load_dataset(DataConfig(name="folder", path=str(tmp_path), test_fraction=0.25))
    assert ds.shape == (1, 8, 8)
    assert sorted(torch.cat([ds.train_images, ds.test_images])[:, 0, 0, 0].tolist()) == [0, 60, 120, 180]


@pytest.mark.parametrize("case,message", [
    ("empty", "no PNG or JPEG images"),
    ("mixed_sizes", "images of different sizes"),
    ("garbage", "not a readable image"),
])
def test_bad_image_folders(tmp_path, case, message):
    if case == "mixed_sizes":
        _write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
        _write_png(tmp_path / "b.png", np.zeros((9, 8), np.uint8))
    elif case == "garbage":
        (tmp_path / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(BdvaeError, match=message):
        data.load_dataset(DataConfig(name="folder", path=str(tmp_path)))


def test_image_folder_does_not_follow_links_out_of_it(tmp_path):
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    _write_png(outside / "secret.png", np.zeros((8, 8), np.uint8))
    _write_png(inside / "a.png", np.zeros((8, 8), np.uint8))
    _write_png(inside / "b.png", np.zeros((8, 8), np.uint8))
    os.symlink(outside / "secret.png", inside / "link.png")
    os.symlink(outside, inside / "linked_dir")
    ds = data.load_dataset(DataConfig(name="folder", path=str(inside), test_fraction=0.5))
    assert len(ds.train_images) + len(ds.test_images) == 2


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = gzip.compress(pickle.dumps(((_RunsCode(), 1), (2, 3), (4, 5))))
    with pytest.raises(BdvaeError, match="refused pickle: global posix.system is not allowed|global os.system"):
        data.mnist_from_pickle(payload, "evil.pkl.gz")
    assert not (tmp_path / "PWNED").exists()


def test_restricted_unpickler_reads_the_mnist_pickle_layout():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(6, 784)).astype(np.float32) / 256  # the classic pickle's encoding
    labels = np.arange(6, dtype=np.int64)
    payload = gzip.compress(pickle.dumps(((pixels[:3], labels[:3]), (pixels[3:4], labels[3:4]), (pixels[4:], labels[4:])),
                                         protocol=4))  # protocol 2 in Python 3 would name _codecs.encode
    arrays = data.mnist_from_pickle(payload, "small.pkl.gz")
    np.testing.assert_array_equal(arrays["train_images"].reshape(4, 784), np.round(pixels[:4] * 256).astype(np.uint8))
    assert arrays["train_labels"].tolist() == [0, 1, 2, 3]
    assert arrays["test_images"].shape == (2, 28, 28)


def test_real_mnist_is_verified_and_cached(mnist_dir):
    ds = data.load_dataset(DataConfig(data_dir=str(mnist_dir)))
    assert ds.train_images.shape == (60000, 1, 32, 32) and ds.test_images.shape == (10000, 1, 32, 32)
    assert ds.train_images.dtype == torch.uint8
    # The official class counts of MNIST's training and test sets.
    assert torch.bincount(ds.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(ds.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_fetch_from_a_user_folder_of_idx_files(mnist_dir, tmp_path):
    """Source (a): the four standard IDX files, as a user would have them, gzipped or not."""
    arrays, _ = data.read_cache(KNOWN["mnist"], mnist_dir / "mnist")
    source = tmp_path / "idx"
    source.mkdir()
    for i, split in enumerate(data.SPLITS):
        write_idx(source / (data.IDX_NAMES[split] + (".gz" if i % 2 else "")), arrays[split], compress=bool(i % 2))
    messages = []
    folder = data.fetch("mnist", tmp_path / "cache", source_dir=source, log=messages.append)
    assert messages == [f"mnist: fetched from IDX files in {source} into {folder}"]
    assert (folder / "test_images.npy").is_file()


def test_two_processes_filling_one_cache_end_with_one_verified_copy(mnist_dir, tmp_path):
    import subprocess
    import sys

    arrays, _ = data.read_cache(KNOWN["mnist"], mnist_dir / "mnist")
    source = tmp_path / "idx"
    source.mkdir()
    for split in data.SPLITS:
        write_idx(source / data.IDX_NAMES[split], arrays[split])
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "bdvae", "data", "fetch", "mnist", "--source-dir", str(source), "--data-dir", str(cache)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outputs]
    data.read_cache(KNOWN["mnist"], cache / "mnist")  # raises if any array is damaged
    assert sorted(p.name for p in cache.iterdir()) == [".mnist.lock", "mnist"]  # no half-written copies left


@pytest.mark.slow
def test_data_fetch_rechecks_the_cache_under_its_lock(mnist_dir, tmp_path):
    """`data fetch` reads a filled cache again under the lock that a forced fetch replaces the
    folder under, so it never reads a folder that another process is swapping out."""
    import shutil
    import subprocess
    import sys
    import time

    from bdvae.files import file_lock

    cache = tmp_path / "cache"
    shutil.copytree(mnist_dir / "mnist", cache / "mnist")
    cmd = [sys.executable, "-m", "bdvae", "data", "fetch", "mnist", "--data-dir", str(cache)]
    with file_lock(cache / ".mnist.lock"):  # as a forced fetch in another process holds it
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(5)  # the read of the cache alone takes about a second
        assert proc.poll() is None  # waiting for the lock
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "mnist: verified arrays in" in out, err


def test_a_folder_with_other_data_is_a_checksum_mismatch(mnist_dir, tmp_path):
    arrays, _ = data.read_cache(KNOWN["mnist"], mnist_dir / "mnist")
    arrays["test_images"] = arrays["test_images"].copy()
    arrays["test_images"][0, 0, 0] ^= 1  # one flipped bit
    for split in data.SPLITS:
        write_idx(tmp_path / data.IDX_NAMES[split], arrays[split])
    with pytest.raises(BdvaeError, match="test_images checksum mismatch"):
        data.fetch("mnist", tmp_path / "cache", source_dir=tmp_path)
    assert not (tmp_path / "cache" / "mnist").exists()


def test_damaged_cache_is_detected(mnist_dir, tmp_path):
    import shutil

    shutil.copytree(mnist_dir / "mnist", tmp_path / "mnist")
    labels = np.load(tmp_path / "mnist" / "test_labels.npy")
    labels[0] = (labels[0] + 1) % 10
    np.save(tmp_path / "mnist" / "test_labels.npy", labels)
    with pytest.raises(BdvaeError, match="test_labels.npy: checksum mismatch in the data cache") as e:
        data.load_dataset(DataConfig(data_dir=str(tmp_path)))
    # The fix, as a Python caller calls it and as the command line runs it.
    assert str(e.value).endswith("; call bdvae.data.fetch('mnist', force=True)")
    assert e.value.command_line.endswith("; run `bdvae data fetch mnist --force`")


@pytest.mark.skipif(not Path(KNOWN["fashion_mnist"].local_dirs[0]).is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    messages = []
    ds = data.load_dataset(DataConfig(name="fashion_mnist", data_dir=str(tmp_path)), log=messages.append)
    assert messages and "IDX files in /usr/share/datasets/fashion-mnist" in messages[0]
    assert ds.train_images.shape == (60000, 1, 32, 32)
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www, stopped after the test."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # keep test output clean
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_source_with_fall_through(mnist_dir, tmp_path, loopback_server, monkeypatch):
    """Source (b): gzipped IDX files over HTTP. A mirror serving altered data is passed over with
    its reason, and the next mirror that serves the official bytes is used."""
    import dataclasses

    root, url = loopback_server
    arrays, _ = data.read_cache(KNOWN["mnist"], mnist_dir / "mnist")
    for mirror, flip in (("bad", True), ("good", False)):
        (root / mirror).mkdir()
        for split in data.SPLITS:
            array = arrays[split].copy()
            if flip and split == "train_labels":
                array[5] = (array[5] + 1) % 10
            write_idx(root / mirror / (data.IDX_NAMES[split] + ".gz"), array, compress=True)
    known = dataclasses.replace(KNOWN["mnist"], idx_urls=(f"{url}/missing/", f"{url}/bad/", f"{url}/good/"),
                                npz_url=None, pypi_fallback=False)
    monkeypatch.setitem(KNOWN, "mnist", known)
    messages = []
    folder = data.fetch("mnist", tmp_path / "cache", log=messages.append)
    assert messages == [f"mnist: fetched from download from {url}/good/ into {folder}"]
    assert "download from" in (folder / "source.json").read_text()


def test_no_source_reachable_is_one_error_listing_each(tmp_path, loopback_server, monkeypatch):
    import dataclasses

    _, url = loopback_server
    known = dataclasses.replace(KNOWN["mnist"], idx_urls=(f"{url}/nothing-here/",), npz_url=f"{url}/mnist.npz",
                                pypi_fallback=False)
    monkeypatch.setitem(KNOWN, "mnist", known)
    with pytest.raises(BdvaeError, match="could not fetch mnist: download from .*nothing-here.*; download from .*mnist.npz"):
        data.fetch("mnist", tmp_path / "cache" / "deeper")
    assert not (tmp_path / "cache").exists(), "a failed first fetch leaves no folder and no lock behind"


def test_a_failed_forced_fetch_keeps_the_filled_cache(mnist_dir, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    folder = shutil.copytree(mnist_dir / "mnist", cache / "mnist")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (tmp_path / "empty").mkdir()
    with pytest.raises(BdvaeError, match="no train-images-idx3-ubyte"):
        data.fetch("mnist", cache, source_dir=tmp_path / "empty", force=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_lock_removed_while_waited_for_is_taken_anew(tmp_path):
    """A waiter that gets the lock of a file a failed first attempt removed locks the new file,
    so two processes never both hold the lock."""
    import threading

    from bdvae.files import file_lock

    lock = tmp_path / "sub" / ".x.lock"
    inside, order = threading.Event(), []

    def waiter():
        inside.wait()
        with file_lock(lock):
            order.append("waiter in")
            assert lock.exists()

    thread = threading.Thread(target=waiter)
    thread.start()
    with pytest.raises(RuntimeError), file_lock(lock, tidy_on_error=True):
        inside.set()
        thread.join(0.3)  # the waiter blocks on this lock meanwhile
        order.append("first failed")
        raise RuntimeError
    thread.join(10)
    assert order == ["first failed", "waiter in"]


@pytest.mark.parametrize("name", list(data.DATASETS))
def test_every_dataset_says_whether_it_needs_a_path(name):
    """The config asks the registry: data.path is required exactly where the entry needs one."""
    if data.DATASETS[name].needs_path:
        with pytest.raises(BdvaeError, match=f"data.name={name!r} needs data.path"):
            DataConfig(name=name)
    else:
        assert DataConfig(name=name).path is None


def test_the_image_shape_of_an_official_dataset_is_known_without_reading_it():
    from bdvae.config import DataConfig
    from bdvae.data import known_image_shape

    assert known_image_shape(DataConfig()) == (1, 32, 32)  # 28x28 digits padded by 2, as load_dataset does
    assert known_image_shape(DataConfig(name="fashion_mnist", pad=0)) == (1, 28, 28)
    assert known_image_shape(DataConfig(name="npz", path="x.npz")) is None  # only its file knows
