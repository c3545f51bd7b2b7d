"""The README's API example runs as written (keeps the first screen true)."""
import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_readme_names_the_two_setup_commands():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first_screen = "\n".join(text.splitlines()[:30])
    assert "make reproduce" in first_screen and "make test" in first_screen
    assert "make test" in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
