"""The documentation holds together: every relative link of the README, docs/ and the benchmarks'
READMEs resolves, every committed results folder is reachable from the README by links and has its
own README, and the project's words are its own (no tracker references) in the README, docs/ and
benchmarks/ (result data files aside)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LINK = re.compile(r"\]\(([^)\s]+)\)")
TRACKER = re.compile(r"issue[ -]?[0-9]|stop[ -]?[0-9]", re.IGNORECASE)
DATA = {".json", ".jsonl", ".csv", ".png", ".txt"}


def docs():
    return [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md")),
            *sorted(RESULTS.rglob("README.md"))]


def links(md: Path):
    """The local targets of a markdown file's links (URLs and #anchors within the file aside)."""
    for target in LINK.findall(md.read_text(encoding="utf-8")):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        yield (md.parent / target.split("#")[0]).resolve()


def test_every_relative_link_resolves():
    broken = [f"{md.relative_to(REPO)} -> {t}" for md in docs() for t in links(md) if not t.exists()]
    assert not broken, "\n".join(broken)


def test_every_results_folder_has_a_readme_reachable_from_the_readme():
    seen, todo = set(), [REPO / "README.md"]
    while todo:                      # follow links through markdown files and folders' READMEs
        md = todo.pop()
        for t in links(md):
            t = t / "README.md" if t.is_dir() else t
            if t.suffix == ".md" and t.exists() and t not in seen:
                seen.add(t)
                todo.append(t)
    folders = {f.parent for f in RESULTS.rglob("*") if f.is_file() and f.name != "README.md"}
    top = {RESULTS / f.relative_to(RESULTS).parts[0] for f in folders if f != RESULTS}
    assert not [f for f in folders if f == RESULTS], "result files directly in benchmarks/results/"
    missing = sorted(str(f.relative_to(REPO)) for f in top if f / "README.md" not in seen)
    assert not missing, f"results folders not reachable from README.md: {missing}"


def test_readme_fits_and_starts_with_install_and_the_commands():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, len(lines)
    head = "\n".join(lines[:30])
    assert "bash scripts/test.sh" in head and "pip install" in head and "python -m benchmarks" in head


def test_no_tracker_words_in_docs_and_benchmarks():
    files = [REPO / "README.md", *(REPO / "docs").rglob("*"), *(REPO / "benchmarks").rglob("*")]
    hits = []
    for f in files:
        if f.is_dir() or "__pycache__" in f.parts or (RESULTS in f.parents and f.suffix in DATA):
            continue
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if TRACKER.search(line):
                hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    names = [str(d.relative_to(REPO)) for d in RESULTS.rglob("*") if d.is_dir() and TRACKER.search(d.name)]
    assert not hits and not names, "\n".join(hits + names)
