"""hyla.parallel's argument errors: its own argument names, said in a caller's terms on
request, and intact across processes."""

from __future__ import annotations

import pickle

import pytest

from hyla.models import ModelConfig
from hyla.parallel import ArgumentError, check_model
from hyla.parallel.support import check_group


def test_an_error_names_its_arguments_and_renames_them():
    err = ArgumentError("{method}={got!r} is not {layout}; {note}", got="ring", note="{braces}")
    assert str(err) == "method='ring' is not layout; {braces}"
    renamed = err.renamed({"method": "parallel.sp_method"})
    assert type(renamed) is ValueError
    assert str(renamed) == "parallel.sp_method='ring' is not layout; {braces}"
    copy = pickle.loads(pickle.dumps(err))  # as Ray carries it from a worker
    assert type(copy) is ArgumentError and str(copy) == str(err)
    assert str(copy.renamed({"layout": "x"})) == "method='ring' is not x; {braces}"


def test_model_checks_name_the_method_and_sp():
    model = ModelConfig(layers="LM", d_model=16, n_heads=2)
    check_model("lasp2", model, 2)
    with pytest.raises(ArgumentError, match=r"^method='ulysses' does not support MoM layers"):
        check_model("ulysses", model, 2)
    with pytest.raises(ArgumentError, match=r"degree sp = 4, got head counts \[2\]$"):
        check_model("ulysses", ModelConfig(layers="L", d_model=16, n_heads=2), 4)


def test_group_needs_torch_distributed():
    with pytest.raises(ArgumentError, match=r"^group needs torch\.distributed to be initialised"):
        check_group(None)
