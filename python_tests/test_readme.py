"""The README's examples run as written, and its commands are the ones CI runs."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_ci_runs_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    for var in ("SETUP", "TESTS", "VLLM"):
        cmd = re.search(rf"^{var}='(.*)'$", ci, flags=re.M).group(1)
        assert cmd in README.splitlines(), cmd
