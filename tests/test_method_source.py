"""The trained model's cache key covers the method's code: its module and every project
module it imports, so changed code retrains that method and no other."""

from __future__ import annotations

from pathlib import Path

from defectflow.tasks import methods
from defectflow.tasks.methods import _closure, source_files, source_hash


def test_each_method_covers_its_own_imports_only():
    assert {"methods/patchcore.py", "coreset.py", "methods/base.py"} <= set(
        source_files("patchcore"))
    assert "coreset.py" not in source_files("padim")
    assert {"methods/augmentations.py", "methods/cutpaste_net.py"} <= set(source_files("cutpaste"))
    # The ensemble reuses PaDiM's and PatchCore's code: a change to either retrains it.
    assert {"methods/padim.py", "methods/patchcore.py"} <= set(source_files("ensemble"))
    assert len({source_hash(m) for m in methods.METHODS}) == len(methods.METHODS)


def _package(root: Path, helper: str) -> Path:
    (root / "pkg" / "methods").mkdir(parents=True, exist_ok=True)
    (root / "pkg" / "methods" / "__init__.py").write_text("")
    (root / "pkg" / "helper.py").write_text(helper)
    (root / "pkg" / "unrelated.py").write_text("X = 1\n")
    method = root / "pkg" / "methods" / "toy.py"
    # An import inside a function counts as well as one at the top.
    method.write_text("def fit():\n    from ..helper import step\n    return step()\n")
    return method.resolve()


def test_a_change_in_an_imported_module_changes_the_hash(tmp_path):
    first = _package(tmp_path / "a", "def step():\n    return 1\n")
    same = _package(tmp_path / "b", "def step():\n    return 1\n")
    changed = _package(tmp_path / "c", "def step():\n    return 2\n")
    (tmp_path / "b" / "pkg" / "unrelated.py").write_text("X = 2\n")  # not imported: no effect

    assert [name for name, _ in _closure(first)] == ["helper.py", "methods/toy.py"]
    assert _closure(first) == _closure(same)  # the same code elsewhere: the same key
    assert _closure(first) != _closure(changed)
