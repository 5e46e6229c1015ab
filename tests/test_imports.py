"""The import graph of nag_toolkit: no cycle (module-level and call-time imports alike); sampling does not load training."""
import ast, subprocess, sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / 'nag_toolkit'
MODULES = {p.stem for p in PKG.glob('*.py')}

def _imports(path:Path)->set:
    "The modules of nag_toolkit that `path` imports anywhere (at load or inside a function)."
    deps = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module: deps.add(n.module.split('.')[0])
        elif isinstance(n, ast.ImportFrom) and (n.level == 1 or n.module == 'nag_toolkit'):
            deps |= {a.name for a in n.names}                                # `from . import x`
        elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith('nag_toolkit.'):
            deps.add(n.module.split('.')[1])
        elif isinstance(n, ast.Import):
            deps |= {a.name.split('.')[1] for a in n.names if a.name.startswith('nag_toolkit.')}
    return deps & MODULES - {path.stem}

def _cycle(graph:dict)->list:
    "One cycle of `graph` as a list of modules, or []."
    state, stack = {}, []
    def visit(v):
        state[v] = 'open'; stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 'open': return stack[stack.index(w):] + [w]
            if w not in state and (c := visit(w)): return c
        state[v] = 'done'; stack.pop()
        return []
    for v in sorted(graph):
        if v not in state and (c := visit(v)): return c
    return []

def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b'}, 'b': set()}) == []

def test_import_graph_has_no_cycle():
    graph = {p.stem: _imports(p) for p in PKG.glob('*.py')}
    assert graph['core'] == set() and 'core' in graph['perf']          # core is the bottom; perf sits on it
    assert _cycle(graph) == [], ' -> '.join(_cycle(graph))

def test_config_and_core_load_without_torch():
    code = "import sys, nag_toolkit.config, nag_toolkit.core, nag_toolkit.cli; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_exact_metrics_load_without_torch_fidelity():
    "The exact metrics need no feature network: importing them loads neither torch-fidelity nor the image chapters."
    code = ("import sys, nag_toolkit.metrics; "
            "assert not {'torch_fidelity', 'nag_toolkit.image_metrics', 'nag_toolkit.eval_samples'} & set(sys.modules)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
