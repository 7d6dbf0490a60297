"""The package's shape: no import cycles (counting imports inside functions too), and each concept defined once."""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llava_ckpt")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict:
    """module -> the llava_ckpt modules it imports anywhere in its body."""
    graph = {}
    for root, _, files in os.walk(PKG):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            mod = _module_name(path)
            package = mod if name == "__init__.py" else mod.rsplit(".", 1)[0]
            deps = set()
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")
                        base = base[:len(base) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    if target.startswith("llava_ckpt"):
                        deps.add(target)
                        deps.update(f"{target}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith("llava_ckpt"))
            graph[mod] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = import_graph()
    state: dict = {}
    cycles = []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if d.startswith(m + "."):   # a package importing its own submodules is not a cycle
                continue
            if state.get(d) == "open" and not m.startswith(d + "."):
                cycles.append(path[path.index(d):] + [d] if d in path else path + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_split_kinds_are_defined_once():
    """Only tp.py spells out the split kinds' dims; everything else imports them."""
    offenders = []
    for root, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py") and name != "tp.py":
                text = open(os.path.join(root, name), encoding="utf-8").read()
                if '"vocab": 0' in text or "'vocab': 0" in text:
                    offenders.append(name)
    assert offenders == []
