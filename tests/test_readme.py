"""The documentation (README.md and docs/*.md): its Python examples run as written, and its relative
links and #anchors resolve."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _name(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _expect_policies(out: str) -> None:
    native_u, oea_u = map(int, re.match(r"(\d+) -> (\d+) experts", out).groups())
    assert oea_u < native_u


def _expect_transformers(out: str) -> None:
    assert re.search(r"^U per decode step, layer 0: \[.*\] native: \[.*\]$", out, flags=re.M)
    assert "trace steps: 24 batch: 4" in out


# What the examples of these pages print, checked beyond running without an error.
EXPECT = {"docs/policies.md": _expect_policies, "docs/transformers.md": _expect_transformers}
WITH_PYTHON = [p for p in PAGES if python_blocks(p.read_text())]


def test_pages_with_checked_examples_have_them():
    assert set(EXPECT) <= {_name(p) for p in WITH_PYTHON}


@pytest.mark.parametrize("page", WITH_PYTHON, ids=_name)
def test_examples_run(page, capsys, tmp_path, monkeypatch):
    """Each page's blocks run in order in one namespace, as a reader pasting them into one session would."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in python_blocks(page.read_text()):
        exec(compile(code, str(page), "exec"), namespace)
    out = capsys.readouterr().out
    if _name(page) in EXPECT:
        EXPECT[_name(page)](out)


# ---------------------------------------------------------------------------------------------- links


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (a link's text may hold code: kept as '')."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```[^\n]*$", "", page.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M):
        s = slug(heading)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(page: pathlib.Path, root: pathlib.Path) -> list[str]:
    """Every relative link of `page` whose file, or whose #anchor in that file, does not exist."""
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(root.resolve()) or not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    assert broken_links(page, ROOT) == []


def test_link_check_finds_broken_files_and_anchors(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "b.md").write_text("# Title\n\n## The main job: `moe-reroute demo`\n\n## Title\n")
    page = root / "README.md"
    page.write_text(
        "[ok](docs/b.md) [ok](docs/b.md#the-main-job-moe-reroute-demo) [ok](docs/b.md#title-1) [ok](#top)\n"
        "[web](https://example.org/x#y) `[in code](missing.md)`\n\n```\n[in a block](missing.md)\n```\n"
        "# Top\n[file](docs/c.md) [anchor](docs/b.md#the-main-job) [self](#nowhere) [out](../x.md)\n"
    )
    (tmp_path / "x.md").write_text("")  # exists, but outside the repository
    assert broken_links(page, root) == [
        "docs/c.md: no such file",
        "docs/b.md#the-main-job: no heading '#the-main-job' in b.md",
        "#nowhere: no heading '#nowhere' in README.md",
        "../x.md: no such file",
    ]


# ---------------------------------------------------------------------------------------------- first screen


def test_readme_first_screen_fits_sixty_lines():
    """What it does, the two commands, a result table and the links onward, before line 61."""
    lines = (ROOT / "README.md").read_text().split("\n")
    start = lines.index("## Where to go next")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    while end > start and not lines[end - 1].strip():
        end -= 1
    assert end <= 60, f"the README's first screen ends at line {end}"
    assert sum(line.startswith("- [") for line in lines[start:end]) >= 5


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -n auto' in readme
    assert re.search(r"^pip install [^\n]*torch==2\.13\.0$", ci, flags=re.M)
    # (.ci/editable runs the pip command as it is, holding a lock: the engines' environments install beside it)
    assert re.search(r'^(bash \.ci/editable )?pip install [^\n]*-e "\.\[test\]"$', ci, flags=re.M)
    assert re.search(r"^python -m pytest -n auto$", ci, flags=re.M)
    assert 'pip install torch==2.13.0 && pip install -e ".[hf,plots]" && moe-reroute demo' in readme
