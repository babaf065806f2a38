"""The package's shape, checked by reading its source (ast): what the methods may import, no import circle, no
package import hidden in a function, no file too long to read in one sitting."""
import ast
import re
from pathlib import Path

import pytest

import nanopeft

PACKAGE = Path(nanopeft.__file__).parent
MODULES = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
# the files of the course: what each paper is, readable with only torch in mind
METHODS = {f"nanopeft.{m}" for m in ("lora", "dora", "dora_fast", "pissa", "merged", "nf4", "nf4_fast", "nf4_triton",
                                     "qlora", "loraplus", "adapters", "targets", "peft_format", "peft_config")}
METHOD_THIRD_PARTY = {"torch", "__future__", "math", "dataclasses", "functools", "copy", "re", "json",
                      "os", "tempfile", "pathlib"}
EXTRA_THIRD_PARTY = {"nanopeft.nf4_triton": {"triton"}, "nanopeft.peft_format": {"safetensors"}}
# heavy or optional libraries that may be imported inside a function (each such import says why at its place)
LAZY_OK = {"peft", "bitsandbytes", "matplotlib", "ipywidgets", "IPython", "transformers", "psutil", "triton", "numpy"}
MAX_LINES = 400


def imports(module: str):
    """(imported module, line, is at the top level) for every import of a module file."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:  # `try: import x / except ImportError:` at the top of a file is a top-level import too
        if isinstance(node, ast.Try):
            top |= {id(n) for n in node.body + [h for handler in node.handlers for h in handler.body]}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
                # `from . import x` names a module x
                targets = [f"{name}.{a.name}" if f"{name}.{a.name}" in MODULES else name for a in node.names]
                out += [(t, node.lineno, id(node) in top) for t in targets]
            else:
                out.append((node.module, node.lineno, id(node) in top))
    return out


def internal(module: str) -> set:
    return {name for name, _, _ in imports(module) if name in MODULES and name != module}


def test_the_package_has_the_layout_the_readme_maps():
    assert METHODS | {"nanopeft.__init__", "nanopeft.__main__"} <= set(MODULES)
    assert any(m.startswith("nanopeft.lab.") for m in MODULES)


@pytest.mark.parametrize("module", sorted(METHODS))
def test_method_modules_import_only_torch_and_each_other(module):
    for name, line, _ in imports(module):
        root = name.split(".")[0]
        if root == "nanopeft":
            assert not name.startswith("nanopeft.lab"), f"{module}:{line} imports the lab ({name})"
        else:
            allowed = METHOD_THIRD_PARTY | EXTRA_THIRD_PARTY.get(module, set())
            assert root in allowed, f"{module}:{line} imports {name}: a method file needs only torch"


def test_import_nanopeft_does_not_import_the_lab():
    assert not any(n.startswith("nanopeft.lab") for n in internal("nanopeft.__init__"))


def test_no_import_circle():
    graph = {m: internal(m) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            cycle = path[path.index(m):] + [m]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in sorted(graph[m]):
            if n != m + ".__init__":
                visit(n, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_package_imports_are_at_the_top_and_lazy_ones_are_optional_libraries(module):
    for name, line, top in imports(module):
        if top:
            continue
        assert not name.startswith("nanopeft"), f"{module}:{line}: the package's own import {name} hides in a function"
        assert name.split(".")[0] in LAZY_OK, f"{module}:{line}: {name} is imported in a function; import it at the top"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_file_reads_in_one_sitting(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (over {MAX_LINES}): split it by job"


def test_one_name_one_meaning():
    """A name defined at the top level of two modules must mean the same thing (one is an import of the other)."""
    seen = {}
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()]
            if module.endswith("__main__"):
                names = [n for n in names if n != "main"]  # each command-line entry point has its own main()
            for name in names:
                assert name not in seen, f"{name} is defined in both {seen[name]} and {module}"
                seen[name] = module


def test_every_public_name_of_the_first_release_still_works():
    names = ["LoRALinear", "DoRALinear", "add_adapters", "adapter_layers", "merge_adapters", "unmerge_adapters",
             "remove_adapters", "trainable_parameters", "save_adapter", "load_adapter", "LinearNF4", "quantize_nf4",
             "dequantize_nf4", "quantize_model", "prepare_for_kbit_training", "merge_quantized",
             "create_loraplus_optimizer", "loraplus_param_groups"]
    assert all(callable(getattr(nanopeft, name)) for name in names)
    assert set(names) <= set(nanopeft.__all__)


def test_benchmarks_use_the_package_as_a_learner_would():
    """Benchmarks import public names only: what they time is what a learner calls."""
    for path in (PACKAGE.parent.parent / "benchmarks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanopeft"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name}:{node.lineno} imports private {private} from {node.module}"


def test_the_method_folder_stays_small():
    methods = [p for p in PACKAGE.glob("*.py") if not p.name.startswith("__")]
    # 14: one file per method reads best, and LoRA on output slices (merged.py, loralib's MergedLinear) is its own
    # method; lora.py could not hold it and stay the readable core. What a peft file's config asks (peft_config.py)
    # is its own job beside writing and reading the file (peft_format.py), which would otherwise pass 300 lines
    assert len(methods) <= 14, sorted(p.name for p in methods)
    for p in methods:
        assert len(p.read_text().splitlines()) <= 300, f"{p.name}: over 300 lines"


def test_the_name_to_class_map_is_written_once():
    """Only the METHODS table in adapters.py maps method names to classes; everything else reads it."""
    pattern = re.compile(r"""["'](lora|dora|pissa)["']\s*:\s*(LoRALinear|DoRALinear|PiSSALinear)\b""")
    found = [(p.name, m.group(0)) for p in PACKAGE.rglob("*.py") for m in pattern.finditer(p.read_text())]
    assert not found, found
    assert "METHODS = {cls.name: cls for cls in (" in (PACKAGE / "adapters.py").read_text()
