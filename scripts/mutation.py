"""Mutation testing of the Python modules whose rules the tests must pin (mutmut, pinned
by scripts/bootstrap.sh). Not part of `make test`: it runs the focused tests once per
mutant, tens of minutes on 2 cores.

    make mutation                                  # every module below
    .venv/bin/python scripts/mutation.py stats     # one module (or several)
    .venv/bin/python scripts/mutation.py --report  # the report of the runs already done
    .venv/bin/python scripts/mutation.py 'reference=x_pgd_step*,x_mask_generate*'   # some functions

Each module runs in its own scratch copy, build/mutation/<module>/ (the tracked
fastmask/ and tests/ files of the work tree, the built extension beside them), so
the work tree is never mutated and the modules do not share a mutmut cache. The
summary (killed / survived / other per module, and every surviving mutant's
diff) is written to build/mutation/report.md and printed; docs/reliability.md
judges the survivors one by one.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "mutation"

# module -> the tests that pin its rules (the focused selection mutmut runs per mutant)
MODULES = {
    "stats": ["tests/test_stats.py", "tests/test_stats_edges.py",
              "tests/test_registry.py::test_versus_baseline_is_compare_per_row"],
    "reference": ["tests/test_ops.py", "tests/test_kernels_cpu.py", "tests/test_op_rules.py"],
    "attacks": ["tests/test_attacks.py", "tests/test_attack_rules.py", "tests/test_registry.py"],
    "evaluate": ["tests/test_evaluate.py", "tests/test_evaluate_rules.py", "tests/test_attack_rules.py",
                 "tests/test_registry.py", "tests/test_train.py::test_metrics_by_hand"],
}
# tests left out of a module's selection: the comparisons with torchattacks / ART (seconds
# of import each, per mutant) pin the attack arithmetic, which the other tests pin too
DESELECT = {"attacks": "not equal_torchattacks and not equal_art",
            "evaluate": "not equal_torchattacks and not equal_art",
            # subprocesses import the work tree, not the mutated copy
            "reference": "not on_every_isa and not simd_paths and not subprocess"}

# mutmut runs inside this interpreter: the editable install's import hook, which maps
# `fastmask` to the work tree, is removed first, so `import fastmask` finds the
# mutated copy that mutmut puts first on sys.path.
RUNNER = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable_skbc_")]
sys.argv = ["mutmut"] + sys.argv[1:]
from mutmut.__main__ import cli
cli()
"""


def git_files(*paths):
    out = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, check=True, capture_output=True, text=True)
    return [p for p in out.stdout.split() if (ROOT / p).is_file()]


def extension():
    """The built extension of this work tree's venv (FASTMASK_MUTATION_EXT: another build of
    it, e.g. a clean copy while the work tree's build is being changed)."""
    if os.environ.get("FASTMASK_MUTATION_EXT"):
        return Path(os.environ["FASTMASK_MUTATION_EXT"])
    import fastmask._C as C
    return Path(C.__file__)


def pyproject(module, tests):
    select = ["-k", DESELECT[module]] if module in DESELECT else []
    return "\n".join([
        "[tool.pytest.ini_options]",
        'markers = ["slow: long-running", "cuda: needs a CUDA device"]',
        "",
        "[tool.mutmut]",
        'source_paths = ["fastmask"]',
        f'only_mutate = ["fastmask/{module}.py"]',
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        f'pytest_add_cli_args = {json.dumps(["-p", "no:cacheprovider", "-m", "not slow and not cuda"] + select)}',
        # torch (OpenMP) is not fork-safe once it has run: workers fork from a clean server
        'process_isolation = "forkserver"',
        # mutmut's limit is CPU time; module-scoped fixtures (a model trained once) are
        # charged to whichever test runs first, so allow a fixed 20 s on top
        "timeout_constant = 20.0",
        "",
    ])


def run_module(module, python, patterns=()):
    work = OUT / module
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tests = [t for t in MODULES[module] if (ROOT / t.partition("::")[0]).is_file()]
    for p in git_files("fastmask", "tests"):
        (work / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / p, work / p)
    shutil.copy2(extension(), work / "fastmask" / EXT_NAME)
    (work / "pyproject.toml").write_text(pyproject(module, tests))
    # one torch thread: CPU time = wall time (mutmut's timeout counts CPU), and no OpenMP pool
    env = dict(os.environ, FASTMASK_REQUIRE_EXT="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    t0 = time.time()
    with open(work / "mutmut.log", "w") as log:
        names = [f"fastmask.{module}.{p}" for p in patterns]  # e.g. x_pgd_step*: only those mutants
        rc = subprocess.run([python, "-c", RUNNER, "run", *names], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    return rc, time.time() - t0


EXT_NAME = "_C" + __import__("sysconfig").get_config_var("EXT_SUFFIX")

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def results(module, python):
    meta = OUT / module / "mutants" / "fastmask" / f"{module}.py.meta"
    codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    by = {}
    for name, code in sorted(codes.items()):
        by.setdefault(STATUS.get(code, "suspicious"), []).append(name)
    diffs = {}
    for name in by.get("survived", []):
        out = subprocess.run([python, "-c", RUNNER, "show", name], cwd=OUT / module, capture_output=True,
                             text=True)
        diffs[name] = out.stdout.strip()
    return by, diffs


def main(argv):
    report_only = argv == ["--report"]  # rebuild the report from the runs already done
    # MODULE or MODULE=PATTERN,PATTERN (mutmut names of the functions to mutate, e.g. x_pgd_step*)
    picks = [] if report_only else [a.partition("=") for a in argv or list(MODULES)]
    mods = [m for m, _, _ in picks]
    bad = [m for m in mods if m not in MODULES]
    if bad:
        raise SystemExit(f"module must be one of {list(MODULES)}, got {bad}")
    python = sys.executable
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "fastmask", "tests"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    lines = [f"# Mutation report (mutmut, commit {commit}{' + uncommitted changes' if dirty else ''})", "",
             "| module | mutants | killed | survived | other | kill rate | minutes | tests |",
             "|---|---|---|---|---|---|---|---|"]
    detail = []
    for m, _, pats in picks:
        patterns = [p for p in pats.split(",") if p]
        rc, secs = run_module(m, python, patterns)
        (OUT / m / "run.json").write_text(json.dumps({"rc": rc, "minutes": round(secs / 60, 1),
                                                      "commit": commit, "dirty": bool(dirty),
                                                      "only": patterns}))
        print(f"{m}: mutmut exited {rc} after {secs / 60:.1f} min", flush=True)
    # the report covers every module run so far (a rerun of one module replaces its rows)
    for m in MODULES:
        if not (OUT / m / "run.json").exists():
            continue
        run = json.loads((OUT / m / "run.json").read_text())
        by, diffs = results(m, python)
        total = sum(len(v) for v in by.values())
        killed, survived = len(by.get("killed", [])), len(by.get("survived", []))
        other = {k: len(v) for k, v in by.items() if k not in ("killed", "survived", "not checked")}
        checked = total - len(by.get("not checked", []))
        rate = f"{killed / checked:.1%}" if checked else "-"
        only = f", only {' '.join(run['only'])}: {checked} of {total} mutants" if run.get("only") else ""
        lines.append(f"| {m} | {checked} | {killed} | {survived} | {other or 0} | {rate} | {run['minutes']} | "
                     f"{' '.join(MODULES[m])} (commit {run['commit']}{' +' if run['dirty'] else ''}{only}) |")
        if run["rc"] != 0:
            detail.append(f"\nmutmut exited {run['rc']} for {m}: see build/mutation/{m}/mutmut.log")
        for k, names in by.items():
            if k not in ("killed", "survived", "not checked"):
                detail.append(f"\n{m}: {k}: {' '.join(names)}")
        for name, diff in diffs.items():
            detail += ["", f"## survived: {name}", "", "```diff", diff, "```"]
    report = "\n".join(lines + detail) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.md").write_text(report)
    print(report)
    print(f"wrote {OUT / 'report.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
