"""Digest of a results.json / honest.json without the fields that change from run to run.

    python scripts/results_digest.py [--root DIR] [--dump] FILE...

Dropped: every key whose name holds "time" (wall and CPU times, inference time,
the training-time increase, which is a ratio of CPU times), "versions", and the
"<row> training" lines of honest.json's "about" (CPU and wall seconds). --root:
the output folder the files were written under; it is replaced by "<ROOT>" in
every string, so runs into different folders compare equal. Prints one sha256
per file (of the canonical JSON of what is left); --dump prints that JSON too,
for a diff. Two commits give the same results when every digest is equal
(on the same machine: results differ between CPU models).
"""
import argparse
import hashlib
import json
import sys


def strip(o, root):
    if isinstance(o, dict):
        return {k: strip(v, root) for k, v in o.items()
                if "time" not in k and k != "versions" and not k.endswith(" training")}
    if isinstance(o, list):
        return [strip(v, root) for v in o]
    if isinstance(o, str) and root:
        return o.replace(root.rstrip("/"), "<ROOT>")
    return o


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--root", help="output folder, replaced by <ROOT> in strings")
    p.add_argument("--dump", action="store_true", help="print the stripped JSON")
    a = p.parse_args(argv)
    for f in a.files:
        with open(f) as fh:
            text = json.dumps(strip(json.load(fh), a.root), sort_keys=True, indent=1)
        if a.dump:
            print(text)
        rel = f.replace(a.root.rstrip("/"), "<ROOT>") if a.root else f
        print(f"{hashlib.sha256(text.encode()).hexdigest()}  {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
