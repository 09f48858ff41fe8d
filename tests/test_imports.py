"""The import graph of the repository's packages (hope_kernels, hope, benchmarks, tools, tests), read
with `ast` from the sources: it has no cycle, counting imports inside functions too, the kernels never
import the model stack, and `hope.train` (the training command) is imported by nothing but the tests
that drive its entry point."""
import ast
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hope_kernels", "hope", "benchmarks", "tools", "tests")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(f): f for p in PACKAGES for f in (REPO / p).rglob("*.py")}


def imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The repository modules that `name` imports (any scope): `import a.b` and `from a import b` name
    a.b when it is a module, else a; relative imports resolve against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            elif name.startswith("tests.") and node.module and f"tests.{node.module}" in known:
                base = f"tests.{node.module}"     # tests import their helpers by bare name (rootdir on sys.path)
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:       # `import a.b.c` of a non-module attribute: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> Dict[str, Set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(g: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph is acyclic."""
    state: Dict[str, int] = {}          # 1: on the current path, 2: done
    stack: List[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(g):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return []


def test_the_graph_is_read_from_every_package():
    g = graph()
    assert {"hope_kernels", "hope", "benchmarks", "benchmarks.quality.runner", "tools.compile_check"} <= set(g)
    assert "benchmarks.quality.designs" in g["benchmarks.quality.runner"]      # a relative import
    assert "hope" in g["benchmarks.quality.designs"]                             # `from hope import HOPE`
    assert "tests.helpers" in g["tests.test_linear_attention"]                   # a test's bare import
    assert "benchmarks.ops.timing" in g["benchmarks.model"]                     # a parent-relative import
    assert "benchmarks.model" in g["benchmarks.ops.__main__"]                    # `from .. import model`


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_kernels_never_import_the_model_stack():
    bad = {n: sorted(m for m in deps if m == "hope" or m.startswith("hope."))
           for n, deps in graph().items() if n == "hope_kernels" or n.startswith("hope_kernels.")}
    assert not {n: d for n, d in bad.items() if d}, bad


def test_training_command_is_imported_only_by_its_entry_points():
    """hope/train.py is the `hope-train` command: what it defines is used through `main` (setup.py's
    console script, `python -m hope.train`) and by the tests, never by a library module."""
    importers = sorted(n for n, deps in graph().items() if "hope.train" in deps and not n.startswith("tests."))
    assert importers == [], importers


def test_graph_sees_an_import_of_the_training_command():
    assert "hope.train" in graph()["tests.test_hope_train"]                      # `from hope import train`
