"""AutoAttack in the honest evaluation (HonestSettings.attacks == "autoattack"), beside the PGD rows.

Per row and eps > 0 one piece: the cascade of fastmask.autoattack, "standard" on a row
without test-time masks (and on an "[M_test]" row: deterministic), "rand" on a
"[test mask]" row (EOT over eot_samples draws per step, every result scored over
`draws` forward draws). merge() adds to the row:
- robustness accuracy["autoattack"] / correct["autoattack"] (eps x n): a point counts
  as robust only when it is classified right at its x_adv in every scoring draw; eps 0
  is the clean input (no cascade). The robust worst case (robust_correct) includes it.
- row["autoattack"]: the cascade's report per eps (robust accuracy after each component,
  mean and worst draw; points removed; gradients / queries; seconds).
- the cascade's flags (randomized model, softmax output, zero gradients, Square stronger
  than the white-box attacks, dynamic defence) as "autoattack_*" flags beside the sanity checks.
honest.evaluate_models caches each piece on its own (honest_cache/<row>.autoattack_<j>.pt).

A piece of a row masked at test time draws its masks from its own range of Philox offsets
(the masks' step + (j + 1) * 2^32 for eps index j, below the rank streams' 2^40), so it
draws the same masks whether it runs after the other pieces or alone on a resumed run.
"""
import re

import torch

from . import attacks as A
from . import evaluate as E
from .autoattack import autoattack

__all__ = ["SUITES", "version", "options", "piece", "merge"]

SUITES = ("pgd", "autoattack")  # HonestSettings.attacks: the PGD suite alone, or with AutoAttack beside it
PIECE_SHIFT = 32


def version(test_mask):
    return "rand" if test_mask else "standard"


def options(settings, test_mask, classes=None):
    """The cascade's keywords for one row: the settings' sizes (aa_steps, aa_queries, aa_targets,
    aa_draws; eot_samples), then attack_opts["autoattack"] (checked by the registry entry); the
    targets at most classes - 1 (the original's 9 need 10 classes; classes >= 4, as APGD-T needs)."""
    s = settings
    opts = dict(steps=s.aa_steps, queries=s.aa_queries, targets=s.aa_targets, draws=s.aa_draws,
                eot_samples=s.eot_samples)
    opts.update(s.attack_opts.get("autoattack", {}))
    kw = A.get("autoattack").options(opts)
    kw["version"] = version(test_mask)
    if classes is not None:
        if classes < 4:
            raise ValueError(f"AutoAttack needs a model with >= 4 classes (APGD-T's targeted DLR loss), got one with "
                             f"{classes}; use attacks='pgd'")
        kw["targets"] = min(kw["targets"], classes - 1)
    if not test_mask:  # a deterministic row: one scoring forward, no EOT
        kw["draws"], kw["eot_samples"] = None, 1
    return kw


def piece(model, x, y, eps, j, kw, *, seed, batch_size):
    """One cascade at eps (index j of the sweep): {"correct": n bool, "report": the report, JSON-ready}."""
    fms = A.feature_masks(model)
    saved = [m.step.clone() for m in fms]
    try:
        for m in fms:  # this piece's own offsets (the module docstring)
            m.step.add_((j + 1) << PIECE_SHIFT)
        _, rep = autoattack(model, x, y, eps, seed=seed, batch_size=batch_size, **kw)
    finally:
        for m, s in zip(fms, saved):
            m.step.copy_(s)
    correct = rep.pop("correct").all(1).cpu()
    return {"correct": correct, "report": rep}


def _flag(text, eps):
    head = text.split(":")[0]
    return {"flag": "autoattack_" + re.sub(r"[^a-z0-9]+", "_", head.lower()).strip("_"),
            "detail": f"eps={eps:g}: {text}"}


def merge(row, pieces, eps_list, kw):
    """Add the pieces (None at eps 0) to the row (see the module docstring); returns the row."""
    rob = row["robustness"]
    correct = torch.stack([rob["clean_correct"].clone() if p is None else p["correct"] for p in pieces])
    rob["correct"]["autoattack"] = correct
    rob["accuracy"]["autoattack"] = correct.double().mean(1).tolist()
    rob["robust_correct"] = rob["robust_correct"] & correct
    rob["robust_accuracy"] = rob["robust_correct"].double().mean(1).tolist()
    reports = [dict(p["report"]) for p in pieces if p is not None]
    row["autoattack"] = {"version": kw["version"], "options": {k: v for k, v in kw.items() if k != "version"},
                         "per_eps": reports}
    row["flags"] = E.sanity_checks(rob) + [_flag(t, r["eps"]) for r in reports for t in r["flags"]]
    return row
