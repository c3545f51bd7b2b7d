"""fastmask's AutoAttack cascade against the same cascade built from torchattacks components.

Same model, same images, same run, one torch thread: the committed adversarially
trained CNN (docs/measured/cnn_pgd3.pt), a standard CNN and, with --models mlp, a
standard MLP (each trained here for one epoch if its file does not exist), the first
--n MNIST test images, L-inf at each --eps. Both cascades run APGD-CE (100 steps), APGD-T (9 targets x 100 steps), FAB-T and
Square (5000 queries, p_init 0.8, no schedule rescaling), each on the points still
robust, configured as the original (torchattacks' own AutoAttack class defaults to
10 steps, so the cascade is built from APGD / APGDT / FAB / Square here), and FAB-T
(9 targets x 100 steps, alpha_max 0.1, eta 1.05, beta 0.9) third unless --no-fab.

Agreement: each robust accuracy (after each stage and at the end) of torchattacks
must lie in the 95 % Wilson interval of fastmask's (n images). Timing: wall and
process CPU seconds of each cascade, alternating fastmask / torchattacks for
--repeats runs, and the ratio of medians. Where fastmask's time goes: per attack,
the model's forward + backward (gradient evaluations x the measured cost of one
per-sample gradient, queries x one per-sample forward) against the rest (bookkeeping);
the same model work counted for torchattacks (its model wrapped to count the rows it
forwards with and without autograd). The counts are exact; their seconds, and the ratio of
the two sides', come from one timing of each per-sample cost and are rough.

    nice -n 5 .venv/bin/python -m benchmarks.compare_autoattack --n 500 --eps 0.3,0.1 \\
        --out results/compare_autoattack.md
    .venv/bin/python -m benchmarks.compare_autoattack --n 32 --steps 5 --queries 50 --out /tmp/aa.md  # smoke
"""
import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fastmask import attacks, autoattack as AA, data as D, models as M, ops, stats

ROOT = Path(__file__).resolve().parent.parent


def standard_model(path, kind="cnn", seed=0):
    """A standard (not adversarially trained) `kind` ("cnn" or "mlp"): one epoch of Adam on MNIST,
    cached at `path`."""
    path = Path(path)
    d = D.load("mnist")
    x, y = D.to_float(d.x_train), d.y_train
    model = M.build(kind, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    model.train()
    for i in range(0, len(x), 100):
        b = order[i:i + 100]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def load_standard(path, kind="cnn"):
    path = Path(path)
    if path.exists():
        model = M.build(kind)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    return standard_model(path, kind).eval()


def correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


def dist(d, norm):
    """Per-sample distance of a perturbation d, L-inf or L2."""
    return d.abs().flatten(1).amax(1) if norm == "inf" else d.flatten(1).norm(dim=1)


def fastmask_cascade(model, x, y, eps, steps, queries, seed, fab, norm="inf"):
    names = list(AA.STANDARD) if fab else [n for n in AA.STANDARD if n != "fab-t"]
    _, rep = AA.autoattack(model, x, y, eps, norm=norm, version="custom", attacks=names, steps=steps,
                           queries=queries, seed=seed)
    return {"clean": rep["clean"]["mean"], "stages": [(e["name"], e["robust"]["mean"], e["seconds"],
                                                       {"grads": e.get("grads", 0), "queries": e.get("queries", 0)})
                                                      for e in rep["attacks"]],
            "robust": rep["robust"]["mean"]}


class Counted(torch.nn.Module):
    """The model, counting the rows it forwards with autograd on (each a sample-gradient in these
    attacks) and off (a query): torchattacks' model work, as fastmask's attacks count their own."""

    def __init__(self, model):
        super().__init__()
        self.model, self.grads, self.queries = model, 0, 0

    def forward(self, x):
        if torch.is_grad_enabled():
            self.grads += x.shape[0]
        else:
            self.queries += x.shape[0]
        return self.model(x)


def torchattacks_cascade(model, x, y, eps, steps, queries, seed, fab, norm="inf", attacked=None):
    """attacked: the model torchattacks attacks (default `model`; e.g. a channels-last copy, the
    layout fastmask runs a CNN's convolutions in on CPU); every result is judged by `model`."""
    import torchattacks as ta
    judge = model
    model = Counted(model if attacked is None else attacked).eval()
    tn = {"inf": "Linf", "2": "L2"}[norm]
    comps = [("apgd-ce", ta.APGD(model, norm=tn, eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce")),
             ("apgd-t", ta.APGDT(model, norm=tn, eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=10)),
             ("square", ta.Square(model, norm=tn, eps=eps, n_queries=queries, n_restarts=1, p_init=0.8,
                                  loss="margin", resc_schedule=False, seed=seed))]
    if fab:
        comps.insert(2, ("fab-t", ta.FAB(model, norm=tn, eps=eps, steps=steps, n_restarts=1, alpha_max=0.1,
                                         eta=1.05, beta=0.9, seed=seed, multi_targeted=True, n_classes=10)))
    rob = correct(judge, x, y)
    out = {"clean": rob.double().mean().item(), "stages": []}
    for name, atk in comps:
        t0, c0 = time.perf_counter(), time.process_time()
        model.grads = model.queries = 0
        idx = rob.nonzero().squeeze(1)
        if idx.numel():
            xa = atk(x[idx], y[idx])
        cost = {"grads": model.grads, "queries": model.queries}
        if idx.numel():
            rob[idx] = correct(judge, xa, y[idx]) | (dist(xa - x[idx], norm) > eps + 1e-4)
        out["stages"].append((name, rob.double().mean().item(), time.perf_counter() - t0,
                              time.process_time() - c0, cost))
    out["robust"] = out["stages"][-1][1]
    return out


def _min_costs(grad, forward, n, reps=5):
    """(seconds of grad() / n, of forward() / n), each the minimum of `reps` interleaved timings."""
    tg, tf = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        grad()
        tg.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        forward()
        tf.append(time.perf_counter() - t0)
    return min(tg) / n, min(tf) / n


def per_sample_costs(model, x, y, reps=5):
    """(seconds of one per-sample gradient, of one per-sample forward) on this batch, fastmask's
    way: the graph-free gradient and the forward its query-only attacks use."""
    from fastmask.attacks import _logits, _loss_value_grad, model_state
    with model_state(model):
        return _min_costs(lambda: _loss_value_grad(model, x, y, "dlr"), lambda: _logits(model, x), len(x), reps)


def autograd_costs(model, x, y, reps=5):
    """per_sample_costs for a library that differentiates with autograd on `model` as it is given
    (torchattacks): seconds of one per-sample input gradient and of one per-sample forward."""
    import torch.nn.functional as F

    def grad():
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)

    def forward():
        with torch.no_grad():
            model(x)
    return _min_costs(grad, forward, len(x), reps)


def step_ratio(model, x, y, eps, steps=10, reps=3):
    """Seconds per sample-gradient of APGD-CE over PGD (the same steps, images, model), the
    minimum of `reps` interleaved runs each. APGD drops broken points, so it is per sample-gradient."""
    from fastmask import apgd as A
    tp, ta_ = [], []
    for _ in range(reps):
        t0 = time.process_time()
        attacks.pgd(model, x, y, eps, alpha=2.5 * eps / steps, steps=steps)
        tp.append((time.process_time() - t0) / (len(x) * steps))
        st = {"grads": 0}
        t0 = time.process_time()
        A._apgd(model, x, y, eps, "inf", steps, "ce", 1, 0.75, 1, "model", 0, None, 0.0, 1.0, None, st)
        ta_.append((time.process_time() - t0) / st["grads"])
    return min(ta_) / min(tp), min(tp), min(ta_)


def _num(v, spec, suffix="", nonneg=False):
    """A table cell: v formatted, or '–' for a side not run (nan) or, with nonneg, a negative estimate."""
    if v != v or (nonneg and v < 0):
        return "–"
    return f"{v:{spec}}{suffix}"


NOT_RUN = ({"stages": []}, float("nan"), float("nan"))


def work_s(cost, tg, tf):
    """Seconds of model work in a stage's counts: sample-gradients x tg + queries x tf."""
    return cost["grads"] * tg + cost["queries"] * tf


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    r = fn()
    return r, time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--start", type=int, default=0, help="the test images start..start+n-1 (default the first n)")
    ap.add_argument("--eps", default="0.3,0.1")
    ap.add_argument("--norm", default="inf", choices=("inf", "2"))
    ap.add_argument("--torchattacks-layout", default="as-given", choices=("as-given", "channels-last"),
                    help="torchattacks attacks the model as given, or a channels-last copy (fastmask's CPU layout)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per side (alternating)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="standard,cnn_pgd3", help="comma-separated: standard (CNN), cnn_pgd3, "
                    "mlp (a standard MLP), or the path of a fastmask checkpoint")
    ap.add_argument("--standard", default=str(ROOT / "results" / "aa_cnn_standard.pt"))
    ap.add_argument("--standard-mlp", default=str(ROOT / "results" / "aa_mlp_standard.pt"))
    ap.add_argument("--no-fab", dest="fab", action="store_false", help="leave FAB-T out of both cascades")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "compare_autoattack.md"))
    ap.add_argument("--fastmask-only", dest="torchattacks", action="store_false",
                    help="only fastmask's cascade (its figures, without the comparison)")
    ap.add_argument("--step-ratio", action="store_true", help="only time one APGD-CE step against one PGD step")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    d = D.load("mnist")
    x, y = D.to_float(d.x_test[a.start:a.start + a.n]), d.y_test[a.start:a.start + a.n]
    if a.step_ratio:
        model = M.load(ROOT / "docs" / "measured" / "cnn_pgd3.pt").eval()
        for eps in [float(e) for e in a.eps.split(",")]:
            r, tp, tq = step_ratio(model, x, y, eps)
            print(f"cnn_pgd3 eps {eps}: APGD-CE / PGD CPU seconds per sample-gradient = {r:.3f} "
                  f"({tq * 1e3:.3f} / {tp * 1e3:.3f} ms)")
        return None
    zoo = {"standard": lambda: load_standard(a.standard),
           "mlp": lambda: load_standard(a.standard_mlp, "mlp"),
           "cnn_pgd3": lambda: M.load(ROOT / "docs" / "measured" / "cnn_pgd3.pt").eval()}
    rows, lines = [], []
    for mname in a.models.split(","):
        model = zoo[mname]() if mname in zoo else M.load(mname).eval()  # or a fastmask checkpoint's path
        tg, tf = per_sample_costs(model, x, y)
        ta_model = (copy.deepcopy(model).to(memory_format=torch.channels_last)
                    if a.torchattacks_layout == "channels-last" else model)
        tg_ta, tf_ta = autograd_costs(ta_model, x, y)
        for eps in [float(e) for e in a.eps.split(",")]:
            fm_runs, ta_runs = [], []
            for _ in range(a.repeats):
                fm_runs.append(timed(lambda: fastmask_cascade(model, x, y, eps, a.steps, a.queries, a.seed,
                                                              a.fab, a.norm)))
                ta_runs.append(timed(lambda: torchattacks_cascade(model, x, y, eps, a.steps, a.queries, a.seed,
                                                                  a.fab, a.norm, ta_model))
                               if a.torchattacks else NOT_RUN)
            fm, ta = fm_runs[0][0], ta_runs[0][0]
            row = {"model": mname, "norm": a.norm, "torchattacks_layout": a.torchattacks_layout, "eps": eps,
                   "n": a.n, "start": a.start, "seed": a.seed, "steps": a.steps, "queries": a.queries,
                   "clean": fm["clean"], "stages": []}
            for (name, r_fm, s_fm, cost), (name2, r_ta, s_ta, _, cost_ta) in zip(
                    fm["stages"], ta["stages"] or [(n, None, None, None, None) for n, *_ in fm["stages"]]):
                assert name == name2
                lo, hi = stats.wilson(round(r_fm * a.n), a.n)
                model_s = work_s(cost, tg, tf)
                row["stages"].append({"attack": name, "fastmask": r_fm, "torchattacks": r_ta,
                                      "wilson95": [lo, hi], "agree": None if r_ta is None else lo <= r_ta <= hi,
                                      "fastmask_s": s_fm, "torchattacks_s": s_ta,
                                      "fastmask_model_s": model_s, "fastmask_bookkeeping_s": s_fm - model_s,
                                      "fastmask_cost": cost, "torchattacks_cost": cost_ta,
                                      "torchattacks_model_s": None if cost_ta is None else work_s(cost_ta, tg_ta,
                                                                                                  tf_ta)})
            fw = statistics.median(r[1] for r in fm_runs)
            fc = statistics.median(r[2] for r in fm_runs)
            tw = statistics.median(r[1] for r in ta_runs) if a.torchattacks else float("nan")
            tc = statistics.median(r[2] for r in ta_runs) if a.torchattacks else float("nan")
            work_fm = sum(st["fastmask_model_s"] for st in row["stages"])
            work_ta = sum(st["torchattacks_model_s"] or 0.0 for st in row["stages"]) if a.torchattacks else float("nan")
            row.update({"fastmask_wall_s": fw, "torchattacks_wall_s": tw, "fastmask_cpu_s": fc,
                        "torchattacks_cpu_s": tc, "speedup_wall": tw / fw, "speedup_cpu": tc / fc,
                        "per_sample_grad_s": tg, "per_sample_forward_s": tf,
                        "torchattacks_per_sample_grad_s": tg_ta, "torchattacks_per_sample_forward_s": tf_ta,
                        "model_work_ratio": work_ta / work_fm if work_fm else float("nan")})
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = ops.build_info()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines += [f"# AutoAttack cascade: fastmask vs torchattacks components", "",
              f"CPU {cpu}, ISA {info.get('cpu_isa')}, torch {torch.__version__}, {a.threads} thread(s), "
              f"MNIST test images {a.start}..{a.start + a.n - 1}, {'L-inf' if a.norm == 'inf' else 'L2'}, steps {a.steps}, queries {a.queries}, seed {a.seed}, "
              f"{a.repeats} timed run(s) per side, torchattacks on the model {a.torchattacks_layout}.", "",
              "| model | eps | clean | attack | fastmask robust | torchattacks robust | 95 % Wilson (fastmask) | "
              "agree | fastmask s (model / rest) | torchattacks s | model work: sample-gradients + forwards, "
              "fastmask / torchattacks |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for s in r["stages"]:
            ta_r, ta_s = ("not run", "–") if s["agree"] is None else (f"{s['torchattacks']:.1%}",
                                                                      f"{s['torchattacks_s']:.1f}")
            agree = {None: "–", True: "yes", False: "NO"}[s["agree"]]
            c, ct = s["fastmask_cost"], s["torchattacks_cost"]
            work = f"{c['grads']:,} + {c['queries']:,} / " + ("–" if ct is None else f"{ct['grads']:,} + {ct['queries']:,}")
            lines.append(f"| {r['model']} | {r['eps']} | {r['clean']:.1%} | {s['attack']} | {s['fastmask']:.1%} | "
                         f"{ta_r} | {s['wilson95'][0]:.1%}–{s['wilson95'][1]:.1%} | {agree} | "
                         f"{s['fastmask_s']:.1f} ({s['fastmask_model_s']:.1f} / {_num(s['fastmask_bookkeeping_s'], '.1f', nonneg=True)}) | "
                         f"{ta_s} | {work} |")
    lines += ["", "| model | eps | fastmask wall s | torchattacks wall s | speedup (wall) | fastmask CPU s | "
              "torchattacks CPU s | speedup (CPU) | model work, torchattacks / fastmask |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['eps']} | {r['fastmask_wall_s']:.1f} | {_num(r['torchattacks_wall_s'], '.1f')} | "
                     f"{_num(r['speedup_wall'], '.2f', 'x')} | {r['fastmask_cpu_s']:.1f} | "
                     f"{_num(r['torchattacks_cpu_s'], '.1f')} | {_num(r['speedup_cpu'], '.2f', 'x')} | "
                     f"{_num(r['model_work_ratio'], '.2f', 'x')} |")
    lines += ["", "Model work: each side's sample-gradients x one per-sample gradient's seconds plus its forwarded "
              "rows x one per-sample forward's, each side's costs timed once on the whole batch with its own "
              "kernels (fastmask's graph-free path; torchattacks' autograd on the model it attacks). The counts "
              "are exact; the seconds, and so the ratio, are rough estimates (they moved 0.8x-2.8x between runs); "
              "'rest' is '–' where the estimate exceeds the stage's measured seconds, '–' elsewhere: not run."]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
