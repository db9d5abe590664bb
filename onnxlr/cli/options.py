"""Command-line option groups shared by onnxlr's subcommands (Polygraphy-style argument groups).

Each group is declared once and used by every subcommand that needs it (rank policy, target
selection, calibration, outputs, scale, verification); `State` carries -v/-q and the console;
`verify_settings` turns the verification group into onnxlr.job.VerifySettings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from onnxlr.model_io.save import PROTOBUF_LIMIT_BYTES

logger = logging.getLogger(__name__)


class ByteSize(click.ParamType):
    """A size in bytes: 1000000, 500MB, 1.5GiB (kB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""

    name = "size"
    UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in self.UNITS:
            self.fail(f"{value!r} is not a size such as 1000000, 500MB or 1.5GiB", param, ctx)
        return int(float(match.group(1)) * self.UNITS[match.group(2).lower()])


class State:
    """Options of the `onnxlr` group that every subcommand sees."""

    def __init__(self, verbose: bool, quiet: bool) -> None:
        self.verbose = verbose
        self.quiet = quiet
        self.console = Console(quiet=quiet, highlight=False)
        if not self.console.is_terminal:
            self.console.width = 160  # logs and CI: do not wrap the table at 80 columns
        self.err = Console(stderr=True, highlight=False)

    def progress(self, items: Sequence[Any], description: str) -> Iterable[Any]:
        """A rich progress bar on a terminal; nothing when quiet or when stderr is not a terminal."""
        if self.quiet or not self.err.is_terminal or len(items) < 2:
            return items
        from rich.progress import track

        return track(items, description=description, console=self.err, transient=True)


# ----------------------------------------------------------------------------- shared option groups


def _options(*decorators: Callable) -> Callable:
    """Bundle click options so every subcommand that needs a group declares it once."""

    def apply(func: Callable) -> Callable:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


FRACTION = click.FloatRange(0, 1, min_open=True)


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    # -v/-q are accepted after the subcommand too (`onnxlr optimize ... -q`), as users type them.
    if value:
        state = ctx.find_object(State)
        assert state is not None  # the group made it
        if param.name == "verbose":
            state.verbose = True
            logging.getLogger().setLevel(logging.INFO)
        else:
            state.quiet = True
            state.console.quiet = True


verbosity_options = _options(
    click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_verbosity,
                 help="Log each step; show tracebacks on errors."),
    click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_verbosity,
                 help="Print nothing but errors."),
)

def settings_options(*groups: str, declared: Any = None) -> Callable:
    """The click options of these groups of fields of `declared` (onnxlr.settings.Settings by default; also
    onnxlr.job.VerifySettings), generated from their declarations (settings.setting: type, default, check and help in
    one place); Settings' "policy" group leads with every rank policy (onnxlr.policies.POLICIES)."""
    from onnxlr.policies import POLICIES
    from onnxlr.settings import Settings

    declared = declared or Settings
    decorators = [_policy_option(policy) for policy in POLICIES] if declared is Settings and "policy" in groups else []
    decorators += [_setting_option(field) for field in dataclasses.fields(declared)
                   if field.metadata.get("group") in groups]
    return _options(*decorators)


POLICY_TYPES = {"fraction": FRACTION, "count": click.IntRange(min=1),
                "positive": click.FloatRange(min=0, min_open=True)}


def _policy_option(policy: Any) -> Callable:
    return click.option("--" + policy.keyword.replace("_", "-"), policy.keyword, type=POLICY_TYPES[policy.kind],
                        default=None, metavar=policy.metavar, help=policy.help)


def _setting_option(field: dataclasses.Field) -> Callable:
    """One Settings field as a click option: its flag, type, default and help from its declaration."""
    meta = field.metadata
    flag = meta["flag"] or "--" + field.name.replace("_", "-")
    if meta["kind"] == "bool":
        if meta["negated"]:  # --no-cache: sets the field False
            return click.option(flag, field.name, is_flag=True, flag_value=False, default=True, help=meta["help"])
        return click.option(flag, field.name, is_flag=True, help=meta["help"])
    default = None if field.default is dataclasses.MISSING else field.default
    kwargs: dict[str, Any] = {"default": default, "help": meta["help"],
                              "show_default": meta["show_default"] and default is not None}
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if meta["kind"] == "choice":
        kwargs["type"] = click.Choice(list(meta["choices"]))
    elif meta["kind"] in ("count", "natural"):
        kwargs["type"] = click.IntRange(min=1 if meta["kind"] == "count" else 0)
    elif meta["kind"] == "int":
        kwargs["type"] = int
    elif meta["kind"] == "number":
        low, high = meta["bounds"]
        kwargs["type"] = click.FloatRange(low if math.isfinite(low) else None, high if math.isfinite(high) else None)
    elif meta["path"]:
        kwargs["type"] = click.Path(exists=meta["path"] == "existing", dir_okay=meta["path"] == "any")
    if meta["multiple"]:
        kwargs.update(multiple=True, default=())
    parse = meta["parse"]
    if parse is not None:  # text -> value; the default is shown as the text that gives it
        kwargs["default"] = ",".join(default) if isinstance(default, tuple) and not meta["multiple"] else default
        kwargs["callback"] = lambda _ctx, _param, value: None if value is None else parse(value)
    return click.option(flag, field.name, **kwargs)


class DataSource(click.ParamType):
    """A path that exists, or `module:function` (onnxlr.model_io.inputs.callable_source)."""

    name = "data"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from onnxlr.model_io.inputs import CALLABLE

        if Path(value).exists() or CALLABLE.match(str(value)):
            return value
        self.fail(f"{value!r} does not exist (nor is it a module:function)", param, ctx)


calibration_options = _options(
    click.option("--calibration", "calibration_path", type=DataSource(), default=None,
                 metavar="FILE.npz|DIR|FILE.txt|MODULE:FUNCTION",
                 help="Calibration inputs (an .npz keyed by input name, a folder of them, text with --tokenizer: a "
                      ".txt or .jsonl file, or module:function, a Python function in the current folder or on "
                      "sys.path that returns or yields dicts of arrays keyed by input name): weights get the "
                      "activation-whitened SVD, which keeps each layer's outputs on this data closest "
                      "(for Conv, the output scheme on the patches it sees)."),
    click.option("--calibration-samples", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Use at most the first N calibration samples. Default: all."),
)

text_options = _options(
    click.option("--tokenizer", type=click.Path(exists=True), default=None, metavar="tokenizer.json|DIR",
                 help="Text data (--calibration/--inputs FILE.txt, one sample a line, or FILE.jsonl): the Hugging "
                      "Face tokenizer.json (or the folder that holds it) that turns it into input_ids, "
                      "attention_mask, token_type_ids and position_ids, by input name. Default: the one in an "
                      "exported model folder given as INPUT."),
    click.option("--seq-len", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Text data: pad or truncate every sample to N tokens. Default: the model's fixed length, else "
                      "the longest sample (up to the model folder's max_seq_length, the model's position table, or "
                      "512)."),
    click.option("--text-field", default="text", show_default=True, metavar="NAME",
                 help="Text data in .jsonl: the field that holds each sample's text."),
    click.option("--image-spec", default=None, metavar="KEY=VALUE,...",
                 help="A folder of images as --calibration/--inputs: preset=unit|symmetric|imagenet|raw (default "
                      "unit: pixels / 255), size=HxW, resize=N (shorter side, then a center crop), mean=a/b/c, "
                      "std=a/b/c, order=RGB|BGR|L, layout=NCHW|NHWC. The model's fixed input shape fills in the rest."),
)

output_options = _options(
    click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.json",
                 help="Write the report (settings, totals, per-layer rows) as JSON."),
    click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.md",
                 help="Write the report as Markdown (a CI job summary or a pull-request comment)."),
    click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.html",
                 help="Write the report as one self-contained HTML page with plots (no network references)."),
    click.option("--external-data/--no-external-data", default=None,
                 help="Force weights into (or out of) a .data file beside the model. Default: external when the "
                      "input used it or the input model exceeds --external-data-threshold."),
    click.option("--external-data-threshold", type=ByteSize(), default=PROTOBUF_LIMIT_BYTES, metavar="SIZE",
                 help="Without --external-data/--no-external-data: write external data when the input's weights "
                      "exceed SIZE (bytes, or e.g. 500MB, 1.5GiB). Default: just under protobuf's 2 GB limit."),
)

def verify_settings(options: dict[str, Any], enabled: bool = True, keep_failed: bool = False) -> Any:
    """The verification options, popped from a command's options, as onnxlr.job.VerifySettings."""
    from onnxlr.job import VerifySettings

    return VerifySettings(enabled=enabled, keep_failed=keep_failed,
                          **{field.name: options.pop(field.name) for field in dataclasses.fields(VerifySettings)
                             if field.metadata.get("group") == "verification"})


