"""The package's shape: one-way layers, no import cycle, no benchmark code inside, no citation of a
document the repository does not hold, no tracker references in the code.

Layers, lowest first (README, "Layout"): common (leaf) < cg, kernels, backends < plans < core <
integrations < harness < the package's own ``__init__``/``__main__`` (the public facade). A module may import
only from its own layer or below; in the bottom layer kernels and cg import nothing but the leaf
(and cg the compiled ``_C``), backends may use kernels. Every import counts, including the ones
inside functions.
"""
from __future__ import annotations

import ast
import pathlib
import re
from typing import Dict, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "rosa_ext"

LAYER = {"common": 0, "_version": 0, "_C": 1, "cg": 1, "kernels": 1, "backends": 1, "plans": 2, "core": 3,
         "reference": 3, "integrations": 4, "harness": 5, "__init__": 6, "__main__": 6}
#: Within the bottom layer: what each part may import besides itself.
BOTTOM_ALLOWED = {"kernels": {"common", "_version"}, "cg": {"common", "_version", "_C"},
                  "backends": {"common", "_version", "kernels"}}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file() or (
        name == "rosa_ext._C")


def _imports(path: pathlib.Path) -> List[str]:
    """Every rosa_ext module ``path`` imports (module level and inside functions)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: List[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "rosa_ext"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "rosa_ext":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
            out += subs if subs else [mod]
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _graph() -> Dict[str, Set[str]]:
    return {_module_name(p): set(_imports(p)) for p in PKG.rglob("*.py")}


def test_layers_only_import_downwards():
    bad: List[Tuple[str, str]] = []
    for mod, deps in _graph().items():
        me = _part(mod)
        assert me in LAYER, f"{mod} is in no layer: add its folder to LAYER (and to the README's layout)"
        for dep in deps:
            other = _part(dep)
            if other == me:
                continue
            if LAYER[other] > LAYER[me]:
                bad.append((mod, dep))
            elif LAYER[me] == 1 and other not in BOTTOM_ALLOWED[me]:
                bad.append((mod, dep))
    assert not bad, "imports against the layering (importer -> imported): " + ", ".join(f"{a} -> {b}" for a, b in bad)


def test_no_import_cycle():
    graph = _graph()
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    cycles: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layer_checker_sees_a_violation(tmp_path, monkeypatch):
    """The two checks above can fail: a kernels module importing core, a plan importing core, and a
    two-module cycle."""
    fake = {"rosa_ext.kernels.x": {"rosa_ext.core.op"}, "rosa_ext.core.op": {"rosa_ext.kernels.x"}}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: fake)
    with pytest.raises(AssertionError, match="against the layering"):
        test_layers_only_import_downwards()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle()
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: {"rosa_ext.plans.x": {"rosa_ext.core.problem"}})
    with pytest.raises(AssertionError, match="plans.x -> rosa_ext.core.problem"):
        test_layers_only_import_downwards()


def test_no_benchmark_code_in_the_package():
    names = [p.relative_to(ROOT).as_posix() for p in PKG.rglob("*.py") if re.search(r"bench", p.name)]
    assert not names, f"benchmark code belongs in benchmarks/: {names}"
    users = [p.relative_to(ROOT).as_posix() for p in PKG.rglob("*.py")
             if re.search(r"^\s*(from|import)\s+benchmarks\b", p.read_text(), flags=re.M)]
    assert not users, f"the package imports the benchmarks: {users}"


def _sources() -> List[pathlib.Path]:
    return sorted(list(PKG.rglob("*.py")) + list(PKG.rglob("*.md")) + list((ROOT / "benchmarks").rglob("*.py"))
                  + [ROOT / "README.md", ROOT / "benchmarks" / "README.md"])


def test_cited_documents_exist():
    missing = []
    for p in _sources():
        for doc in set(re.findall(r"\b([A-Za-z0-9_./-]*[A-Z][A-Za-z0-9_]*\.md)\b", p.read_text())):
            name = doc.split("/")[-1]
            if not list(ROOT.rglob(name)):
                missing.append(f"{p.relative_to(ROOT)}: {doc}")
    assert not missing, f"documents cited but not in the repository: {missing}"


def test_no_tracker_references_in_code():
    pat = re.compile(r"\b(issue|ticket|tracker)s?\s*#?\d+|\blever runs?\s+\d|#\d{1,4}\b(?![0-9a-fA-F])", re.I)
    hits = []
    for p in list(PKG.rglob("*.py")) + list((ROOT / "benchmarks").rglob("*.py")):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if pat.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "tracker / run references belong in the results READMEs:\n" + "\n".join(hits)


def _text_files() -> List[pathlib.Path]:
    exts = {".py", ".md", ".toml", ".txt", ".cpp", ".cu", ".h", ".sh", ".cfg", ".yml", ".yaml"}
    skip = {".git", "build", "_skbuild", "__pycache__", ".venv", "v"}
    return [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in exts
            and not any(part in skip for part in p.relative_to(ROOT).parts)]


def test_no_merge_conflict_markers():
    """A conflict left in a docstring or a document passes every other test; this one fails."""
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)
    bad = [f"{p.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
           for p in _text_files() for text in [p.read_text(errors="replace")] for m in marker.finditer(text)]
    assert not bad, f"merge conflict markers: {bad}"


def test_plans_hold_only_the_algebra():
    """The engine protocol is the only place that knows which engine runs: no plan imports the kernels,
    tests an engine's name or looks at a vocabulary shard (the engines do; rosa_ext.backends)."""
    bad = []
    for p in sorted((PKG / "plans").glob("*.py")):
        src = p.read_text()
        for pattern in (r"from \.\.kernels|import rosa_ext\.kernels|from rosa_ext\.kernels", r"(engine|backend)\.name\s*==",
                        r"==\s*[\"']triton[\"']", r"\.shard\b", r"uses_prob_tiles"):
            if re.search(pattern, src):
                bad.append(f"{p.name}: {pattern}")
    assert not bad, bad


def test_a_step_enters_few_files():
    """Following a feature takes few files (benchmarks/files_entered.py measures it at run time): the
    default hidden step <= 7, the LoRA step <= 8, session.generate + update(reward=) <= 10, a RosaUsers
    update <= 10."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import files_entered
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    counts = {}
    for name, fn in files_entered.cases().items():
        run = fn() if name == "many-user update" else fn
        run()
        if name == "many-user update":
            run = fn()
        counts[name] = files_entered.files_entered(run)
    over = {k: v for k, v in counts.items() if len(v) > files_entered.TARGETS[k]}
    assert not over, over


#: "Fewer files must not mean god files": the size limits of a module and of a function (lines, as
#: written, docstrings and comments included).
MODULE_MAX_LINES = 600
FUNCTION_MAX_LINES = 100


def test_no_god_files():
    """No module of the package over MODULE_MAX_LINES lines, no function over FUNCTION_MAX_LINES."""
    big, long = [], []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        n = text.count("\n")
        if n > MODULE_MAX_LINES:
            big.append(f"{path.relative_to(ROOT)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not big and not long, "split by concept:\n" + "\n".join(big + long)
