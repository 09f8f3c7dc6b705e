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
    res, res_next, res_ckpt = namespace["res"], namespace["res_next"], namespace["res_ckpt"]
    assert res.finite and res_next.finite and res_ckpt.finite
    # the same Hessian, each estimate stopped at tol=1e-3: a few tol apart (0.13 % here); the warm
    # start from res's eigenvector converges in fewer products (3 against 18)
    assert res_next.converged and res_next.iterations < res.iterations
    assert res_next.eigenvalue == pytest.approx(res.eigenvalue, rel=5e-3)
    # "the same eigenvalue": the same products, in pieces (with the default max_iter=10, tol=1e-2
    # the README's example was 4 % off res)
    assert res_ckpt.iterations == res.iterations
    assert res_ckpt.eigenvalue == pytest.approx(res.eigenvalue, rel=1e-6)
