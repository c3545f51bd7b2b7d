"""A tiny learnable IDX data set for the pipeline tests (3 classes drawn as bright squares)."""
import gzip

import numpy as np
import torch


def idx_bytes(a, images):
    a = np.asarray(a, dtype=np.uint8)
    head = (2051 if images else 2049).to_bytes(4, "big") + len(a).to_bytes(4, "big")
    if images:
        head += (28).to_bytes(4, "big") * 2
    return head + a.tobytes()


def write_idx(folder, n_train=600, n_test=120, seed=0, gz=False):
    """A small learnable IDX data set (3 classes drawn as bright squares)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randint(0, 40, (n, 28, 28), generator=g).to(torch.uint8)
        for c, (r, q) in enumerate([(2, 2), (2, 16), (16, 9)]):
            x[y == c, r:r + 10, q:q + 10] = 230
        for stem, raw in ((f"{split}-images-idx3-ubyte", idx_bytes(x.numpy(), True)),
                          (f"{split}-labels-idx1-ubyte", idx_bytes(y.numpy(), False))):
            if gz:
                (folder / (stem + ".gz")).write_bytes(gzip.compress(raw, mtime=0))
            else:
                (folder / stem).write_bytes(raw)
    return folder
