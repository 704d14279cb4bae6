"""The code base's shape: no import cycles, library code free of click, and a CLI whose help loads no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import loopfree

ROOT = Path(loopfree.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """loopfree module → the loopfree modules it imports, anywhere in its body (function-level imports too)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else ".".join(name.split(".")[: -node.level] + [node.module])
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name and t != "loopfree"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


#: folder → layer; a module may import from its own layer and the ones below (README "Layout")
LAYERS = {"utils": 0, "method": 1, "toy": 1, "pipelines": 2, "export": 2, "training": 3, "bench": 4, "evaluation": 4,
          "analysis": 5, "serve": 5, "demo": 5, "cli": 6}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return 7  # the package's lazy public names and ``python -m loopfree`` sit above everything
    return LAYERS[parts[1]]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def test_upward_import_finder_finds_one():
    assert upward_imports({"loopfree.method.x": {"loopfree.training.y"}, "loopfree.training.y": set()}) == [
        ("loopfree.method.x", "loopfree.training.y")
    ]


def test_every_module_sits_in_a_layer_folder():
    assert {m.split(".")[1] for m in import_graph() if m.count(".") >= 1} - {"__main__"} <= set(LAYERS)


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    assert upward_imports(import_graph()) == []


def test_library_code_does_not_depend_on_click():
    graph = import_graph()
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        if not name.startswith("loopfree.cli") and name != "loopfree.__main__":  # the command line and its entry point
            text = path.read_text()
            assert "import click" not in text and "from click" not in text, name
            assert not any(t.startswith("loopfree.cli") for t in graph[name]), name


def test_help_loads_no_torch():
    code = "import sys; from loopfree.cli import main; main(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "False", p.stderr


def test_readme_is_short_and_its_links_resolve():
    """A newcomer can finish the README (≤ 250 lines); the deep material is in docs/ pages that exist."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for page in ("README.md", *(str(p.relative_to(root)) for p in (root / "docs").glob("*.md"))):
        body = (root / page).read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", body):
            assert (root / page).parent.joinpath(target).exists(), f"{page} links to {target}, which does not exist"


def test_every_error_message_is_one_short_line():
    """Every message a raise spells out is ≤ 200 characters, counting each interpolated value as 12 (the values
    themselves are quoted short: ``loopfree.utils.errors.short``)."""
    src = Path(loopfree.__file__).parent
    long = []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                continue
            name = getattr(node.exc.func, "id", getattr(node.exc.func, "attr", ""))
            message = node.exc.args[-1] if name == "RequestError" else node.exc.args[0]
            parts = message.values if isinstance(message, ast.JoinedStr) else [message]
            if all(isinstance(p, (ast.Constant, ast.FormattedValue)) for p in parts):
                size = sum(len(str(p.value)) if isinstance(p, ast.Constant) else 12 for p in parts)
                if size > 200 or any(isinstance(p, ast.Constant) and "\n" in str(p.value) for p in parts):
                    long.append(f"{path.relative_to(src)}:{node.lineno} ({size})")
    assert not long, long


def test_short_quotes_long_values_in_one_line():
    from loopfree.utils.errors import short

    assert short([751, 501, 251, 1]) == "[751, 501, 251, 1]"
    assert short(list(range(500, 0, -1))) == "[500, 499, 498, 497, …, 1] (500 values)"
    assert short("x" * 500) == "'" + "x" * 58 + "…" and short(3) == "3"
