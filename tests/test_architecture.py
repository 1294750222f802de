"""The shape of the package: no import circle, the core apart from the testbed, engines on the public API."""

import ast
import re
from pathlib import Path

import hired

PACKAGE = Path(hired.__file__).parent
# What an engine integration may import of hired: the public API and the pure modules.
# hired.compat declares the transformers internals an engine checks too; hired.state names the config.json key;
# hired.selecting (the selection path every engine shares) and hired.signals (tower runs from captured
# queries and keys) know no model class.
ENGINE_ALLOWED = ("hired", "hired.algorithm", "hired.compat", "hired.geometry", "hired.loading", "hired.methods",
                  "hired.native_drop", "hired.selecting", "hired.signals", "hired.state", "hired.engines")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> set[str]:
    """Every module this one imports anywhere in its body (function bodies included, type-checking blocks not)."""
    is_package = path.name == "__init__.py"
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                # ``from package import submodule`` depends on the submodule, not on the package's __init__.
                for alias in child.names:
                    submodule = f"{target}.{alias.name}"
                    found.add(submodule if submodule in MODULES else target)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


GRAPH = {name: {m for m in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_the_graph_sees_the_package():
    assert {"hired", "hired.config", "hired.methods.base", "hired.families.adapter"} <= set(GRAPH)
    assert "hired.methods.base" in GRAPH["hired.config"] or "hired.methods" in GRAPH["hired.config"]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the circle it closes."""
    state, stack, cycles = {}, [], []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return cycles


def test_no_import_circle():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_core_imports_nothing_from_the_testbed():
    offenders = {name for name, path in MODULES.items() if any(m.startswith("hired_testbed") for m in _imports(name, path))}
    assert not offenders


def test_engines_use_only_the_public_api_and_the_pure_modules():
    for name, path in MODULES.items():
        if not name.startswith("hired.engines"):
            continue
        for imported in _imports(name, path):
            if imported.startswith("hired"):
                assert imported in ENGINE_ALLOWED or imported.startswith(("hired.methods.", "hired.engines.")), (
                    f"{name} imports {imported}"
                )


def test_the_algorithm_and_the_methods_know_no_model_class():
    pure = [name for name in MODULES if name in ("hired.algorithm", "hired.geometry") or name.startswith("hired.methods")]
    for name in pure:
        imported = _imports(name, MODULES[name])
        assert not any(m.startswith(("hired.families", "hired.state", "hired.signals")) for m in imported), name
        assert not any(m.startswith("transformers") and not m.startswith("transformers.image_processing_utils") for m in imported), name


def test_the_shared_selection_path_knows_no_family_nor_model_class():
    """Both engines call it: it may not reach into transformers' model classes or a family."""
    for name in ("hired.native_drop", "hired.selecting", "hired.signals"):
        imported = _imports(name, MODULES[name])
        assert not any(m.startswith(("hired.families", "hired.engines", "transformers")) for m in imported), name


# A family is a folder of hired.families: a package whose __init__ registers the family. Its modules are the
# package and everything in it; the other modules of hired.families are the framework.
FAMILY_PACKAGES = {name for name, path in MODULES.items()
                   if name.startswith("hired.families.") and path.name == "__init__.py"
                   and re.search(r"^\w+ = register_family\(", path.read_text(), re.M)}
FAMILY_MODULES = {name for name in MODULES if any(name == p or name.startswith(p + ".") for p in FAMILY_PACKAGES)}
FRAMEWORK_MODULES = {name for name in MODULES if name.startswith("hired.families.")} - FAMILY_MODULES


def _family_of_module(name: str) -> str | None:
    return next((package for package in FAMILY_PACKAGES if name == package or name.startswith(package + ".")), None)


def test_the_families_import_the_framework_and_not_the_reverse():
    assert len(FAMILY_PACKAGES) == 6 and "hired.families.adapter" in FRAMEWORK_MODULES
    assert "hired.families.llava_next.transformers" in FAMILY_MODULES
    for name in FRAMEWORK_MODULES:
        assert not GRAPH[name] & FAMILY_MODULES, f"{name} imports {sorted(GRAPH[name] & FAMILY_MODULES)}"
    for package in FAMILY_PACKAGES:
        modules = {name for name in FAMILY_MODULES if _family_of_module(name) == package}
        assert set().union(*(GRAPH[name] for name in modules)) & FRAMEWORK_MODULES, f"{package} imports none of the framework"


def test_a_family_uses_another_only_through_its_package():
    """A family that builds on another (LLaVA-1.5 on LLaVA-NeXT) imports that family's package, its public names,
    and not the modules inside it; its tiny test model may build on the other's tiny one."""
    for name in FAMILY_MODULES:
        for imported in GRAPH[name] & FAMILY_MODULES:
            other = _family_of_module(imported)
            if other != _family_of_module(name):
                assert imported == other or (name.endswith(".tiny") and imported == other + ".tiny"), (
                    f"{name} imports {imported}")


def test_a_familys_vllm_classes_are_imported_by_vllm_alone():
    """A family's vllm.py needs vLLM: no module of hired imports it (the plugin names it for vLLM to import)."""
    vllm_modules = {name for name in FAMILY_MODULES if name.endswith(".vllm")}
    assert {"hired.families.llava_next.vllm", "hired.families.llava.vllm"} <= vllm_modules
    for name, imported in GRAPH.items():
        assert not imported & vllm_modules, f"{name} imports {sorted(imported & vllm_modules)}"


def test_a_cycle_is_detected():
    """The detector itself can fail: a made-up circle is found, a chain is not."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_hired_and_the_lmms_eval_entry_module_load_no_torch():
    """lmms-eval loads every installed plugin's entry module whenever it lists or loads models, whatever
    the model: it may not pay for torch or transformers."""
    import subprocess
    import sys

    code = ("import sys, hired, hired.engines.lmms_eval\n"
            "heavy = [m for m in ('torch', 'transformers', 'lmms_eval') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert hired.HiredConfig.__module__ == 'hired.config' and 'torch' in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_the_lmms_eval_plugin_is_registered_by_entry_point():
    from importlib.metadata import entry_points

    import hired.engines.lmms_eval as plugin

    (point,) = [p for p in entry_points(group="lmms_eval.models") if p.name == plugin.MODEL_ID]
    assert point.value == "hired.engines.lmms_eval:manifest"
    module, _, name = plugin.MODEL_CLASS.rpartition(".")
    assert (MODULES[module].read_text().count(f"class {name}(")) == 1
