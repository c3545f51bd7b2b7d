"""Training, as in the paper's section V.

Per epoch: shuffle (seeded torch.Generator); per batch: forward through the
model (its FeatureMask draws a fresh mask in training mode), cross-entropy,
backward, gradient manipulation (fastmask.nn.GradManipulator: clip by global
norm, clamp, Gaussian noise, smoothing, one fused op), optimizer step. After
each epoch the model is validated WITHOUT masking (eval mode).
A model with fastmask.nn.LearnedMask modules (the paper's soft mask) has
lambda * R(M) = l1 * sum |M| of each added to the cross-entropy (eq. 17): the
mask's logits are parameters, trained by the same optimizer, and the reported
loss includes the penalty.

adv_train="fgsm" is fast adversarial training (Wong, Rice and Kolter 2020):
x0 = x + uniform(-eps, eps) (ops.random_start), one signed-gradient step of
alpha = 1.25 eps from x0, projected back to the eps-ball around x and to [0, 1]
(ops.pgd_step: the fgsm step and the projection, fused). It combines with
masking (the attack sees the model's masked forward) and gradient manipulation.
Their MNIST recipe: lr_schedule="cyclic" (per step, linear 0 -> lr at 2/5 of
the epochs -> 0), Adam, eps 0.3, alpha 0.375. adv_train="pgd" with adv_steps=k
is PGD-k training (Madry et al. 2018) from the same random start, alpha default
2.5 eps / k; it costs k + 1 forward/backward passes a step (fast AT: 2).
adv_train="trades" is TRADES (Zhang et al. 2019): loss = CE(f(x), y) + trades_beta *
KL(f(x) || f(x')) / batch, x' from adv_steps signed steps of alpha maximising the KL (sum
over the batch) from x + 0.001 * N(0, 1) as in the original code (not the uniform start of
fast AT: the original's small start only breaks the tie at x, where the KL's gradient is
zero); the Gaussians come from the Philox stream (seed + 3, offset = step), added by
ops.grad_clip_noise_, and each step is ops.pgd_step_ (projection to the eps-ball and
[0, 1]). As in the original, the inner maximisation runs with the model in eval mode (no
mask draws, no dropout) and the outer step in training mode; a step costs adv_steps + 2
forward passes, adv_steps input-gradient passes and one backward through both batches.
adv_train="mart" is MART (Wang et al. 2020), the same way: x' from adv_steps signed steps
up CE(f(x'), y) from the same small Gaussian start (eval mode), loss = BCE(f(x'), y) +
trades_beta * mean_i KL(f(x_i) || f(x'_i)) * (1 - p_y(x_i)), BCE = CE plus
-log(1 - p'(largest wrong class)) (the original's constants 1.0001, 1e-12, 1.0000001).
adv_check=True guards against
catastrophic overfitting: after each epoch, PGD-10 accuracy on a fixed batch of
training images; if it falls more than 0.2 below its best, training stops and
the best epoch's weights are restored.
adv_val=n is early stopping on a held-out PGD check: after each epoch, PGD-adv_val_steps
accuracy (alpha 2.5 eps / steps, random start, fixed seed) on the first n validation
images; at the end the weights of the epoch with the best such accuracy (the earliest on a
tie) are restored, whether or not adv_check stopped the run.

Under torchrun (fastmask.distributed, docs/distributed.md) the model is wrapped in
DistributedDataParallel and each rank takes a contiguous part of every global batch
(cfg.batch_size is the global batch); gradient manipulation runs on the all-reduced
gradient with the same noise on every rank, so the replicas stay bit-identical.

Same seed, same machine, same thread count: identical numbers.
"""
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import _checks as C
from .data import to_float

OPTIMIZERS = ("adam", "sgd")
ADV_TRAIN = (None, "fgsm", "pgd", "trades", "mart")
SMALL_START = ("trades", "mart")  # the inner loop of trades_example
LR_SCHEDULES = ("constant", "cyclic")


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9       # sgd only
    weight_decay: float = 0.0
    seed: int = 0
    grad: dict = field(default_factory=dict)  # GradManipulator kwargs: max_norm, noise_std, clip_value, smoothing
    adv_train: str = None       # None, "fgsm" (fast AT) or "pgd" (PGD-k AT, k = adv_steps)
    adv_eps: float = 0.1
    eval_batch: int = 1000
    lr_schedule: str = "constant"  # "cyclic": 0 -> lr at 2/5 of the epochs -> 0, per step (Wong et al.)
    adv_alpha: float = None     # step; None: 1.25 * adv_eps for fgsm, 2.5 * adv_eps / adv_steps for pgd
    adv_steps: int = 1          # pgd: steps per example (fgsm: 1)
    adv_check: bool = False     # early stop on PGD accuracy of a training batch (catastrophic overfitting)
    trades_beta: float = 6.0    # trades and mart: weight of the KL term
    adv_val: int = 0            # > 0: keep the epoch with the best PGD accuracy on this many validation images
    adv_val_steps: int = 10     # steps of that PGD check
    fused: bool = True          # torch's fused Adam / SGD kernel (one pass per tensor); False: its per-op loop

    def __post_init__(self):
        for k in ("epochs", "batch_size", "eval_batch", "adv_steps", "adv_val_steps"):
            C.field(C.positive_int, k, getattr(self, k))
        C.field(C.positive, "lr", self.lr)
        C.field(C.choice, "optimizer", self.optimizer, OPTIMIZERS)
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused={self.fused!r} must be True or False")
        C.field(C.choice, "adv_train", self.adv_train, ADV_TRAIN)
        if self.adv_train and not self.adv_eps > 0:
            raise ValueError(f"adv_eps={self.adv_eps!r} must be > 0 for adversarial training")
        C.field(C.choice, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.adv_alpha is not None and not self.adv_alpha > 0:
            raise ValueError(f"adv_alpha={self.adv_alpha!r} must be > 0 (or None for 1.25 * adv_eps)")
        if self.adv_check and not self.adv_train:
            raise ValueError("adv_check=True needs adv_train")
        if self.adv_steps != 1 and self.adv_train not in ("pgd",) + SMALL_START:
            raise ValueError(f"adv_steps={self.adv_steps!r} needs adv_train='pgd', 'trades' or 'mart' "
                             "(fgsm takes one step)")
        C.field(C.nonneg, "trades_beta", self.trades_beta)
        C.field(C.nonneg_int, "adv_val", self.adv_val)
        if self.adv_val and not self.adv_train:
            raise ValueError(f"adv_val={self.adv_val!r} needs adv_train")
        unknown = set(self.grad or {}) - {"max_norm", "noise_std", "clip_value", "smoothing"}
        if unknown:
            raise ValueError(f"grad has unknown keys {sorted(unknown)}")

    def to_dict(self):
        return asdict(self)


# ---------------------------------------------------------------- validation
def validate(model, x, y, batch_size=1000):
    """Clean accuracy, loss, macro precision/recall/F1 and confusion of the model in eval mode
    (x uint8 or float in [0, 1]); the metrics are evaluate.classification_metrics."""
    from .evaluate import classification_metrics, logits
    out = logits(model, to_float(x) if x.dtype == torch.uint8 else x, batch_size=batch_size)
    m = classification_metrics(out.argmax(1), y, 10)
    m = {k: m[k] for k in ("accuracy", "precision", "recall", "f1", "confusion")}
    m["loss"] = F.cross_entropy(out, y).item()
    return m


# ---------------------------------------------------------------- training
def make_optimizer(model, cfg):
    """Adam or SGD over the model's parameters. cfg.fused picks torch's fused kernel (CPU and
    CUDA): besides being one pass, its cost does not depend on the values, while the per-op
    Adam's sqrt runs several times slower on the exact zeros a mask leaves in its second
    moments (pixels that never reach the first layer), which made masked steps look dearer
    than the mask (benchmarks/RESULTS.md, issue 17)."""
    params = list(model.parameters())
    fused = cfg.fused and all(p.device.type in ("cpu", "cuda") for p in params) or None
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)


def default_alpha(eps, steps):
    """The training attack's step: 1.25 eps for one step (fast AT), 2.5 eps / k for k steps."""
    return 1.25 * eps if steps == 1 else 2.5 * eps / steps


def fgsm_example(model, x, y, eps, seed, step, alpha=None, steps=1):
    """Adversarial-training example: random start in the eps-ball, then `steps` signed-gradient
    steps of alpha, each projected to the eps-ball and [0, 1]. steps=1 is fast AT (Wong et al.
    2020; alpha default 1.25 eps), steps=k PGD-k training (Madry et al.; default 2.5 eps / k)."""
    from . import ops
    if alpha is None:
        alpha = default_alpha(eps, steps)
    x_adv = ops.random_start(x, eps, seed=seed, offset=step, norm="inf", lo=0.0, hi=1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (g,) = torch.autograd.grad(loss, x_adv)  # input gradient only: no parameter .grad is touched
        x_adv = ops.pgd_step(x_adv.detach(), x, g, alpha, eps, 0.0, 1.0, "inf")
    return x_adv


def trades_example(model, x, eps, seed, step, alpha=None, steps=1, y=None):
    """TRADES's inner maximisation: from x + 0.001 * N(0, 1) (Philox stream (seed, step)),
    `steps` signed steps of alpha up the gradient of sum KL(f(x) || f(x')), each projected to
    the eps-ball and [0, 1], with the model in eval mode (restored afterwards).
    With labels y, the steps go up CE(f(x'), y) instead: MART's inner maximisation."""
    from . import ops
    if alpha is None:
        alpha = default_alpha(eps, steps)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p_nat = F.softmax(model(x), dim=1) if y is None else None
            x_adv = torch.zeros_like(x)
            ops.grad_clip_noise_([x_adv], noise_std=0.001, seed=seed, offset=step)
            x_adv += x
        for _ in range(steps):
            x_adv.requires_grad_(True)
            out = model(x_adv)
            if y is None:
                loss = F.kl_div(F.log_softmax(out, dim=1), p_nat, reduction="sum")
            else:
                loss = F.cross_entropy(out, y)
            (g,) = torch.autograd.grad(loss, x_adv)  # input gradient only: no parameter .grad is touched
            x_adv = ops.pgd_step_(x_adv.detach(), x, g, alpha, eps, 0.0, 1.0, "inf")
    finally:
        model.train(was_training)
    return x_adv


def trades_loss(logits_nat, logits_adv, y, beta):
    """CE(f(x), y) + beta * sum KL(f(x) || f(x')) / batch (the original's KLDivLoss(sum) / batch)."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="sum")
    return F.cross_entropy(logits_nat, y) + beta * kl / len(y)


def mart_loss(logits_nat, logits_adv, y, beta):
    """MART's objective, with the original's constants: BCE(f(x'), y) + beta * mean_i
    sum_c KL(p_i || p'_i) * (1.0000001 - p_i[y_i]), p = softmax(f(x)), p' = softmax(f(x'))."""
    p_adv, p_nat = F.softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1)
    wrong = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), float("-inf")).argmax(1)
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(1)
    return bce + beta * (kl * (1.0000001 - p_nat.gather(1, y[:, None])[:, 0])).sum() / len(y)


def lr_at(cfg, t):
    """Learning rate at t epochs into training (t in [0, epochs])."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    peak = 0.4 * cfg.epochs
    return cfg.lr * (t / peak if t <= peak else max(0.0, (cfg.epochs - t) / (cfg.epochs - peak)))


def train_batch_pgd_acc(model, x, y, eps, seed):
    """PGD-10 (alpha eps/4, random start) accuracy on a training batch: the early-stop signal."""
    from .attacks import pgd
    from .evaluate import predict
    x_adv = pgd(model, x, y, eps, alpha=eps / 4, steps=10, seed=seed)
    return (predict(model, x_adv) == y).double().mean().item()


def val_pgd_acc(model, x, y, eps, steps, seed):
    """PGD-steps (alpha 2.5 eps / steps, random start) accuracy on held-out images: the adv_val signal."""
    from .attacks import pgd
    from .evaluate import predict
    x_adv = pgd(model, x, y, eps, alpha=2.5 * eps / steps, steps=steps, seed=seed)
    return (predict(model, x_adv) == y).double().mean().item()


def train(model, data, cfg, progress=False, log=None, on_epoch=None):
    """Train `model` on data.x_train with cfg (TrainConfig or dict). Returns a dict with the
    per-epoch history (loss, train_acc on the masked batches, val metrics, wall time, process CPU
    time), train_time (wall) and train_cpu_time (CPU; robust to other load on a shared machine).
    on_epoch(epoch, model, history), if given, is called after each epoch's checks with the model
    as that epoch left it (e.g. to save a snapshot for a robustness-vs-CPU-time curve)."""
    if isinstance(cfg, dict):
        cfg = TrainConfig(**cfg)
    from . import distributed  # under torchrun: DDP, each rank a contiguous part of every global batch
    world, dev = distributed.world_size(), next(model.parameters()).device
    if cfg.adv_train in SMALL_START and world > 1:  # two forwards through DDP before one backward: not wired
        raise ValueError(f"adv_train={cfg.adv_train!r} runs on one process, got world size {world}")
    from .nn import LearnedMask
    net = distributed.wrap(distributed.mask_streams(model))
    opt = make_optimizer(model, cfg)
    learned = [m for m in model.modules() if isinstance(m, LearnedMask)]
    manip = None
    if any(v for v in (cfg.grad or {}).values()):
        from .nn import GradManipulator
        manip = GradManipulator(list(model.parameters()), seed=cfg.seed + 2, **cfg.grad)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, bs = len(data.y_train), cfg.batch_size
    history, step, train_time, train_cpu = [], 0, 0.0, 0.0
    steps_per_epoch = (n + bs - 1) // bs
    best_check, best_state, stopped = -1.0, None, None
    if cfg.adv_check:
        x_check, y_check = to_float(data.x_train[:512]), data.y_train[:512]
    best_val, best_val_state, best_val_epoch = -1.0, None, None
    if cfg.adv_val:
        x_vpgd, y_vpgd = to_float(data.x_val[:cfg.adv_val]).to(dev), data.y_val[:cfg.adv_val].to(dev)
    bar = None
    if progress and distributed.is_main():
        from tqdm import tqdm
        bar = tqdm(total=cfg.epochs * ((n + bs - 1) // bs), leave=False, dynamic_ncols=True)
    for epoch in range(1, cfg.epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        model.train()
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, n, bs):
            idx = perm[i:i + bs]  # the global batch: the same on every rank
            mine = distributed.chunk(idx)
            x, y = to_float(data.x_train[mine]).to(dev), data.y_train[mine].to(dev)
            if cfg.lr_schedule != "constant":
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, (step + 1) / steps_per_epoch)
            if cfg.adv_train in SMALL_START:
                mart = cfg.adv_train == "mart"
                x_adv = trades_example(model, x, cfg.adv_eps, cfg.seed + 3, step, cfg.adv_alpha, cfg.adv_steps,
                                       y if mart else None)
                logits_nat, logits = net(x), net(x_adv)  # train_acc: on the adversarial examples, as for pgd
                loss = (mart_loss if mart else trades_loss)(logits_nat, logits, y, cfg.trades_beta)
            else:
                if cfg.adv_train:
                    x = fgsm_example(model, x, y, cfg.adv_eps, cfg.seed + 3, distributed.stream_offset(step),
                                     cfg.adv_alpha, cfg.adv_steps)
                logits = net(x)
                if world > 1:  # scaled so that DDP's mean over the ranks is the mean over the global batch
                    loss = F.cross_entropy(logits, y, reduction="sum") * (world / len(idx))
                else:
                    loss = F.cross_entropy(logits, y)
            for m in learned:  # lambda * R(M), eq. 17
                loss = loss + m.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if manip is not None:
                manip.step()
            opt.step()
            step += 1
            loss_sum += loss.item() * (len(y) if world == 1 else len(idx) / world)
            correct += (logits.argmax(1) == y).sum().item()
            if bar is not None:
                bar.update(1)
                bar.set_description(f"epoch {epoch}/{cfg.epochs} loss {loss.item():.3f}")
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if world > 1:  # the epoch's figures over every rank (cpu_time: the sum of the ranks' CPU times)
            loss_sum, correct, dc = distributed.all_reduce_sum([loss_sum, correct, dc])
        train_time += dt
        train_cpu += dc
        val = validate(model, data.x_val, data.y_val, cfg.eval_batch)
        row = {"epoch": epoch, "loss": loss_sum / n, "train_acc": correct / n,
               "val_loss": val["loss"], "val_acc": val["accuracy"], "val_precision": val["precision"],
               "val_recall": val["recall"], "val_f1": val["f1"], "time": dt, "cpu_time": dc}
        if cfg.adv_check:
            row["train_batch_pgd_acc"] = acc = train_batch_pgd_acc(model, x_check, y_check, cfg.adv_eps, cfg.seed)
            if acc > best_check:
                best_check, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
        if cfg.adv_val:
            row["val_pgd_acc"] = acc = val_pgd_acc(model, x_vpgd, y_vpgd, cfg.adv_eps, cfg.adv_val_steps, cfg.seed)
            if acc > best_val:
                best_val, best_val_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
                best_val_epoch = epoch
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, model, history)
        if log is not None:
            log(f"  epoch {epoch}: loss {row['loss']:.4f} train acc {row['train_acc']:.4f} "
                f"val acc {row['val_acc']:.4f} ({dt:.1f} s)"
                + (f" train-batch PGD acc {row['train_batch_pgd_acc']:.4f}" if cfg.adv_check else "")
                + (f" val PGD-{cfg.adv_val_steps} acc {row['val_pgd_acc']:.4f}" if cfg.adv_val else ""))
        if cfg.adv_check and row["train_batch_pgd_acc"] < best_check - 0.2:  # catastrophic overfitting
            stopped = epoch
            if log is not None:
                log(f"  early stop at epoch {epoch}: train-batch PGD accuracy fell from {best_check:.4f}")
            break
    if bar is not None:
        bar.close()
    if cfg.adv_val and best_val_state is not None:
        model.load_state_dict(best_val_state)  # the epoch with the best held-out PGD accuracy
    elif cfg.adv_check and best_state is not None:
        model.load_state_dict(best_state)  # the epoch with the best training-batch PGD accuracy
    model.eval()
    out = {"history": history, "train_time": train_time, "train_cpu_time": train_cpu, "steps": step}
    if world > 1:
        out["world_size"] = world
        out["replica_sha256"] = distributed.replica_hashes(model)
        if len(set(out["replica_sha256"])) > 1:
            print(f"fastmask: warning: the {world} replicas differ after training "
                  f"(state_dict SHA-256 {out['replica_sha256']})", file=sys.stderr)
    if cfg.adv_check:
        out["early_stop"] = {"stopped_at_epoch": stopped, "best_train_batch_pgd_acc": best_check}
    if cfg.adv_val:
        out["best_val_pgd"] = {"epoch": best_val_epoch, "val_pgd_acc": best_val, "n": len(y_vpgd),
                               "steps": cfg.adv_val_steps}
    return out
