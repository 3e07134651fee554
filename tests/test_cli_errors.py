"""The CLI layer: one translation of API keywords to flags, --version, flags without a <bool> value,
one --dtype parser, --model as a path or a hub id."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from usmoe_lp.cli import app
from usmoe_lp.cli_errors import cli_message, fail, parse_dtype
from usmoe_lp.errors import InvalidParameter
from usmoe_lp.tiny.cli import _KEYWORD_FLAGS

runner = CliRunner(env={"COLUMNS": "200"})
FLAGS = {"top_k": ("--top-k", None), "overwrite": ("--overwrite", None), "module_pattern": ("--module-pattern", None),
         "checksums": ("--checksums", "--no-checksums"), "shard_tokens": ("--shard-tokens", None),
         "out": ("--out", None)}


def test_version_prints_the_installed_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"usmoe-lp {importlib.metadata.version('usmoe-lp')}"


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_every_help_is_free_of_bool_values_and_every_bool_option_is_a_flag():
    group = get_command(app)
    paths = [()] + [path for path, _ in _commands(group)] + [("log",)]
    assert {"import", "capture", "analyze", "verify", "demo", "train-tiny"} <= {p[-1] for p in paths if p}
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output and "BOOLEAN" not in result.output, (path, result.output)
    for path, command in _commands(group):
        for param in command.params:
            if getattr(param, "param_type_name", "") == "option" and isinstance(param.default, bool):
                assert param.is_flag, (path, param.name)
                result = runner.invoke(app, [*path, f"{param.opts[0]}=yes"])
                assert result.exit_code == 2 and "does not take a value" in result.output, (path, param.name)


@pytest.mark.parametrize("text, expected", [
    ("top_k must be in 1..8, got 9", "--top-k must be in 1..8, got 9"),
    ("top_k=9 is more than N", "--top-k 9 is more than N"),
    ("pass overwrite=True (--overwrite) to replace", "pass --overwrite to replace"),
    ("even with overwrite=True: choose", "even with --overwrite: choose"),
    ("checksums=False skips them", "--no-checksums skips them"),
    ('point module_pattern=r"model\\.gate" at it', "point --module-pattern 'model\\.gate' at it"),
    ("point module_pattern= at the gate", "point --module-pattern at the gate"),
    ("module_pattern 'x' is not a valid regex", "--module-pattern 'x' is not a valid regex"),
    ("shard_tokens must be an integer >= 1", "--shard-tokens must be an integer >= 1"),
    # not an option of this command, part of another word, or no keyword: unchanged
    ("batch_size=3 does not divide", "batch_size=3 does not divide"),
    ("output_router_logits=True in transformers", "output_router_logits=True in transformers"),
    ("model.top_k_groups and my_top_k stay", "model.top_k_groups and my_top_k stay"),
    ("the out directory; out is fine", "the out directory; out is fine"),
    ("two\nlines", "two lines"),
])
def test_cli_message(text, expected):
    assert cli_message(text, FLAGS) == expected


def test_aliases_name_the_flags_of_train_tiny():
    text = "hidden_size (30) must be divisible by num_heads (4); top_k must be in [1, num_experts=4]"
    flags = {"hidden_size": ("--hidden-size", None), "top_k": ("--top-k", None)}
    assert cli_message(text, flags, _KEYWORD_FLAGS) == ("--hidden-size (30) must be divisible by --heads (4); "
                                                        "--top-k must be in [1, --experts 4]")


def test_fail_speaks_the_flags_of_the_running_command():
    demo = typer.Typer()

    @demo.command("run")
    def run(top_k: int = typer.Option(2, "--top-k"), overwrite: bool = typer.Option(False, "--overwrite")) -> None:
        try:
            exc = InvalidParameter("top_k must be <= 8, got 9; or pass overwrite=True")
            exc.add_note("while checking the config")
            raise exc
        except InvalidParameter as exc:
            raise fail(exc) from None

    @demo.command("other")
    def other() -> None:
        raise fail("top_k must be <= 8")           # no --top-k here: left as it is

    result = runner.invoke(demo, ["run"])
    assert result.exit_code == 2
    assert result.stderr == "error: --top-k must be <= 8, got 9; or pass --overwrite; while checking the config\n"
    assert runner.invoke(demo, ["other"]).stderr == "error: top_k must be <= 8\n"


def test_one_dtype_spelling_for_capture_and_import(tmp_path):
    assert [parse_dtype(v) for v in ("float32", "BF16", "fp16", "bfloat16", None)] == \
        ["float32", "bfloat16", "float16", "bfloat16", None]
    with pytest.raises(typer.BadParameter, match="must be one of float32, bfloat16, float16"):
        parse_dtype("int8")
    np.save(tmp_path / "x.npy", np.ones((4, 2), dtype=np.float32))
    messages = []
    for argv in (["import", str(tmp_path / "x.npy"), "--out", str(tmp_path / "l")],
                 ["capture", "--model", str(tmp_path), "--text", str(tmp_path / "x.npy"), "--out",
                  str(tmp_path / "c")]):
        result = runner.invoke(app, [*argv, "--dtype", "float8"])
        assert result.exit_code == 2
        messages.append(result.stderr.splitlines()[-1])
    assert messages[0] == messages[1] and "float32, bfloat16, float16" in messages[0]
    for name in ("import", "capture"):
        help_text = runner.invoke(app, [name, "--help"]).output
        assert "--dtype float32|bfloat16|float16" in help_text


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "text.txt").write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _capture_error(model: str) -> str:
    result = runner.invoke(app, ["capture", "--model", model, "--text", "text.txt", "--out", "log"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    return result.stderr


@pytest.mark.parametrize("model", ["models/typo", "./x", "models/deeper/typo", "../nowhere/model"])
def test_model_path_that_does_not_exist_says_no_such_directory(offline, model):
    (offline / "models").mkdir()
    text = _capture_error(model)
    assert "no such directory" in text and "not reachable" not in text


def test_hub_id_without_network_says_unreachable_and_that_a_directory_works(offline):
    text = _capture_error("some-org/some-model")
    assert "no such local directory" in text and "the hub is not reachable" in text
    assert "A local directory works" in text and "--model DIR" in text
