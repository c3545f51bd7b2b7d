"""The small attack test set of test_apgd / test_fab / test_square / test_autoattack: an
untrained MLP, uniform inputs, labels = the model's own predictions with the first `wrong`
shifted by one (points misclassified from the start, which every attack must skip)."""
import torch

from fastmask import models


def mlp_points(n=40, seed=0, wrong=4, mask=None, scale=1.0, shift=0.0):
    """(model, x, y): x = U[0, 1) * scale + shift; y from the unmasked MLP of the same seed."""
    model = models.build("mlp", mask, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g) * scale + shift  # * 1 + 0 changes no bit
    with torch.no_grad():
        y = (model if mask is None else models.build("mlp", seed=seed).eval())(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % 10
    return model, x, y
