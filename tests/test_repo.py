"""The repository's promises to a new user."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1
    assert ci[0] in (ROOT / "README.md").read_text()


def test_shipped_configs_are_reachable_from_the_repository_root():
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == [
        "byol_r50.yaml", "imagenet_r18.yaml", "imagenet_r50.yaml", "mocov2_r50.yaml", "simclr_r50.yaml",
        "simsiam_r50.yaml", "smoke.yaml",
    ]


def _import_graph() -> dict[str, set[str]]:
    """iecl module -> the iecl modules it imports, at any depth of the code
    (function-level imports too), plus the packages whose __init__ those run."""
    import ast

    modules = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build", ".venv") or rel.name == "setup.py" or ".egg-info" in str(rel):
            continue
        parts = [p for p in rel.with_suffix("").parts if p != "__init__"]
        modules[".".join(["iecl", *parts])] = path

    def known(name: str) -> str:
        while name not in modules:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "iecl":
                targets |= {known(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names if a.name.split(".")[0] == "iecl"}
        for target in list(targets):  # importing a.b.c runs a.b's __init__ first
            bits = target.split(".")
            targets |= {".".join(bits[:i]) for i in range(2, len(bits)) if not name.startswith(".".join(bits[:i]) + ".")}
        graph[name] = targets - {name}
    return graph


def test_the_import_graph_has_no_cycles():
    graph = _import_graph()
    assert {"iecl.train.step", "iecl.pipeline.decode", "iecl.model.methods.registry"} <= set(graph)
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_data_flows_one_way():
    """pipeline -> kernels -> model -> train -> profiling: nothing imports a
    folder later in the flow (profiling observes; only the command's
    composition root, iecl.cli, imports it)."""
    order = {"pipeline": 0, "kernels": 1, "model": 2, "train": 3, "profiling": 4}
    for name, targets in _import_graph().items():
        part = name.split(".")[1] if name.count(".") else ""
        for target in targets:
            other = target.split(".")[1] if target.count(".") else ""
            if part in order and other in order and other != part:
                assert order[other] < order[part], f"{name} imports {target}"
