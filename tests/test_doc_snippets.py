"""The Python snippets of the README and the docs run as written, in order, in a fresh process and folder."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The pages whose snippets are one runnable program each (a later snippet may use what an earlier one made).
PAGES = ["README.md", "docs/deploy.md", "docs/generation.md", "docs/training.md", "docs/budget_planning.md"]
SNIPPET = re.compile(r"^( *)```python\n(.*?)^\1```", re.MULTILINE | re.DOTALL)


def python_snippets(page: Path) -> list[str]:
    return [textwrap.dedent(code) for _, code in SNIPPET.findall(page.read_text())]


def test_snippets_are_found_in_every_page_and_in_indented_blocks():
    counts = {page: len(python_snippets(REPO_ROOT / page)) for page in PAGES}
    assert counts["README.md"] == 3 and all(counts.values())  # the README's default-budget snippet is indented


@pytest.mark.parametrize("page", PAGES)
def test_the_snippets_of_a_page_run_as_written(page, tmp_path):
    program = "\n".join(python_snippets(REPO_ROOT / page))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
