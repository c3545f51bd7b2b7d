"""torch.distributed plumbing, in one place; every helper is a no-op in a single process.

Launched by torchrun (WORLD_SIZE > 1 in the environment), `launched()` joins the
process group: gloo when there is no GPU, "cpu:gloo,cuda:nccl" when there is one
(CUDA tensors go through NCCL, CPU tensors through gloo). Without WORLD_SIZE (or
with WORLD_SIZE=1) nothing is initialised and every helper answers as for rank 0
of 1, so the single-process code path and its results are unchanged.

- rank(), world_size(), local_rank(), is_main(), enabled(), device()
- chunk(t): this rank's contiguous part of a global batch (DistributedSampler-style)
- shard_map(fn, n): [fn(i) for i in range(n)], item i computed on rank i % world and
  gathered, in order, on every rank (attack evaluation)
- all_reduce_sum(values), all_gather(obj), broadcast(obj) (from rank 0)
- wrap(model): DistributedDataParallel (FeatureMask step counters excluded from syncing)
- mask_streams(model): rank-distinct FeatureMask draws (offset high bits = rank)
- stream_offset(offset): the same for other Philox draws (fast-AT random starts)
- replica_hashes(model): SHA-256 of every rank's state_dict (replicas must be identical)
- barrier(), teardown(), abort(), launched() (the CLI's wrapper)

Failures: launched() names the failing rank on stderr and aborts the process group,
so the other ranks' pending collectives fail at once instead of waiting; torchrun
then stops the job. A rank that hangs is caught by the collective timeout
(FASTMASK_DIST_TIMEOUT seconds, default 900).
"""
import contextlib
import datetime
import hashlib
import os
import sys

import torch
import torch.distributed as dist

__all__ = ["enabled", "rank", "world_size", "local_rank", "is_main", "device", "backend", "init",
           "launched", "chunk", "shard_map", "all_reduce_sum", "all_gather", "broadcast", "wrap",
           "mask_streams", "stream_offset", "replica_hashes", "barrier", "teardown", "abort",
           "STREAM_SHIFT", "DEFAULT_TIMEOUT_S"]

STREAM_SHIFT = 40           # rank r draws at Philox offsets r * 2^40 + step (rank 0: unchanged)
DEFAULT_TIMEOUT_S = 900.0   # collective timeout; FASTMASK_DIST_TIMEOUT overrides


def enabled():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if enabled() else 0


def world_size():
    return dist.get_world_size() if enabled() else 1


def local_rank():
    return int(os.environ.get("LOCAL_RANK", "0")) if enabled() else 0


def is_main():
    return rank() == 0


def backend():
    """FASTMASK_DIST_BACKEND if set, else gloo (no GPU) or cpu:gloo,cuda:nccl (GPU)."""
    forced = os.environ.get("FASTMASK_DIST_BACKEND")
    if forced:
        return forced
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def device():
    """Where this rank's model should live: cuda:LOCAL_RANK in a distributed run with NCCL, else cpu."""
    if enabled() and "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def _env_int(name, default):
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def timeout_s():
    text = os.environ.get("FASTMASK_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0:
        raise ValueError(f"FASTMASK_DIST_TIMEOUT={text!r} must be a number of seconds > 0")
    return v


def init():
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns enabled()."""
    if enabled() or _env_int("WORLD_SIZE", 1) <= 1:
        return enabled()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} unset: "
                           f"launch with torchrun (python -m torch.distributed.run)")
    b = backend()
    if "nccl" in b:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    dist.init_process_group(b, timeout=datetime.timedelta(seconds=timeout_s()))
    hook = sys.excepthook

    def on_uncaught(*exc):  # Python-API users: a crash aborts the group instead of leaving peers waiting
        abort()
        hook(*exc)
    sys.excepthook = on_uncaught
    return True


def teardown():
    if enabled():
        dist.destroy_process_group()


def abort():
    """Tear the process group down without waiting for the peers (their collectives then fail)."""
    if not enabled():
        return
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:  # older torch / already broken: a plain destroy is the next best thing
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def barrier():
    """Wait for every rank; on gloo a rank that does not arrive within the timeout is named."""
    if not enabled():
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s()))
    else:
        dist.barrier()


@contextlib.contextmanager
def launched():
    """The CLI's wrapper: init(); only rank 0 writes to stdout; on success wait for every rank and
    leave the group; on failure name the rank on stderr, abort the group and re-raise."""
    if not init():
        yield
        return
    stdout = sys.stdout
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    try:
        yield
        barrier()
    except BaseException as e:
        what = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
        why = type(e).__name__ + (": " + str(e).strip().splitlines()[0] if str(e).strip() else "")
        print(f"fastmask: rank {rank()} of {world_size()} {what} ({why}); stopping the job",
              file=sys.stderr, flush=True)
        abort()
        raise
    else:
        teardown()
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout


# ---------------------------------------------------------------- data and results
def chunk(t):
    """This rank's contiguous part of t (dim 0): rank r of W gets [r*n//W, (r+1)*n//W)."""
    n, r, w = len(t), rank(), world_size()
    return t[r * n // w:(r + 1) * n // w]


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not enabled():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's obj, on every rank."""
    if not enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values):
    """Element-wise sums over the ranks of a list of numbers (float64), as a list of floats."""
    if not enabled():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if "nccl" in str(dist.get_backend()) and "gloo" not in str(dist.get_backend()):
        t = t.to(device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def shard_map(fn, n):
    """[fn(0), ..., fn(n-1)]: rank r computes items r, r+W, r+2W, ...; the results are gathered
    on every rank in item order. In one process: the plain loop, in order."""
    mine = {i: fn(i) for i in range(rank(), n, world_size())}
    if not enabled():
        return [mine[i] for i in range(n)]
    merged = {}
    for part in all_gather(mine):
        merged.update(part)
    return [merged[i] for i in range(n)]


# ---------------------------------------------------------------- models
def _feature_masks(model):
    from .nn import FeatureMask
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FeatureMask)]


def mask_streams(model):
    """Give this rank its own FeatureMask stream: offset = step + rank * 2^STREAM_SHIFT (rank 0 and
    single-process runs unchanged; fixed and test masks, at FIXED_OFFSET, stay the same on every rank)."""
    for _, m in _feature_masks(model):
        m.stream = rank()
    return model


def stream_offset(offset):
    """A Philox offset made rank-distinct like the FeatureMask streams."""
    return offset + (rank() << STREAM_SHIFT)


def wrap(model):
    """DistributedDataParallel around model (a no-op in one process). Parameters and buffers are
    broadcast from rank 0, except the FeatureMask step counters (CPU tensors that advance
    identically on every rank)."""
    if not enabled():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ignore = [f"{name}.step" if name else "step" for name, _ in _feature_masks(model)]
    if ignore:
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    dev = next(model.parameters()).device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def state_hash(model):
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_hashes(model):
    """SHA-256 of the state_dict of every rank's replica (one entry in a single process)."""
    return all_gather(state_hash(model))
