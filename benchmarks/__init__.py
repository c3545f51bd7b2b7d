"""fastmask benchmarks: `python -m benchmarks` (or `fastmask bench`); see benchmarks/RESULTS.md."""


def main(argv=None):
    """Run the benchmarks with command-line arguments `argv` (default sys.argv[1:]); returns the result dict."""
    from benchmarks.harness import run
    return run(argv)
