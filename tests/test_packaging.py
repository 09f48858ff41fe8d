"""What the package declares is what it has: package data that exists, runtime requirements the code
imports, an install check that imports only declared packages, and the design document the README
points to, covering every public op."""
import ast
import re
from pathlib import Path

import hope_kernels

REPO = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"pyyaml": "yaml"}   # distribution name -> import name, where they differ


def setup_kwargs() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
            if kw.arg in ("install_requires", "package_data", "extras_require")}


def imported_modules(*folders) -> set:
    names = set()
    for folder in folders:
        for f in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_package_data_exists():
    for package, patterns in setup_kwargs()["package_data"].items():
        for pattern in patterns:
            assert list((REPO / package).glob(pattern)), f"setup.py package_data {package}/{pattern} matches no file"


def test_every_runtime_requirement_is_used():
    used = imported_modules("hope", "hope_kernels")
    for req in setup_kwargs()["install_requires"]:
        name = dist_name(req)
        assert IMPORT_NAMES.get(name, name) in used, f"setup.py requires {name!r} but hope / hope_kernels never import it"


def test_install_check_imports_only_declared_packages():
    kw = setup_kwargs()
    declared = {IMPORT_NAMES.get(dist_name(r), dist_name(r)).replace("-", "_")
                for r in kw["install_requires"] + sum(kw["extras_require"].values(), [])}
    declared |= {"hope", "hope_kernels", "os", "xdist"}           # xdist is pytest-xdist's module
    line = next(line for line in (REPO / "scripts" / "install.sh").read_text().splitlines() if "import hope_kernels" in line)
    modules = {m.strip() for m in re.search(r"import ([\w, ]+);", line).group(1).split(",")}
    assert modules <= declared, f"scripts/install.sh imports undeclared {sorted(modules - declared)}"


def test_design_document_is_in_the_repository_and_covers_every_op():
    design = (REPO / "DESIGN.md").read_text(encoding="utf-8")
    assert "](DESIGN.md)" in (REPO / "README.md").read_text(encoding="utf-8")
    ops = [name for name in hope_kernels.__all__ if callable(getattr(hope_kernels, name)) and name != "resolve_backend"]
    assert ops and all(f"`{op}(" in design or f"### {op}" in design or f", {op}" in design for op in ops), ops
    for section in ("## Tensor conventions", "## Backends", "## Errors", "## Testing without a GPU"):
        assert section in design


def test_test_tooling_is_not_installed():
    """The compile check is test tooling: it lives in tools/, which setup.py does not package."""
    from setuptools import find_packages
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "find_packages")
    include = ast.literal_eval(next(kw.value for kw in call.keywords if kw.arg == "include"))
    packages = find_packages(str(REPO), include=include)
    assert "benchmarks" in packages and "hope_kernels" in packages
    assert not [p for p in packages if p.split(".")[0] in ("tools", "tests")], packages
    assert (REPO / "tools" / "compile_check.py").exists() and not (REPO / "benchmarks" / "compile_check.py").exists()
