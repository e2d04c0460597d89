"""The multi-object benchmark's cache key: what can change a run changes it, wording does not."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import multi_object  # noqa: E402  (a benchmark script, not a package: its folder on the path)


def meaning_of(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return multi_object.meaning(path)


def test_config_comments_keep_the_key_and_values_change_it(tmp_path):
    base = meaning_of(tmp_path, "a.yaml", "model:\n  lr: 0.025\n")
    assert meaning_of(tmp_path, "b.yaml", "# fine: a new header\nmodel:\n  lr: 0.025  # why\n") == base
    assert meaning_of(tmp_path, "c.yaml", "model:\n  lr: 0.05\n") != base


def test_module_docstrings_and_comments_keep_the_key_and_code_changes_it(tmp_path):
    base = meaning_of(tmp_path, "a.py", '"""Module."""\n\ndef f(x):\n    """Old words."""\n    return x + 1\n')
    reworded = '"""Module, reworded."""\n\n\ndef f(x):  # a comment\n    """New words."""\n    return x + 1\n'
    assert meaning_of(tmp_path, "b.py", reworded) == base
    assert meaning_of(tmp_path, "c.py", '"""Module."""\n\ndef f(x):\n    """Old words."""\n    return x + 2\n') != base
    # a function whose body is only its docstring stays a function
    assert meaning_of(tmp_path, "d.py", 'def g():\n    """Only words."""\n') != meaning_of(tmp_path, "e.py", "")
