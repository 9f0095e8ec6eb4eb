"""The package's layers import one way, its modules form no cycle, and none is over 500 lines.

The table below is the architecture (docs/architecture.md draws it). A part may import parts of a
lower rank only; parts of one rank (``model`` and ``wire``) do not import each other. Imports under
``if TYPE_CHECKING:`` are held to the same direction but do not count as cycles (they never run).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "splitexit"

#: (part, rank): every module of the package belongs to exactly one part.
LAYERS: tuple[tuple[str, int], ...] = (
    ("splitexit.errors", 0),
    ("splitexit.units", 0),
    ("splitexit.cuts", 0),
    ("splitexit.aio", 0),
    ("splitexit.tensors", 0),
    ("splitexit.links", 0),
    ("splitexit.hosts", 0),
    ("splitexit.about", 0),
    ("splitexit.config", 1),
    ("splitexit.model", 2),
    ("splitexit.wire", 2),
    ("splitexit.plan", 3),
    ("splitexit.runtime", 4),
    ("splitexit.control", 5),
    ("splitexit.app", 6),
    ("splitexit.report", 7),
    ("splitexit.cli_options", 8),  # the command line's shared options, below the commands that use them
    ("splitexit.cli", 9),
    ("splitexit.__main__", 10),
    ("splitexit", 10),  # the package's __init__: the public API re-exports from every layer
)
MAX_LINES = 500
GENERATED = ("wire_pb2.py", "wire_pb2_grpc.py", "wire_pb2.pyi")


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    type_only: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text())
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    type_only = _type_checking_lines(tree)
    found: list[Import] = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from splitexit.wire import wire_pb2` imports a module; `from splitexit.config import X` a name
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for target in targets:
            if target == "splitexit" or target.startswith("splitexit."):
                found.append(Import(source, target, node.lineno, node.lineno in type_only))
    return found


def part_of(module: str) -> tuple[str, int]:
    for part, rank in LAYERS:
        if module == part or module.startswith(part + "."):
            return part, rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")


def source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in GENERATED)


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    files = source_files()
    known = {module_name(p) for p in files} | {f"splitexit.wire.{Path(g).stem}" for g in GENERATED}
    return [imp for path in files for imp in imports_of(path, known)]


def test_every_module_is_in_a_layer() -> None:
    for path in source_files():
        part_of(module_name(path))


def test_parts_import_only_lower_layers(graph: list[Import]) -> None:
    wrong = []
    for imp in graph:
        (source_part, source_rank), (target_part, target_rank) = part_of(imp.source), part_of(imp.target)
        if source_part != target_part and target_rank >= source_rank:
            wrong.append(f"{imp.source}:{imp.line} imports {imp.target} ({target_part} is not below {source_part})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_modules_import_each_other_without_a_cycle(graph: list[Import]) -> None:
    edges: dict[str, set[str]] = {}
    for imp in graph:
        if not imp.type_only and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    # a package's __init__ importing its own modules is how re-exports work, not a cycle of behaviour
    cycles = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_read_real_imports() -> None:
    """The checks above would pass on an empty graph: show they read real imports."""
    known = {module_name(p) for p in source_files()}
    imports = imports_of(PACKAGE / "runtime" / "node.py", known)
    assert any(i.target.startswith("splitexit.wire") for i in imports)
    assert part_of("splitexit.runtime.node")[1] > part_of("splitexit.wire.tensor_codec")[1]
    with pytest.raises(AssertionError, match="in no layer"):
        part_of("elsewhere.module")


def test_no_module_is_over_500_lines() -> None:
    long = [f"{path.relative_to(PACKAGE)}: {n} lines" for path in source_files()
            if (n := path.read_text().count("\n")) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)


def test_test_files_have_distinct_names() -> None:
    """pytest's default import mode imports test files by basename: two alike fail collection of the run."""
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted(tests.rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(tests)} and {path.relative_to(tests)}")
        seen.setdefault(path.name, path)
    assert not clashes, "test files with one basename (rename one):\n" + "\n".join(clashes)
