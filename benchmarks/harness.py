"""Shared benchmark methodology: timing, machine facts, checks, table and JSON.

Every comparison is a ratio between implementations timed in the same run:
each function is warmed up, then called `inner` times per sample (inner is
chosen so that one sample lasts about `target_s`), and the samples are
interleaved (A B C, B C A, C A B, ...) so that a slow patch of a busy machine
hits every implementation alike. We report the median per-call time with the
min and max over the samples. On CUDA a sample is timed with CUDA events.
"""
import argparse
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

SCHEMA = "fastmask-bench/1"
BENCHES = ("ops", "attacks", "train", "memory")


# ----------------------------------------------------------------------------- timing

def setup_threads(n=None):
    """Use n threads (default: every core); recorded in the JSON. Returns the count."""
    torch.set_num_threads(n or os.cpu_count() or 1)
    return torch.get_num_threads()


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _sample(fn, inner, device):
    """Seconds per call of fn, averaged over `inner` back-to-back calls."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def compare(fns, *, device="cpu", repeats=7, warmup=2, target_s=0.02):
    """Time each callable of `fns` ({name: fn}); returns {name: stats dict}.

    stats: median_s, min_s, max_s (seconds per call), repeats, inner.
    """
    if repeats < 1 or warmup < 0 or target_s <= 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}, target_s={target_s}: "
                         "need repeats >= 1, warmup >= 0, target_s > 0")
    names = list(fns)
    inner = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        synchronize(device)
        once = _sample(fns[name], 1, device)
        inner[name] = max(1, min(10_000, math.ceil(target_s / max(once, 1e-9))))
    samples = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            samples[name].append(_sample(fns[name], inner[name], device))
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s),
                   "repeats": repeats, "inner": inner[name]} for name, s in samples.items()}


def median_ci(values, z=1.96):
    """Median of `values` and its distribution-free 95 % interval: the order statistics
    k and n - k + 1 with k = floor(n / 2 - z sqrt(n) / 2) (the binomial(n, 1/2) bounds),
    so no assumption about the shape of the noise. Returns (median, lo, hi)."""
    v = sorted(values)
    n = len(v)
    k = max(0, math.floor(n / 2 - z * math.sqrt(n) / 2))
    return statistics.median(v), v[k], v[n - 1 - k]


def paired(base, other, *, block, min_pairs=40, max_pairs=400, width=0.01, budget_s=60.0,
           warmup=20):
    """End-to-end A/B of two callables (training steps): pairs of blocks of `block` calls,
    base then other and other then base in turn (so a drift of the machine hits both), each
    pair giving d = t(other) / t(base) - 1 from the wall time of its two blocks. Pairs are
    added until the 95 % interval of the median d is narrower than `width`, or max_pairs,
    or budget_s. Returns {median, lo, hi, width, pairs, block, base_min_s, other_min_s}
    (the per-call minima over the blocks, as a cross-check of the median)."""
    for _ in range(warmup):
        base()
        other()
    diffs, tb, to = [], [], []
    t_end = time.perf_counter() + budget_s

    def run(fn):
        t0 = time.perf_counter()
        for _ in range(block):
            fn()
        return (time.perf_counter() - t0) / block

    while True:
        if len(diffs) % 2 == 0:
            a = run(base)
            b = run(other)
        else:
            b = run(other)
            a = run(base)
        tb.append(a)
        to.append(b)
        diffs.append(b / a - 1)
        n = len(diffs)
        if n >= min_pairs and (n - min_pairs) % 10 == 0:
            med, lo, hi = median_ci(diffs)
            if hi - lo < width or n >= max_pairs or time.perf_counter() > t_end:
                return {"median": med, "lo": lo, "hi": hi, "width": hi - lo, "pairs": n,
                        "block": block, "base_min_s": min(tb), "other_min_s": min(to)}


def timing_opts(args):
    """repeats / warmup / target_s for a tiny (tests), quick or full pass."""
    device = args.device
    if getattr(args, "tiny", False):
        return {"device": device, "repeats": 2, "warmup": 0, "target_s": 1e-4}
    if args.quick:
        return {"device": device, "repeats": 3, "warmup": 1, "target_s": 0.005}
    return {"device": device, "repeats": 11, "warmup": 3, "target_s": 0.05}


def check(what, value, target, higher_is_better=True):
    """A target met or missed: {what, value, target, met}; value None = not measured."""
    if value is None:
        met = None
    else:
        met = value >= target if higher_is_better else value <= target
    op = ">=" if higher_is_better else "<="
    return {"what": what, "value": value, "target": f"{op} {target:g}", "met": met}


# ----------------------------------------------------------------------------- facts

def _version(dist):
    """Installed version of a distribution, without importing it (ART's import takes seconds)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lscpu():
    """lscpu's fields as a dict ({} where lscpu is missing)."""
    import subprocess
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def isa_info():
    """Which SIMD paths this run takes: fastmask's CPU ISA (ops.build_info()["cpu_isa"], capped by
    FASTMASK_CPU_ISA) and torch's own (torch.backends.cpu.get_cpu_capability(), capped by
    ATEN_CPU_CAPABILITY), with the caps as set."""
    try:
        from fastmask import ops
        fm = ops.build_info().get("cpu_isa")
    except Exception as e:  # report, do not guess
        fm = f"unavailable: {type(e).__name__}: {e}"
    try:
        aten = torch.backends.cpu.get_cpu_capability()
    except Exception:
        aten = None
    caps = {k: os.environ[k] for k in ("FASTMASK_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                        "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    return {"fastmask_cpu_isa": fm, "torch_cpu_capability": aten, "isa_caps": caps}


def machine_info(device="cpu"):
    lc = lscpu()
    flags = set(lc.get("Flags", "").split())
    info = {"cpu": lc.get("Model name") or cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_family_model": f"{lc.get('CPU family', '?')}/{lc.get('Model', '?')}" if lc else None,
            "cpu_simd": sorted(f for f in flags if f in ("avx2", "bmi2", "fma", "avx512f", "avx512bw", "avx512vl")),
            **isa_info(),
            "platform": platform.platform(), "python": platform.python_version(),
            "gpu": None}
    if hasattr(os, "getloadavg"):
        info["load_avg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device).index or 0)
    return info


def versions():
    v = {"torch": torch.__version__, "fastmask": _version("fastmask"),
         "fastmask_extension": None, "torchattacks": _version("torchattacks"),
         "art": _version("adversarial-robustness-toolbox"), "numpy": _version("numpy")}
    try:
        import fastmask
        from fastmask import ops
        v["fastmask"] = v["fastmask"] or getattr(fastmask, "__version__", None)
        v["fastmask_extension"] = bool(ops.extension_loaded())
    except Exception as e:  # ops.py missing or broken: say so rather than guess
        v["fastmask_extension"] = f"unavailable: {type(e).__name__}: {e}"
    return v


# ----------------------------------------------------------------------------- report

class Report:
    """Results of one run: printed as a table, written as JSON."""

    def __init__(self, args, argv):
        self.args = args
        self.command = "python -m benchmarks " + " ".join(argv)
        self.results = []
        self.notes = []
        self.elapsed = {}  # bench -> seconds it took

    def add(self, bench, case, timings, *, params=None, metrics=None, checks=None,
            baseline=None, unit="s"):
        """timings: {impl: stats}; metrics: {impl: {name: value}}; baseline: impl for ratios."""
        r = {"bench": bench, "case": case, "params": params or {}, "timings": timings,
             "metrics": metrics or {}, "checks": checks or [], "baseline": baseline}
        self.results.append(r)
        self._print(r)
        return r

    def note(self, text):
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def _print(self, r):
        print(f"\n[{r['bench']}] {r['case']}", flush=True)
        base = r["timings"].get(r["baseline"]) if r["baseline"] else None
        for impl in dict.fromkeys(list(r["timings"]) + list(r["metrics"])):
            t = r["timings"].get(impl)
            time_s = f"{_fmt_s(t['median_s'])} [{_fmt_s(t['min_s'])} .. {_fmt_s(t['max_s'])}]" if t else ""
            ratio = f"  x{base['median_s'] / t['median_s']:.2f} vs {r['baseline']}" \
                if base and t and impl != r["baseline"] else ""
            extra = "  ".join(f"{k}={_fmt(v)}" for k, v in r["metrics"].get(impl, {}).items())
            print(f"  {impl:<22} {time_s}{ratio}  {extra}", flush=True)
        for c in r["checks"]:
            print(f"  {_mark(c['met'])} {c['what']}: {_fmt(c['value'])} (target {c['target']})",
                  flush=True)

    def summary(self):
        checks = [c for r in self.results for c in r["checks"]]
        return {"met": sum(c["met"] is True for c in checks),
                "missed": sum(c["met"] is False for c in checks),
                "not_measured": sum(c["met"] is None for c in checks)}

    def to_dict(self):
        return {"schema": SCHEMA, "command": self.command,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "quick": bool(self.args.quick), "device": self.args.device,
                "only": list(self.args.only), "machine": machine_info(self.args.device),
                "versions": versions(), "results": self.results,
                "checks_summary": self.summary(), "notes": self.notes,
                "elapsed_s": self.elapsed}

    def finish(self):
        d = self.to_dict()
        s = d["checks_summary"]
        print(f"\ntargets: {s['met']} met, {s['missed']} missed, {s['not_measured']} not measured")
        missed = [(r["case"], c) for r in self.results for c in r["checks"] if c["met"] is False]
        for case, c in missed:
            print(f"  MISSED [{case}] {c['what']}: {_fmt(c['value'])} (target {c['target']})")
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(d, f, indent=1)
            print(f"wrote {self.args.json}")
        if self.args.markdown:
            with open(self.args.markdown, "w") as f:
                f.write(to_markdown(d))
            print(f"wrote {self.args.markdown}")
        return d


def to_markdown(d):
    """The run as Markdown: command, machine, versions, one table per benchmark, targets."""
    m, v = d["machine"], d["versions"]
    out = [f"Command: `{d['command']}`  ", f"Date (UTC): {d['date']}  ",
           f"Machine: {m['cpu']}, {m['cores']} cores, "
           f"torch threads {m['threads']}, GPU {m['gpu']}, "
           f"load average at the end {m.get('load_avg_1_5_15')}  ",
           f"ISA path: fastmask {m.get('fastmask_cpu_isa')}, torch {m.get('torch_cpu_capability')}, "
           f"CPU family/model {m.get('cpu_family_model')}, SIMD {' '.join(m.get('cpu_simd') or [])}"
           f"{', caps ' + str(m['isa_caps']) if m.get('isa_caps') else ''}  ",
           "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), ""]
    for note in d["notes"]:
        out.append(f"- note: {note}")
    for bench in dict.fromkeys(r["bench"] for r in d["results"]):
        out += ["", f"### {bench}", "", "| case | impl | median | min .. max | vs baseline | metrics |",
                "|---|---|---|---|---|---|"]
        for r in (r for r in d["results"] if r["bench"] == bench):
            base = r["timings"].get(r["baseline"]) if r["baseline"] else None
            for impl in dict.fromkeys(list(r["timings"]) + list(r["metrics"])):
                t = r["timings"].get(impl)
                med = _fmt_s(t["median_s"]).strip() if t else ""
                rng = f"{_fmt_s(t['min_s']).strip()} .. {_fmt_s(t['max_s']).strip()}" if t else ""
                ratio = f"x{base['median_s'] / t['median_s']:.2f}" if base and t and impl != r["baseline"] else ""
                met = ", ".join(f"{k} {_fmt(x)}" for k, x in r["metrics"].get(impl, {}).items()
                                if not k.startswith("frac_differ"))
                out.append(f"| {r['case']} | {impl} | {med} | {rng} | {ratio} | {met} |")
    out += ["", "### targets", "", "| case | target | value | met |", "|---|---|---|---|"]
    for r in d["results"]:
        for c in r["checks"]:
            out.append(f"| {r['case']} | {c['what']} {c['target']} | {_fmt(c['value'])} | "
                       f"{_mark(c['met']).strip()} |")
    s = d["checks_summary"]
    out += ["", f"{s['met']} met, {s['missed']} missed, {s['not_measured']} not measured.", ""]
    return "\n".join(out)


def _mark(met):
    return {True: "ok  ", False: "MISS", None: "n/a "}[met]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _fmt_s(s):
    if s >= 1:
        return f"{s:8.3f} s "
    if s >= 1e-3:
        return f"{s * 1e3:8.3f} ms"
    return f"{s * 1e6:8.1f} us"


# ----------------------------------------------------------------------------- command line

def parser(prog="python -m benchmarks", only_default=BENCHES):
    p = argparse.ArgumentParser(prog=prog, description="fastmask benchmarks: ratios against "
                                "the eager PyTorch code and the libraries users would pick instead")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke pass)")
    p.add_argument("--json", metavar="PATH", help="write every result to this JSON file")
    p.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--only", default=",".join(only_default),
                   help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: os.cpu_count(); 1 is steadier on a shared machine)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: seconds
    return p


def parse_args(argv, prog="python -m benchmarks", only_default=BENCHES):
    args = parser(prog, only_default).parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in BENCHES]
    if bad:
        raise SystemExit(f"--only: {bad} not in {list(BENCHES)}")
    if args.device not in ("cpu", "cuda"):
        raise SystemExit(f"--device={args.device!r}: expected cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=cuda: torch sees no CUDA device")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads={args.threads}: need >= 1")
    if args.tiny:
        args.quick = True
    return args


def run(argv=None, prog="python -m benchmarks", only_default=BENCHES):
    """Parse argv, run the chosen benchmarks, print the table, write JSON; returns the dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog, only_default)
    setup_threads(args.threads)
    report = Report(args, argv)
    m, v = machine_info(args.device), versions()
    print(f"CPU: {m['cpu']} (family/model {m['cpu_family_model']}; {' '.join(m['cpu_simd'])})\n"
          f"ISA path: fastmask {m['fastmask_cpu_isa']}, torch {m['torch_cpu_capability']}"
          f"{'; caps ' + str(m['isa_caps']) if m['isa_caps'] else ''}", flush=True)
    print(f"machine: {m}\nversions: {v}", flush=True)
    if v["fastmask_extension"] is not True:
        report.note(f"fastmask extension not loaded ({v['fastmask_extension']}): "
                    "fastmask numbers are the pure-PyTorch fallback")
    for name in args.only:
        t0 = time.perf_counter()
        module = importlib.import_module(f"benchmarks.bench_{name}")
        module.bench(args, report)
        report.elapsed[name] = round(time.perf_counter() - t0, 2)
        print(f"\n({name}: {report.elapsed[name]:.1f} s)", flush=True)
    return report.finish()
