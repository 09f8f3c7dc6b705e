"""The worked examples in docstrings (STYLE.md rule 15) are tests too."""

import doctest

import pytest

import scaling_abs.batching
import scaling_abs.schedules


@pytest.mark.parametrize("module", [scaling_abs.schedules, scaling_abs.batching])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
