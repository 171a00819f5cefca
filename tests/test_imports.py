"""The house has no import circles: each top-level module imports only modules below it, counting the imports
inside functions (the lazy ones) too, so a reader can go through the modules bottom up."""
import ast
import os

from helpers import ROOT


def import_graph():
    """{module: set of the repository's top-level modules it imports, anywhere in its file}."""
    mods = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    graph = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(ROOT, m + ".py"), encoding="utf-8").read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        graph[m] = (names & mods) - {m}
    return graph


def cycle(graph):
    """One import circle as a list of modules, or None."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        path.pop()
        return None
    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert {"model", "engine", "fast", "common", "report", "evaluate"} <= set(graph)
    found = cycle(graph)
    assert found is None, " -> ".join(found)


def test_the_checker_sees_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
