"""The package's layers: no import cycles, imports only downwards, no private names across modules,
and `import nanomoe` / `nanomoe --help` without torch.

The import graph is read from the source (every import, function-local ones too, except under
`if TYPE_CHECKING:`), so a cycle hidden inside a function fails here as well.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanomoe"
ROOT = PACKAGE.name

# module (or package prefix) -> what it must never import: the layers, lowest first, are
# model <- runtime <- parallelize, checkpoint <- trainer <- cli
NEVER_IMPORTS = {
    "nanomoe.model": ["nanomoe.runtime", "nanomoe.parallelize", "nanomoe.training", "nanomoe.evaluation",
                      "nanomoe.cli", "nanomoe.bench"],
    "nanomoe.moe": ["nanomoe.runtime", "nanomoe.parallelize", "nanomoe.training", "nanomoe.cli"],
    "nanomoe.kernels": ["nanomoe.model", "nanomoe.moe", "nanomoe.config", "nanomoe.runtime", "nanomoe.parallelize",
                        "nanomoe.training", "nanomoe.evaluation", "nanomoe.generation", "nanomoe.cli", "nanomoe.bench"],
    "nanomoe.config": ["nanomoe.presets", "nanomoe.model", "nanomoe.training", "nanomoe.cli"],
    "nanomoe.runtime": ["nanomoe.parallelize", "nanomoe.training", "nanomoe.evaluation", "nanomoe.generation",
                        "nanomoe.cli", "nanomoe.bench"],
    "nanomoe.parallelize": ["nanomoe.training", "nanomoe.evaluation", "nanomoe.cli", "nanomoe.bench"],
    "nanomoe.training.checkpoint": ["nanomoe.training.trainer", "nanomoe.parallelize", "nanomoe.evaluation",
                                    "nanomoe.cli", "nanomoe.bench"],
    "nanomoe.evaluation": ["nanomoe.training", "nanomoe.parallelize", "nanomoe.cli", "nanomoe.bench"],
    # the model inherits `generate` from generation.GenerationMixin, so generation sits below it
    "nanomoe.generation": ["nanomoe.model", "nanomoe.training", "nanomoe.parallelize", "nanomoe.serve", "nanomoe.cli",
                           "nanomoe.bench"],
    "nanomoe.training.trainer": ["nanomoe.cli", "nanomoe.bench"],
    "nanomoe.mfu": ["nanomoe.training", "nanomoe.parallelize", "nanomoe.evaluation", "nanomoe.cli", "nanomoe.bench"],
    "nanomoe.data": ["nanomoe.training", "nanomoe.cli", "nanomoe.bench"],
    "nanomoe.serve": ["nanomoe.training", "nanomoe.parallelize", "nanomoe.cli", "nanomoe.bench"],
}


def module_files() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def absolute(module: str, is_package: bool, target: str | None, level: int) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if not level:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every nanomoe import in `module`."""
    tree = ast.parse(path.read_text())
    skip = type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, path.name == "__init__.py", node.module, node.level)
            if base.split(".")[0] != ROOT:
                continue
            names = [a.name for a in node.names]
            found.append((base, [n for n in names if f"{base}.{n}" not in mods], node.lineno))
            found += [(f"{base}.{n}", [], node.lineno) for n in names if f"{base}.{n}" in mods]
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the nanomoe modules its code imports. Importing a.b.c also runs the packages a.b
    and a (their __init__), so those count too, except the root package and the module's own
    enclosing packages."""
    mods = module_files()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _ in imports_of(m, path, mods):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            while target and target != ROOT:
                if target != m and not m.startswith(target + "."):
                    graph[m].add(target)
                target = target.rpartition(".")[0]
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_local_imports_and_parent_packages(tmp_path):
    graph = import_graph()
    # nanomoe.cli imports each command module only through importlib; commands import the library
    # inside their functions: those edges must be seen
    assert "nanomoe.training.trainer" in graph["nanomoe.cli.train"]
    assert "nanomoe.training" in graph["nanomoe.cli.train"]  # its __init__ runs too


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in nanomoe/: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(NEVER_IMPORTS))
def test_layers_import_downwards_only(module):
    graph = import_graph()
    below = [m for m in graph if m == module or m.startswith(module + ".")]
    assert below, f"{module} no longer exists: update NEVER_IMPORTS"
    wrong = sorted(
        f"{m} -> {t}" for m in below for t in graph[m]
        if any(t == f or t.startswith(f + ".") for f in NEVER_IMPORTS[module])
    )
    assert not wrong, f"{module} imports an upper layer: {wrong}"


def test_no_private_names_across_modules():
    mods = module_files()
    offenders = []
    for m, path in mods.items():
        for target, names, line in imports_of(m, path, mods):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [target.rpartition(".")[2]] if target.rpartition(".")[2].startswith("_") else []
            if private and target != m:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {private} from {target}")
    assert not offenders, "\n".join(offenders)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)


def test_import_nanomoe_does_not_import_torch():
    result = run_python("import nanomoe, sys; assert 'torch' not in sys.modules, 'torch was imported'")
    assert result.returncode == 0, result.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from nanomoe.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['bench', 'train', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    assert 'usage: nanomoe' in out.getvalue(), argv\n"
        "heavy = [m for m in ('torch', 'numpy', 'tokenizers', 'tqdm', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, f'--help imported {heavy}'\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr


def test_python_m_nanomoe_help_exits_cleanly():
    result = subprocess.run([sys.executable, "-m", "nanomoe", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert "usage: nanomoe" in result.stdout


def test_public_names_load_on_first_use():
    result = run_python(
        "import sys, nanomoe\n"
        "assert 'torch' not in sys.modules\n"
        "from nanomoe.training.checkpoint import load_checkpoint\n"
        "assert nanomoe.load_checkpoint is load_checkpoint\n"
        "assert nanomoe.GPT(nanomoe.get_preset('debug')).config.n_layer == 2\n"
        "assert 'GPT' in dir(nanomoe)\n"
        "try:\n"
        "    nanomoe.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('expected AttributeError')\n"
    )
    assert result.returncode == 0, result.stderr


def test_a_missing_command_module_fails_loudly(monkeypatch):
    import nanomoe.cli as cli

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "no_such_command"])
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        cli.build_parser()
