"""Modules: random/fixed feature masking, a learned soft mask, gradient manipulation.

FeatureMask draws its masks from the Philox stream (seed, offset) of fastmask.ops:
- training, scope "sample": offset = a step counter (int64 buffer `step`, saved in
  the state_dict, kept on the CPU) that advances by one per call, so every call (and,
  within a call, every sample) gets a fresh mask and a resumed run continues the
  same stream. The counter reaches the op as a tensor (ops.mask_apply accepts a 0-d
  offset tensor), so torch.compile(fullgraph=True) traces one graph for all steps;
- training, scope "fixed": the paper's fixed masking, one mask for every image and
  step: offset FIXED_OFFSET = 2^64 - 1, which the counter never reaches;
- eval, eval_mask "off": no masking (y = x);
- eval, eval_mask "consistent": the paper's M_test, one mask for every test image:
  scope "fixed" at offset FIXED_OFFSET. For a model trained with scope "fixed" this
  is its training mask.
- training, redraw_steps=R (the paper's variability between epochs, eq. 20): one mask
  for every image, as in fixed masking, redrawn every R calls: scope "fixed" at offset
  step // R (R = k epochs x steps per epoch: redrawn every k epochs). The offsets
  0, 1, 2, ... never reach FIXED_OFFSET, so M_test is a mask no epoch trained on.
- rescale=True (inverted dropout, a variant of the paper's eq. 3): the kept features
  are multiplied by 1 / (1 - ratio) wherever the mask is applied (training and M_test),
  so that E[x'] = x for fill 0; with eval_mask "off" the input passes unscaled.

In eager training with the extension, a draw is one call into C++ (ops._mask_step: the
offset from the counter, the op, the counter advanced, the rescale) rather than four from
Python: inside a training step each call costs more than its work (benchmarks/RESULTS.md).
Values and counter are those of the separate calls (_separate_calls), which torch.compile, the
pure-PyTorch fallback and torch function modes still take. The counter advances only once
the op has succeeded.
"""
from typing import Iterable, List, Optional

import torch
from torch import Tensor

from fastmask import _checks as C
from fastmask import ops

__all__ = ["FeatureMask", "LearnedMask", "GradManipulator", "FIXED_OFFSET"]

FIXED_OFFSET = 2 ** 64 - 1  # the offset reserved for fixed and test masks


class FeatureMask(torch.nn.Module):
    """Masks a fraction `ratio` of the input features (N x C x H x W) in training.

    Args: ratio in [0, 1]; mode "pixel" | "block" | "blur"; scope "sample" (fresh
    random mask per sample and call) | "fixed" (one mask throughout); channels
    "shared" | "separate"; fill: value of masked features (pixel, block); seed: the
    Philox key (give two FeatureMask layers different seeds); eval_mask: "off"
    (no masking at eval) | "consistent" (one fixed test mask M_test at eval);
    redraw_steps: None, or R >= 1: one mask for every image, redrawn every R calls
    (scope "sample" only); rescale: multiply by 1 / (1 - ratio) after masking
    (inverted dropout; ratio < 1).
    """

    def __init__(self, ratio: float, mode: str = "pixel", scope: str = "sample",
                 channels: str = "shared", fill: float = 0.0, seed: int = 0,
                 eval_mask: str = "off", redraw_steps: Optional[int] = None,
                 rescale: bool = False):
        super().__init__()
        # validate once here, with the op's own checks
        C.mask_args(ratio, mode, scope, channels)
        C.u64("seed", seed)
        C.fill("fill", fill)
        self.ratio, self.mode, self.scope, self.channels = float(ratio), mode, scope, channels
        self.fill, self.seed = float(fill), int(seed)
        self.eval_mask = C.choice("eval_mask", eval_mask, ("off", "consistent"))
        if redraw_steps is not None:
            C.positive_int("redraw_steps", redraw_steps)
            if scope != "sample":
                raise ValueError(f"redraw_steps={redraw_steps!r} needs scope='sample' (scope={scope!r} never redraws)")
        self.redraw_steps = redraw_steps
        if not isinstance(rescale, bool):
            raise TypeError(f"rescale must be True or False, got {rescale!r}")
        if rescale and self.ratio >= 1.0:
            raise ValueError(f"ratio={self.ratio!r} with rescale=True: 1 / (1 - ratio) is infinite")
        self.rescale = rescale
        self._scale = 1.0 / (1.0 - self.ratio) if rescale else 1.0
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # scope "sample" draws at offset step + stream * 2^40: fastmask.distributed sets stream to
        # the rank so that no two ranks draw the same masks (0, the default, changes nothing)
        self.stream = 0

    def _apply(self, fn, *args, **kwargs):
        # The counter stays on the CPU when the module moves (model.cuda()): reading
        # it for the op then needs no device synchronisation.
        step = self.step
        out = super()._apply(fn, *args, **kwargs)
        self._buffers["step"] = step
        return out

    def forward(self, x: Tensor) -> Tensor:
        if (self.training and ops._use_ext
                and type(x) is Tensor and x.dim() == 4 and x.dtype in ops.FLOAT_DTYPES
                and not torch.compiler.is_compiling()
                and not torch._C._is_torch_function_mode_enabled()):
            # the hot path of a training step: one call does what _masked does below (the
            # counter's read and increment, the op through the dispatcher, the scale); the
            # arguments were checked in __init__ and the op checks them again
            return ops._mask_step(x, self.ratio, C.u64("seed", self.seed), self._buffers["step"],
                                  self.stream, self.redraw_steps or 0, self.mode, self.scope,
                                  self.channels, self.fill, self._scale)
        return self._separate_calls(x)

    def _separate_calls(self, x: Tensor) -> Tensor:
        """forward without the one-call path: the mask through _masked, then the scale."""
        out = self._masked(x)
        return out if self._scale == 1.0 or out is x else out * self._scale

    def _masked(self, x: Tensor) -> Tensor:
        if not self.training:
            if self.eval_mask == "off":
                return x
            return ops.mask_apply(x, self.ratio, seed=self.seed, offset=FIXED_OFFSET,
                                  mode=self.mode, scope="fixed", channels=self.channels,
                                  fill=self.fill)
        step = self._buffers["step"]  # not self.step: Module.__getattr__ is slow (benchmarks/RESULTS.md)
        if self.scope == "fixed":
            offset = FIXED_OFFSET
        elif self.redraw_steps is not None:  # one mask for every image (scope "fixed"), per R calls
            y = ops.mask_apply(x, self.ratio, seed=self.seed, offset=int(step) // self.redraw_steps,
                               mode=self.mode, scope="fixed", channels=self.channels, fill=self.fill)
            step.add_(1)
            return y
        elif torch.compiler.is_compiling():
            # a tensor offset: one graph for every step (no recompilation per value)
            offset = step.clone() if not self.stream else step + (self.stream << 40)
        else:
            # eager without the extension's one-call path (forward): the counter lives on the
            # CPU, so reading it costs no device sync
            offset = int(step) + (self.stream << 40)
        y = ops.mask_apply(x, self.ratio, seed=self.seed, offset=offset, mode=self.mode,
                           scope=self.scope, channels=self.channels, fill=self.fill)
        # after the op, so that a call that raises leaves the counter as it was; an int64
        # buffer: never part of autograd, so no no_grad() context to enter
        step.add_(1)
        return y

    def extra_repr(self) -> str:
        return (f"ratio={self.ratio}, mode={self.mode!r}, scope={self.scope!r}, "
                f"channels={self.channels!r}, fill={self.fill}, seed={self.seed}, "
                f"eval_mask={self.eval_mask!r}"
                + (f", redraw_steps={self.redraw_steps}" if self.redraw_steps is not None else "")
                + (", rescale=True" if self.rescale else ""))


class LearnedMask(torch.nn.Module):
    """A learnable soft mask M = sigmoid(logits) (the paper's eqs. 15-17).

    forward(x) = x * M (M broadcast over the batch); penalty() = l1 * sum |M|, the
    lambda * R(M) term to add to the loss (fastmask.train adds it for every LearnedMask
    in the model). `shape` is the feature shape, e.g. (1, 28, 28); logits start at
    `init` (sigmoid(3) ~ 0.95: almost all kept).

    The mask is not thresholded: training and test compute the same soft x * M, with
    no randomness, so the model is deterministic at test time and an attack's gradient
    is the exact autograd gradient of the function the model computes (no
    straight-through or BPDA surrogate is needed, and none is used). The logits are a
    parameter: they are in the state_dict, hence in every checkpoint.

    In front of a Linear layer, linear(x, layer) computes layer(x * M) with a cheaper backward
    (fastmask.models.Net uses it for the MLP): the same function and input gradient.
    """

    def __init__(self, shape, l1: float = 1e-3, init: float = 3.0):
        super().__init__()
        l1 = C.nonneg("l1", l1)
        self.l1 = l1
        self.logits = torch.nn.Parameter(torch.full(tuple(shape), float(init)))

    def mask(self) -> Tensor:
        return torch.sigmoid(self.logits)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask()

    def penalty(self) -> Tensor:
        """l1 * sum |M| (M > 0, so sum M): one autograd node with the same value and gradient
        as the composition l1 * sigmoid(logits).abs().sum(), in five ops instead of eight."""
        return _Penalty.apply(self.logits, self.l1)

    def linear(self, x: Tensor, layer: torch.nn.Linear) -> Tensor:
        """layer(x * M) for the flattened features x (N x F, F the mask's size), the mask fused
        with the Linear layer after it (fastmask.models.Net does this for the MLP).

        Same output and same gradient for x as the composition; the weight's and the logits'
        gradients equal it up to float rounding. Why: the logits' gradient
        sum_n grad_in[n, f] x[n, f] equals sum_j W[j, f] G[j, f], G = grad_out^T x the layer's
        weight gradient before the mask scales its columns (dW = G * M), so the backward
        needs no grad_in = grad_out W, the N x out x F product the layer without a trained
        mask in front skips (benchmarks/RESULTS.md, the learned mask's cost). First order
        only, like every attack and training loss here.
        """
        if x.dim() != 2 or x.shape[1] != self.logits.numel():
            raise ValueError(f"x must be N x {self.logits.numel()} (the mask's features, flattened), "
                             f"got shape {tuple(x.shape)}")
        return _MaskedLinear.apply(x, self.logits, layer.weight, layer.bias)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.logits.shape)}, l1={self.l1}"


class _Penalty(torch.autograd.Function):
    """l1 * sigmoid(logits).sum(): LearnedMask.penalty. d/dlogits = l1 * s (1 - s), by ATen's
    sigmoid_backward, what autograd computes for l1 * sigmoid(logits).abs().sum() (|s| = s)."""

    @staticmethod
    def forward(ctx, logits, l1):
        s = torch.sigmoid(logits)
        ctx.save_for_backward(s)
        ctx.l1 = l1
        return s.sum() * l1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        return torch.ops.aten.sigmoid_backward((g * ctx.l1).expand(s.shape), s), None


class _MaskedLinear(torch.autograd.Function):
    """linear(x * sigmoid(logits).flatten(), weight, bias): LearnedMask.linear."""

    @staticmethod
    def forward(ctx, x, logits, weight, bias):
        s = torch.sigmoid(logits).reshape(-1)
        ctx.save_for_backward(x, s, weight)
        ctx.logits_shape = logits.shape
        return torch.nn.functional.linear(x * s, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, s, weight = ctx.saved_tensors
        need_x, need_logits, need_w, need_b = ctx.needs_input_grad
        gx = gl = gw = gb = None
        if need_x:  # the composition's ops: linear's grad_in, then the mask's product
            gx = g.mm(weight) * s
        if need_logits or need_w:
            G = g.t().mm(x)  # grad_out^T x: the weight gradient before the mask's column scale
            if need_logits:
                gl = torch.ops.aten.sigmoid_backward((weight * G).sum(0), s).reshape(ctx.logits_shape)
            if need_w:
                gw = G.mul_(s)
        if need_b:
            gb = g.sum(0)
        return gx, gl, gw, gb


class GradManipulator:
    """Gradient clipping / noise / smoothing between backward() and optimizer.step().

        manip = GradManipulator(model.parameters(), max_norm=1.0, noise_std=0.01, seed=0)
        loss.backward(); manip.step(); opt.step()

    Each step calls ops.grad_clip_noise_ on the parameters' gradients (parameters
    without a gradient are skipped) with offset = the step count, so the noise is
    fresh every step and reproducible. With smoothing beta the exponential average
    s <- beta*s + (1-beta)*g replaces the gradient; s starts at the first step's
    (clipped, noised) gradient. state_dict()/load_state_dict() carry the step count
    and the smoothing state, so a resumed run continues identically.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], max_norm: Optional[float] = None,
                 noise_std: float = 0.0, clip_value: Optional[float] = None,
                 smoothing: Optional[float] = None, seed: int = 0):
        self.params: List[torch.nn.Parameter] = list(params)
        self.max_norm, self.noise_std = max_norm, noise_std
        self.clip_value, self.smoothing, self.seed = clip_value, smoothing, seed
        # validate the arguments once with the op's own checks
        ops.grad_clip_noise_([], max_norm, noise_std, seed=seed, clip_value=clip_value,
                             smoothing=smoothing, state=[])
        self.steps = 0
        self.state: Optional[List[Tensor]] = None  # smoothing state, one per gradient
        self.last_norm: Optional[Tensor] = None

    def step(self) -> Tensor:
        """Manipulate the gradients in place; returns their global norm before clipping."""
        grads = [p.grad for p in self.params if p.grad is not None]
        smoothing = self.smoothing
        if smoothing is not None and (self.state is None or len(self.state) != len(grads)):
            smoothing = None  # first step: the state starts at this step's gradient
        norm = ops.grad_clip_noise_(grads, self.max_norm, self.noise_std, seed=self.seed,
                                    offset=self.steps, clip_value=self.clip_value,
                                    smoothing=smoothing,
                                    state=self.state if smoothing is not None else None)
        if self.smoothing is not None and smoothing is None:
            self.state = [g.detach().clone() for g in grads]
        self.steps += 1
        self.last_norm = norm
        return norm

    def state_dict(self) -> dict:
        return {"steps": self.steps,
                "state": None if self.state is None else [s.clone() for s in self.state]}

    def load_state_dict(self, sd: dict) -> None:
        self.steps = int(sd["steps"])
        self.state = None if sd["state"] is None else [s.clone() for s in sd["state"]]
