"""The op-folder template of DESIGN.md ("Layout and house conventions"), checked on the sources: every
folder of `hope_kernels.registry` has the same file set, its entry modules reach the Triton path only
through `from .triton_<what> import name` inside a function, every public entry point runs
`utils.prepare` and `utils.op_context` (or hands over to another public op), required states are
checked by `utils.require`, and every op is reachable through the registry."""
import ast
from pathlib import Path
from typing import List

import pytest

import hope.ops
import hope_kernels
from hope_kernels import reference, registry

PACKAGE = Path(hope_kernels.__file__).resolve().parent
TEMPLATE = ("__init__.py", "ops.py", "reference.py", "torch_chunked.py", "triton_kernels.py")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _defined(path: Path) -> set:
    return {n.name for n in _tree(path).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def entry_modules(folder: Path) -> List[Path]:
    """ops.py and the folder's other modules that define a public op (titans/selfmod.py)."""
    return [p for p in sorted(folder.glob("*.py"))
            if p.name == "ops.py" or (p.name not in TEMPLATE and _defined(p) & set(registry.OPS))]


def file_set_problems(folder: Path) -> List[str]:
    """The template's files, plus only triton_<what>.py, torch_<what>.py or entry modules."""
    names = {p.name for p in folder.glob("*.py")}
    problems = [f"{folder.name}/{n} is missing" for n in TEMPLATE if n not in names]
    entries = {p.name for p in entry_modules(folder)}
    problems += [f"{folder.name}/{n} is neither a template file, triton_<what>.py, torch_<what>.py nor the entry "
                 f"module of a public op" for n in sorted(names)
                 if n not in TEMPLATE and n not in entries and not n.startswith(("triton_", "torch_"))]
    return problems


def import_problems(path: Path) -> List[str]:
    """An entry module imports no Triton at its top and reaches its Triton path one way only."""
    problems = []
    tree = _tree(path)
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    where = f"{path.parent.name}/{path.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "triton" for a in node.names):
            problems.append(f"{where}:{node.lineno} imports triton")
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] == "triton":
            problems.append(f"{where}:{node.lineno} imports from triton")
        elif node.level == 1 and not module and any(a.name.startswith("triton") for a in node.names):
            problems.append(f"{where}:{node.lineno} imports a Triton module as a whole "
                            f"(use `from .triton_<what> import name`)")
        elif node.level == 1 and module.startswith("triton") and id(node) not in inside:
            problems.append(f"{where}:{node.lineno} imports .{module} at module top (import it in the function)")
    return problems


def entry_problems(path: Path) -> List[str]:
    """Each public entry point calls utils.prepare and utils.op_context, or calls another public op; none
    raises for a missing state by itself (utils.require does)."""
    problems = []
    where = f"{path.parent.name}/{path.name}"
    for fn in _tree(path).body:
        if not isinstance(fn, ast.FunctionDef) or fn.name not in registry.OPS:
            continue
        called = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                  for n in ast.walk(fn) if isinstance(n, ast.Call)}
        if not ({"prepare", "op_context"} <= called or called & (set(registry.OPS) - {fn.name})):
            problems.append(f"{where}: {fn.name} does not run utils.prepare and utils.op_context")
        for node in ast.walk(fn):
            if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                    and isinstance(node.test.ops[0], ast.Is) and isinstance(node.test.comparators[0], ast.Constant)
                    and node.test.comparators[0].value is None and isinstance(node.test.left, ast.Name)
                    and "state" in node.test.left.id and any(isinstance(b, ast.Raise) for b in node.body)):
                problems.append(f"{where}:{node.lineno} {fn.name} raises for `{node.test.left.id} is None` "
                                f"itself (use utils.require)")
    return problems


def folder_problems(folder: Path) -> List[str]:
    problems = file_set_problems(folder)
    for path in entry_modules(folder):
        problems += import_problems(path) + entry_problems(path)
    for name in ("torch_chunked.py", "reference.py"):
        if (folder / name).exists():
            problems += [p for p in import_problems(folder / name) if "imports triton" in p or "from triton" in p]
    if (folder / "triton_kernels.py").exists() and "compile_specs" not in _defined(folder / "triton_kernels.py"):
        problems.append(f"{folder.name}/triton_kernels.py has no compile_specs()")
    return problems


# --------------------------------------------------------------------------- the package
@pytest.mark.parametrize("folder", registry.FOLDERS)
def test_op_folder_follows_the_template(folder):
    assert folder_problems(PACKAGE / folder) == []


def test_every_op_folder_is_registered():
    folders = {p.parent.name for p in PACKAGE.glob("*/ops.py")}
    assert folders == set(registry.FOLDERS)


@pytest.mark.parametrize("name", list(registry.OPS))
def test_every_op_is_reachable_through_the_registry(name):
    folder = registry.OPS[name]
    op = registry.public(name)
    assert getattr(hope_kernels, name) is op and name in hope_kernels.__all__
    assert op.__module__.startswith(f"hope_kernels.{folder}.")
    assert name in __import__(f"hope_kernels.{folder}", fromlist=["__all__"]).__all__
    assert getattr(reference, name) is registry.reference(name)
    assert registry.reference(name).__module__ == f"hope_kernels.{folder}.reference"
    assert hope.ops.get_op(name, "reference") is registry.reference(name)
    assert hope.ops.get_op(name, "torch").func is op


def test_registry_is_the_one_list():
    assert hope.ops.OPS == tuple(registry.OPS)
    assert reference.__all__ == list(registry.OPS)
    assert registry.kernel_modules() == tuple(f"hope_kernels.{f}.triton_kernels" for f in registry.FOLDERS)
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        registry.public("nope")


def test_registration_takes_only_registered_ops():
    from hope_kernels import library
    with pytest.raises(ValueError, match="registry.OPS"):
        library.op("not_an_op")


# --------------------------------------------------------------------------- the checks catch a broken folder
GOOD_OPS = '''
import torch

from .. import utils
from .torch_chunked import f_torch


def cms_step(q, state, *, backend=None):
    utils.require("state", state, "S")
    backend, dtype, (q,) = utils.prepare(backend, q.device, dict(q=q), state=state)
    with torch.no_grad(), utils.op_context(q.device):
        return _step(q, state, backend)


def _step(q, state, backend):
    if backend == "torch":
        return f_torch(q, state)
    from .triton_kernels import f_triton
    return f_triton(q, state)
'''


def _folder(tmp_path: Path, ops: str = GOOD_OPS, extra=()) -> Path:
    folder = tmp_path / "op"
    folder.mkdir()
    for name in TEMPLATE:
        (folder / name).write_text("def compile_specs():\n    return []\n" if name == "triton_kernels.py" else "")
    (folder / "ops.py").write_text(ops)
    for name in extra:
        (folder / name).write_text("")
    return folder


def test_a_folder_on_the_template_passes(tmp_path):
    assert folder_problems(_folder(tmp_path, extra=("triton_delta.py", "torch_delta.py"))) == []


@pytest.mark.parametrize("broken, expect", [
    ("missing", "torch_chunked.py is missing"),
    ("extra", "notes.py is neither"),
    ("top import", "at module top"),
    ("module import", "as a whole"),
    ("import triton", "imports triton"),
    ("no prepare", "does not run utils.prepare"),
    ("own state check", "raises for `state is None`"),
    ("no compile_specs", "no compile_specs"),
])
def test_the_checks_catch_a_broken_folder(tmp_path, broken, expect):
    ops = GOOD_OPS
    folder = _folder(tmp_path, ops, extra=("notes.py",) if broken == "extra" else ())
    if broken == "missing":
        (folder / "torch_chunked.py").unlink()
    elif broken == "top import":
        ops = "from .triton_kernels import f_triton\n" + ops
    elif broken == "module import":
        ops = ops.replace("from .triton_kernels import f_triton\n    return f_triton(",
                          "from . import triton_kernels\n    return triton_kernels.f_triton(")
    elif broken == "import triton":
        ops = "import triton\n" + ops
    elif broken == "no prepare":
        ops = ops.replace("backend, dtype, (q,) = utils.prepare(backend, q.device, dict(q=q), state=state)", "")
    elif broken == "own state check":
        ops = ops.replace('utils.require("state", state, "S")', 'if state is None:\n        raise TypeError("state")')
    elif broken == "no compile_specs":
        (folder / "triton_kernels.py").write_text("")
    (folder / "ops.py").write_text(ops)
    problems = folder_problems(folder)
    assert any(expect in p for p in problems), problems
