"""Settings are declared once (onnxlr.settings.setting, onnxlr.policies) and everything else is derived: the CLI's
options, the policy keywords, the checks; a new rank policy is one class."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from graphs import init, make_model, tensor_input
from onnx import helper

from onnxlr import policies
from onnxlr.cli import cli
from onnxlr.errors import OnnxlrError
from onnxlr.factorize.pipeline import factorize_model
from onnxlr.job import VerifySettings
from onnxlr.settings import Settings


def _flags(command: str) -> set[str]:
    command_object = cli.commands[command]
    return {flag for param in command_object.params for flag in getattr(param, "opts", [])}


def test_every_declared_setting_and_policy_is_a_flag_of_optimize():
    flags = _flags("optimize")
    for policy in policies.POLICIES:
        assert "--" + policy.keyword.replace("_", "-") in flags
    for declared in (Settings, VerifySettings):
        for field in dataclasses.fields(declared):
            if field.metadata.get("group"):
                assert (field.metadata["flag"] or "--" + field.name.replace("_", "-")) in flags, field.name


def test_the_help_comes_from_the_declaration():
    result = CliRunner().invoke(cli, ["optimize", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for policy in policies.POLICIES:
        assert " ".join(policy.help.split())[:40] in text
    field = next(f for f in dataclasses.fields(Settings) if f.name == "rank_multiple")
    assert field.metadata["help"][:40] in text


@pytest.mark.parametrize(("keywords", "message"), [
    ({"rank_ratio": 0.5, "energy": 0.9}, "choose one rank policy, not 2: rank_ratio, energy"),
    ({"rank_ratio": 1.5}, "rank_ratio must be in (0, 1], got 1.5"),
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"target_error": -1.0}, "target_error must be a positive number"),
    ({"min_params": -1}, "min_params must be a non-negative integer"),
    ({"conv_scheme": "diagonal"}, "conv_scheme must be one of auto, output, input, spatial"),
    ({"allow_no_gain": "yes"}, "allow_no_gain must be True or False"),
])
def test_declared_checks_name_the_keyword(keywords, message):
    with pytest.raises(OnnxlrError) as failed:
        Settings.of(**keywords)
    assert str(failed.value).startswith(message)


def test_the_policy_is_one_typed_value_and_records_as_before():
    settings = Settings.of(param_budget=0.6)
    assert settings.policy == policies.ParamBudget(0.6) and settings.budget == ("params", 0.6)
    recorded = settings.recorded()
    assert recorded["param_budget"] == 0.6 and recorded["rank_ratio"] is None and "latency_budget" not in recorded
    assert Settings().policy == policies.RankRatio(0.25) == Settings.of().policy
    assert Settings.of(latency_budget=0.5).objective == "latency"  # a latency budget implies the objective


@dataclasses.dataclass(frozen=True)
class HalfOfFull(policies.LayerPolicy):
    """A policy a contributor might add: rank = value x full rank, rounded down. One class, nothing else."""

    keyword = "half_of_full"
    help = "Rank = floor(P x full rank)."

    def rank(self, scheme, spectrum):
        return max(1, int(self.value * scheme.full_rank))


def test_a_new_policy_is_one_class():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_input("x", [2, 64])], [tensor_input("y", [2, 48])],
                       [init("W", rng.standard_normal((64, 48)).astype(np.float32))])
    result = factorize_model(ir.serde.deserialize_model(model), Settings(policy=HalfOfFull(0.3)))
    [row] = result.report.layers
    assert row.rank == 14 and row.status == "factorized"  # floor(0.3 x 48)
