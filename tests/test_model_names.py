"""Variant names are resolved in one place (clustervig.registry.resolve_model_name): a mistyped name is an error
that names the nearest registered variants, in Python and in every cvig subcommand that takes --model."""
from __future__ import annotations

import click
import pytest
import torch
from click.testing import CliRunner

import clustervig
from clustervig.cli import COMMANDS, cvig
from clustervig.cliutil import MODEL_NAME
from clustervig.registry import UnknownModelError, resolve_model_name
from clustervig.train import WEIGHTS_DIR

# subcommands whose --model does not go through cliutil.MODEL_NAME yet, with the reason; asserted below, so the
# list shrinks as they are switched over
NOT_YET: dict = {}


@pytest.mark.parametrize("typo,suggestion", [("cvig_tii", "cvig_ti"), ("ti", "cvig_ti"), ("CVIG-S", "cvig_s"),
                                             ("cvig_digit", "cvig_digits"), ("cvig_photo", "cvig_photos"),
                                             ("cvig_nanno", "cvig_nano"), ("cvig_bhr", "cvig_b_hr")])
def test_python_api_suggests_the_nearest_name(typo, suggestion):
    with pytest.raises(UnknownModelError) as ei:
        clustervig.create_model(typo)
    msg = str(ei.value)
    assert msg.startswith(f"unknown model {typo!r}: did you mean {suggestion}") and isinstance(ei.value, ValueError)
    assert msg.endswith("registered variants: " + ", ".join(clustervig.list_models()))
    with pytest.raises(UnknownModelError, match="did you mean"):
        clustervig.get_config(typo)
    # far from every name: no guess, the list only
    with pytest.raises(UnknownModelError, match=r"^unknown model 'resnet50': registered variants: cvig_b,"):
        resolve_model_name("resnet50")
    assert [resolve_model_name(n) for n in clustervig.list_models()] == clustervig.list_models()


def _model_option(name):
    cmd = cvig.get_command(click.Context(cvig), name)
    return next((p for p in cmd.params if p.name == "model_name"), None)


def test_every_subcommand_resolves_model_names_in_one_place():
    with_model = {name for name in COMMANDS if _model_option(name) is not None}
    assert with_model == {"export", "compare", "accuracy", "profile", "convert"}
    uses = {name for name in with_model if _model_option(name).type is MODEL_NAME}
    assert with_model - uses == set(NOT_YET), "switch these to cliutil.MODEL_NAME, or update NOT_YET"


@pytest.mark.parametrize("args", [
    ["profile", "--model", "cvig_tii"],
    ["export", "--model", "cvig_tii", "-o", "{out}"],
    ["profile", "cvig_tii"],
    ["compare", "x.onnx", "--model", "cvig_tii"],
    ["accuracy", "--model", "cvig_tii", "--checkpoint", "{plain}", "--digits"],
    ["convert", "--from", "authors", "{plain}", "--model", "cvig_tii", "-o", "{out}"],
])
def test_cli_typo_is_a_usage_error_with_the_suggestion(args, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(clustervig.create_model("cvig_nano").state_dict(), plain)
    (tmp_path / "x.onnx").write_bytes(b"")
    args = [a.replace("{plain}", str(plain)).replace("{out}", str(tmp_path / "o.pth")) for a in args]
    res = CliRunner().invoke(cvig, args, catch_exceptions=False)
    assert res.exit_code == 2, res.output
    assert "unknown model 'cvig_tii': did you mean cvig_ti? registered variants: " in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "o.pth").exists()


def test_accuracy_with_a_checkpoint_recording_an_unknown_variant(tmp_path):
    """A checkpoint whose recorded variant is not registered (renamed, or from a newer version): one line."""
    ck = torch.load(WEIGHTS_DIR / "cvig_digits.pth", weights_only=True)
    ck["config"] = dict(ck["config"], name="cvig_digitz")
    torch.save(ck, tmp_path / "renamed.pth")
    res = CliRunner().invoke(cvig, ["accuracy", "--checkpoint", str(tmp_path / "renamed.pth"), "--digits"])
    assert res.exit_code == 1 and res.output.strip() == (
        "Error: unknown model 'cvig_digitz': did you mean cvig_digits? registered variants: "
        + ", ".join(clustervig.list_models())), res.output
