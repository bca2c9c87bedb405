"""`import featopt` gives every command of the command line as a function with the same name,
settings and defaults, built from the one registry; results print the command line's table and
render as HTML in Jupyter."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import MISSING, fields

import pytest

import featopt
from featopt.cli import build_parser
from featopt.commands.registry import COMMANDS


def _function(name: str):
    group, _, leaf = name.partition(" ")
    if not leaf:
        return getattr(featopt, group)
    namespace = getattr(featopt, group)
    return getattr(namespace, {"eval": "evaluate"}.get(leaf, leaf))


def test_import_featopt_is_quick_and_lazy():
    # the API loads on first use: importing the package pulls no torch
    code = "import sys, featopt; print('torch' in sys.modules, callable(featopt.optimize), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_is_a_function_with_the_command_lines_settings(command):
    function = _function(command.name)
    parameters = inspect.signature(function).parameters
    config = command.config
    assert [p for p in parameters if p != "adapter"] == \
        [*command.positional, *[f.name for f in fields(config) if f.name not in command.positional]]
    for f in fields(config):
        default = f.default if f.default is not MISSING else f.default_factory()
        assert parameters[f.name].default == default, f.name
    assert command.summary in function.__doc__
    # and the same settings are the command line's flags, with the same defaults
    parser = build_parser()
    args = parser.parse_args([*command.name.split()])
    namespace = args[command.group][command.leaf] if command.group else args[command.name]
    for f in fields(config):
        if "repeat" in f.metadata or f.name == "text" and "texts" in {g.name for g in fields(config)}:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        assert namespace[f.name] == default, (command.name, f.name)


def test_a_wrong_setting_is_a_type_error_naming_the_settings():
    with pytest.raises(TypeError, match="has no setting 'layers'"):
        featopt.search.exhaustive(layers=3)
    with pytest.raises(TypeError, match="at most 1 positional"):
        featopt.search.gcg("maximize", "extra")


def test_results_print_the_table_and_render_in_jupyter(tmp_path):
    run = featopt.search.exhaustive("maximize", model="tiny-gpt2", layer=1, features="[:, :, 0-2]", top_k=2,
                                    progress=False, out=str(tmp_path / "sweep"))
    assert str(run) == run.table() and "blocks.1.resid_post" in str(run)
    html = run._repr_html_()
    assert "<pre" in html and "blocks.1.resid_post" in html and str(run.path) in html
    epo = featopt.search.epo("maximize", model="tiny-gpt2", layer=1, features="[:, :, 0]", tokens=2, steps=1,
                             search_width=4, lambdas=[0.0, 1.0], progress=False, out=str(tmp_path / "epo"))
    assert "data:image/png;base64," in epo._repr_html_()  # fronts.png, inline


def test_the_api_checks_settings_as_the_command_line_does(tmp_path):
    from featopt.errors import FeatoptError

    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(FeatoptError, match="not featopt's"):
        featopt.search.exhaustive(out=str(tmp_path / "theirs"))
    with pytest.raises(FeatoptError, match="must be a finite number"):
        featopt.optimize(lr=float("nan"))
