"""The README and docs/ pages: every relative link resolves, and the shell blocks marked runnable run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
RUNNABLE = re.compile(r"^```bash runnable\n(.*?)^```", re.S | re.M)


def relative_links(page: Path) -> list[str]:
    """The page's link targets that are files of the repository (not web addresses or in-page anchors)."""
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page: Path) -> None:
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / t.split("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages not linked from the README: {orphans}"


def runnable_blocks() -> list[tuple[str, str]]:
    return [(f"{page.name}:{i}", block) for page in PAGES for i, block in enumerate(RUNNABLE.findall(page.read_text()))]


@pytest.mark.slow
@pytest.mark.parametrize(("where", "block"), runnable_blocks(), ids=[w for w, _ in runnable_blocks()])
def test_runnable_block_runs(where: str, block: str, tmp_path: Path) -> None:
    """A block marked ```bash runnable runs from an empty folder with the venv's commands on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{where} failed:\n{block}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
