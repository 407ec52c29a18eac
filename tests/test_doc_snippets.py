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


def test_every_page_with_python_is_run_and_indented_blocks_are_found():
    with_python = {str(page.relative_to(REPO_ROOT)) for page in [REPO_ROOT / "README.md", *REPO_ROOT.glob("docs/*.md")]
                   if python_snippets(page)}
    assert with_python == set(PAGES)
    assert len(python_snippets(REPO_ROOT / "README.md")) == 3  # the README's default-budget snippet is indented


@pytest.mark.parametrize("page", PAGES)
def test_the_snippets_of_a_page_run_as_written(page, tmp_path):
    program = "\n".join(python_snippets(REPO_ROOT / page))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
