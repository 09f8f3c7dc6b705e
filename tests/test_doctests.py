"""The worked examples in docstrings (STYLE.md rule 15) and the README are tests too."""

import doctest
from pathlib import Path

import pytest

import scaling_abs.batching
import scaling_abs.schedules


@pytest.mark.parametrize("module", [scaling_abs.schedules, scaling_abs.batching])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_readme_library_example_runs():
    """The README's library example, up to its whole training run (that part is the CLI's, tested
    in test_trainer): it must keep working as the API moves."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Library API") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    code = code[: code.index("# a whole training run")]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    res, res_next = namespace["res"], namespace["res_next"]
    assert res.finite and res_next.finite
    assert res_next.eigenvalue == pytest.approx(res.eigenvalue, rel=5e-2)
