"""Command-line option groups shared by onnxlr's subcommands (Polygraphy-style argument groups).

Each group is declared once and used by every subcommand that needs it (rank policy, target
selection, calibration, outputs, scale, verification); `State` carries -v/-q and the console;
`verify_settings` turns the verification group into onnxlr.job.VerifySettings.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click
from rich.console import Console

from onnxlr.errors import OnnxlrError
from onnxlr.save import PROTOBUF_LIMIT_BYTES
from onnxlr.settings import ALL_OPS

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
        state: State = ctx.find_object(State)
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

rank_policy_options = _options(
    click.option("--rank-ratio", type=FRACTION, default=None, metavar="R",
                 help="Rank = ceil(R x full rank), 0 < R <= 1. The default policy (0.25) when none is given."),
    click.option("--rank", type=click.IntRange(min=1), default=None, metavar="N", help="The same rank N everywhere."),
    click.option("--energy", type=FRACTION, default=None, metavar="E",
                 help="Smallest rank keeping fraction E of the squared singular values."),
    click.option("--param-ratio", type=FRACTION, default=None, metavar="P",
                 help="Per layer: largest rank whose factor pair has <= P x the original parameters."),
    click.option("--param-budget", type=FRACTION, default=None, metavar="P",
                 help="Whole model: ranks chosen so the factorizable layers keep <= P of their parameters "
                      "(some may stay dense)."),
    click.option("--mac-budget", type=FRACTION, default=None, metavar="P",
                 help="Whole model: ranks chosen so the factorizable layers keep <= P of their MACs "
                      "(some may stay dense)."),
    click.option("--rank-multiple", type=click.IntRange(min=1), default=1, show_default=True, metavar="M",
                 help="Round ranks up to a multiple of M (tensor cores), never past break-even."),
    click.option("--allow-no-gain", is_flag=True,
                 help="Emit factorizations even when they are not smaller or cheaper (e.g. to test exactness)."),
)

target_selection_options = _options(
    click.option("--ops", default=",".join(ALL_OPS), show_default=True, metavar="LIST",
                 help="Comma-separated op types to factorize."),
    click.option("--include", multiple=True, metavar="GLOB", help="Only nodes whose name matches (repeatable)."),
    click.option("--exclude", multiple=True, metavar="GLOB", help="Skip nodes whose name matches (repeatable)."),
    click.option("--min-params", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
                 help="Skip weights with fewer than N parameters."),
    click.option("--inputs-as-constants", is_flag=True,
                 help="Initializers listed as graph inputs are treated as constant weights (factorized, and "
                      "dropped from the inputs when replaced), for IR >= 4 models that list them; IR < 4 "
                      "does this always."),
    click.option("--conv-scheme", type=click.Choice(["auto", "output", "input", "spatial"]), default="auto",
                 show_default=True,
                 help="Conv split: output (kxk then 1x1), input (1x1 then kxk), spatial (kx1 then 1xk); "
                      "auto picks the fewest MACs at equal error."),
)

latency_options = _options(
    click.option("--objective", type=click.Choice(["size", "latency"]), default="size", show_default=True,
                 help="What the rank policy optimizes. latency: every candidate factor pair (layer, scheme, rank, "
                      "its round-ups to multiples of 8) is timed against its original node with onnxruntime, on the "
                      "first of --providers with --threads, at the shapes the model sees (--shape, else the "
                      "--calibration or --inputs batch); only pairs measured 5% faster are kept, budgets allocate "
                      "over them. Times are cached in ~/.cache/onnxlr."),
    click.option("--latency-budget", type=FRACTION, default=None, metavar="P",
                 help="Rank policy (implies --objective latency): keep <= fraction P of the factorizable layers' "
                      "measured time, allocated greedily on energy per millisecond."),
    click.option("--threads", "latency_threads", type=click.IntRange(min=0), default=1, show_default=True,
                 help="onnxruntime intra-op threads when timing candidates (0: onnxruntime's default), as in "
                      "`onnxlr bench --threads`."),
    click.option("--latency-table", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE.json",
                 help="Plan with the times `onnxlr bench MODEL --export-latency-table FILE.json` measured on the "
                      "target device (implies --objective latency); nothing is timed here."),
    click.option("--no-cache", "no_latency_cache", is_flag=True,
                 help="Time every candidate again (the cache of measured times is neither read nor written)."),
)

calibration_options = _options(
    click.option("--calibration", "calibration_path", type=click.Path(exists=True), default=None,
                 metavar="FILE.npz|DIR",
                 help="Calibration inputs (an .npz keyed by input name, or a folder of them): weights get the "
                      "activation-whitened SVD, which keeps each layer's outputs on this data closest "
                      "(for Conv, the output scheme on the patches it sees)."),
    click.option("--calibration-samples", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Use at most the first N calibration samples. Default: all."),
)

methods_option = _options(
    click.option("--methods", default=None, metavar="LIST",
                 callback=lambda _c, _p, v: None if v is None else tuple(split_list(v) or ()),
                 help="svd: each weight its own factor pair. svd,joint: also coupled pairs (MLP, gated MLP and "
                      "conv channel pairs, attention V·O and Q·Kᵀ heads) may keep k of their inner neurons (head "
                      "dimensions), fitted on the --calibration data, where that loses less output error than the "
                      "pair's per-matrix plan at the same cost (whole-model budgets allocate across both). Default: "
                      "svd,joint with --calibration, svd without."),
    click.option("--quantize", type=click.Choice(["int8", "int8-static", "fp16"]), default=None,
                 help="After the rewrite, quantize with onnxruntime's tools: int8 (dynamic, per-channel INT8 "
                      "weights), int8-static (QDQ, calibrated on --calibration), fp16 (float16 weights and compute, "
                      "float32 inputs and outputs). Verification and --target-cosine/--target-error measure the "
                      "quantized model (the search takes the quantizer's own loss, measured on the original, off "
                      "the goal)."),
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

scale_options = _options(
    click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
                 help="exact: LAPACK (gesdd, gesvd fallback). randomized: randomized range finder for the leading "
                      "triplets when the rank is known before the SVD. auto: randomized only for large matrices "
                      "at a small rank (checked against the exact tail where affordable), exact otherwise."),
    click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                 help="Where the SVDs run; cuda needs PyTorch with CUDA (the `torch` extra)."),
    click.option("--jobs", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Factorize up to N layers at once (threads, within a memory budget); the output is "
                      "identical to --jobs 1. Default: one per available core, up to 8."),
)


verification_options = _options(
    click.option("--providers", default=None, metavar="LIST",
                 help="Execution providers, comma-separated (cpu, cuda, ...). Default: cpu, plus cuda when "
                      "onnxruntime-gpu is installed and a GPU is visible."),
    click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.npz",
                 help="Inputs keyed by input name, samples along the first axis. Default: synthesized."),
    click.option("--shape", "shapes", multiple=True, metavar="NAME:DIMS",
                 help="Fix an input's dynamic dims, e.g. input_ids:1x128 (repeatable): for synthesized inputs "
                      "and, in optimize, for the MAC/FLOP counts."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of synthesized inputs."),
    click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Batch dimension of synthesized inputs."),
    click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
                 help="Samples per onnxruntime run."),
    click.option("--atol", type=click.FloatRange(min=0), default=None,
                 help="Gate: every element within atol + rtol x |reference|."),
    click.option("--rtol", type=click.FloatRange(min=0), default=None, help="Gate: see --atol."),
    click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None,
                 help="Gate: cosine similarity of each float output to the reference (integer and boolean outputs: "
                      "the share of elements exactly equal). Without --atol/--rtol/--min-cosine the default gate "
                      "is --min-cosine 0.99."),
    click.option("--no-gate", is_flag=True,
                 help="No default gate: outputs are compared and reported, but only --atol/--rtol/--min-cosine "
                      "(when given) and NaN/Inf the reference does not have can fail the run."),
    click.option("--per-layer", is_flag=True, help="Also compare the output of every factorized node."),
    click.option("--min-layer-cosine", type=click.FloatRange(-1, 1), default=None,
                 help="Gate: each factorized layer, run on the original layer's input, keeps at least this cosine to "
                      "the original layer's output (the per-layer check, worst layers first; it always runs when the "
                      "models are verified in segments)."),
)


def verify_settings(options: dict[str, Any], enabled: bool = True, keep_failed: bool = False) -> Any:
    """The verification option group, popped from a command's options, as onnxlr.job.VerifySettings."""
    from onnxlr.inputs import parse_shape_overrides
    from onnxlr.job import VerifySettings

    return VerifySettings(
        enabled=enabled, inputs=options.pop("inputs_path"), providers=split_list(options.pop("providers")),
        input_shapes=parse_shape_overrides(options.pop("shapes")), seed=options.pop("seed"),
        samples=options.pop("samples"), batch_size=options.pop("batch_size"), atol=options.pop("atol"),
        rtol=options.pop("rtol"), min_cosine=options.pop("min_cosine"), no_gate=options.pop("no_gate"),
        per_layer=options.pop("per_layer"), min_layer_cosine=options.pop("min_layer_cosine"), keep_failed=keep_failed)


def split_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def split_ops(text: str) -> tuple[str, ...]:
    ops = tuple(part.strip() for part in text.split(",") if part.strip())
    if not ops:
        raise OnnxlrError("--ops is empty; give op types such as MatMul,Gemm,Conv")
    return ops
