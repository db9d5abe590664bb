"""The `onnxlr` command line: a thin layer over the same stages as the Python API.

Exit codes: 0 success; 1 a verification gate or check failed; 2 bad input or usage;
3 an internal error (a bug: please report it with the output of -v); 130 interrupted.
"""

from __future__ import annotations

import logging
import signal
import traceback
from collections.abc import Sequence
from typing import Any

import click

from onnxlr._version import __version__
from onnxlr.cli.options import (
    FRACTION,
    State,
    calibration_options,
    output_options,
    settings_options,
    text_options,
    verbosity_options,
    verify_settings,
)
from onnxlr.errors import OnnxlrError
from onnxlr.job import VerifySettings
from onnxlr.model_io import io
from onnxlr.settings import split_list, split_ops

EXAMPLES_OPTIMIZE = """
\b
Examples:
  onnxlr optimize model.onnx model-lr.onnx --rank-ratio 0.25
  onnxlr optimize model.onnx out.onnx --energy 0.95 --report out.json
  onnxlr optimize model.onnx out.onnx --param-budget 0.6 --rank-multiple 8
  onnxlr optimize model.onnx out.onnx --ops Conv --conv-scheme spatial --dry-run
  onnxlr optimize model.onnx out.onnx --exclude '*lm_head*' --min-params 65536
  onnxlr optimize model.onnx out.onnx --calibration calib.npz --calibration-samples 256
  onnxlr optimize model.onnx out.onnx --calibration calib.npz --param-budget 0.7 --compensate
  onnxlr optimize model.onnx out.onnx --calibration calib.npz --inputs heldout.npz --target-cosine 0.99
  onnxlr optimize model.onnx out.onnx --calibration calib.npz --inputs heldout.npz --target-cosine 0.98 --quantize int8
  onnxlr optimize model.onnx out.onnx --calibration calib.npz --inputs heldout.npz --quantize auto --target-cosine 0.99
  onnxlr optimize minilm_dir/ out_dir/ --calibration sentences.txt --target-cosine 0.99
  onnxlr optimize model.onnx out.onnx --calibration calib.txt --tokenizer tokenizer.json --target-cosine 0.99
  onnxlr optimize model.onnx out.onnx --calibration images/ --image-spec preset=imagenet --target-cosine 0.99
  onnxlr optimize model.onnx out.onnx --objective latency --rank-ratio 0.25 --shape input:32x3x224x224 --threads 4
  onnxlr optimize model.onnx out.onnx --latency-budget 0.6 --calibration calib.npz
  onnxlr optimize model.onnx out.onnx --param-budget 0.5 --latency-table phone.json --shape input:1x3x224x224
"""

class OnnxlrGroup(click.Group):
    """Turns OnnxlrError into a short message and its exit code; tracebacks only with -v."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OnnxlrError as exc:
            if _verbose(ctx):
                traceback.print_exc()
            click.echo(f"onnxlr: error: {exc.cli_message()}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("onnxlr: interrupted; nothing was written", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except MemoryError:
            click.echo("onnxlr: error: out of memory", err=True)
            ctx.exit(2)
        except Exception as exc:  # a bug: short message, traceback with -v
            if _verbose(ctx):
                traceback.print_exc()
            click.echo(f"onnxlr: internal error: {type(exc).__name__}: {exc}\n"
                       "Run again with -v for the traceback and please report it.", err=True)
            ctx.exit(3)


def _verbose(ctx: click.Context) -> bool:
    # -v may come before or after the subcommand; both end up in the State object.
    return bool(ctx.obj is not None and ctx.obj.verbose)


@click.group(cls=OnnxlrGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="onnxlr")
@click.option("-v", "--verbose", is_flag=True, help="Log each step; show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """onnxlr: make ONNX models smaller and faster with low-rank factorization.

    Finds the weights of MatMul, Gemm and Conv nodes, factorizes each with an SVD and replaces the
    node by two chained nodes. Nodes it cannot handle are left as they are, with the reason.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    ctx.obj = State(verbose=verbose, quiet=quiet)


# ----------------------------------------------------------------------------- optimize


@cli.command(epilog=EXAMPLES_OPTIMIZE)
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=True))
@click.argument("output_path", metavar="OUTPUT", type=click.Path(dir_okay=True), required=False)
@settings_options("policy")
@settings_options("latency")
@settings_options("targets")
@calibration_options
@text_options
@settings_options("calibration", "methods")
@output_options
@settings_options("scale")
@click.option("--dry-run", is_flag=True, help="Plan and print the table; write no model.")
@click.option("--verify/--no-verify", "run_verify", default=True, show_default=True,
              help="Compare the result with the input on onnxruntime before writing it.")
@settings_options("verification", declared=VerifySettings)
@settings_options("keep", declared=VerifySettings)
@click.option("--speed-check/--no-speed-check", default=True, show_default=True,
              help="Time the written model against INPUT end to end (interleaved, about a second; on --inputs or "
                   "synthesized inputs) and warn when it is slower. --objective latency always confirms its plan "
                   "this way and puts back the layers that do not pay.")
@click.option("--no-memory-check", is_flag=True,
              help="Do not stop when verification or calibration looks too large for the memory available "
                   "(onnxruntime's session estimated against MemAvailable and the cgroup limit).")
@click.option("--targets", "targets_path", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="FILE.toml", help="Extra edge targets for the report's latency ESTIMATES (same schema as "
                                        "onnxlr/data/devices.toml); prints the estimate table.")
@verbosity_options
@click.pass_obj
def optimize(state: State, input_path: str, output_path: str | None, report_path: str | None,
             markdown_path: str | None, html_path: str | None, external_data: bool | None, dry_run: bool,
             run_verify: bool, keep_failed: bool, no_memory_check: bool, speed_check: bool, **options: Any) -> None:
    """Factorize INPUT's MatMul, Gemm and Conv weights and write OUTPUT.

    INPUT is an ONNX file, or a folder exported by Hugging Face Optimum or sentence-transformers (model.onnx or
    onnx/model.onnx beside the tokenizer and configs): OUTPUT is then a new folder with the rewritten model at the
    same place and every other file copied, loadable wherever the input folder loaded; the folder's
    tokenizer.json reads text data. The input is never modified. OUTPUT is verified against INPUT with onnxruntime (see
    `onnxlr verify`; the default gate is --min-cosine 0.99, --no-gate turns it off) and written atomically with
    its external data, if any, so a failed, gated or interrupted run leaves nothing behind.
    """
    from onnxlr import job as jobs
    from onnxlr.errors import GateFailed
    from onnxlr.settings import Settings

    checks = verify_settings(options, enabled=run_verify, keep_failed=keep_failed)
    calibration_path, calibration_samples = options.pop("calibration_path"), options.pop("calibration_samples")
    text = jobs.TextOptions(tokenizer=options.pop("tokenizer"), seq_len=options.pop("seq_len"),
                            text_field=options.pop("text_field"))
    image_spec = options.pop("image_spec")
    targets_path = options.pop("targets_path")
    external_data_threshold = options.pop("external_data_threshold")
    if output_path is None and not dry_run:
        raise OnnxlrError("missing OUTPUT: give an output path, or --dry-run to only plan")
    if options["objective"] == "latency" or options["latency_budget"] or options["latency_table"]:
        from onnxlr.verification.runtime import parse_providers

        options["latency_provider"] = parse_providers(list(checks.providers) if checks.providers else None)[0]
    job = jobs.Job(source=input_path, settings=Settings.of(**options), verify=checks,
                   output=jobs.OutputSettings(path=output_path, external_data=external_data,
                                              external_data_threshold=external_data_threshold),
                   calibration=calibration_path, calibration_samples=calibration_samples, dry_run=dry_run,
                   memory_check=not no_memory_check, speed_check=speed_check,
                   edge_targets=bool(report_path or html_path), targets_file=targets_path, progress=state.progress,
                   text=text, image_spec=image_spec)
    try:
        outcome = jobs.run(job)
    except GateFailed as exc:
        if exc.report is not None:  # the reports say why
            _finish(exc.report.to_json(), report_path, markdown_path, html_path, state)
        raise
    report = outcome.report
    _finish(report.to_json(), report_path, markdown_path, html_path, state)
    if targets_path and report.targets is not None:
        from onnxlr.render.report import print_estimates

        print_estimates(report.targets, state.console)
    if outcome.failure:
        raise GateFailed(outcome.failure)


def _calibrate(input_path: str, loaded: Any, calibration_path: str | None, samples: int | None,
               batch_size: int) -> dict | None:
    """Activation Grams of the original model on the calibration data (before it is rewritten)."""
    if calibration_path is None:
        if samples is not None:
            raise OnnxlrError("--calibration-samples needs --calibration")
        return None
    from onnxlr.calibrate.calibration import collect_grams

    return collect_grams(input_path, loaded.model, calibration_path, samples=samples, batch_size=batch_size)


def _finish(report: dict[str, Any], report_path: str | None, markdown_path: str | None, html_path: str | None,
            state: State) -> None:
    """Write the reports (also for a failed gate: they say why) and print the tables."""
    from onnxlr.render.report import print_report, print_verification, render_markdown, write_json, write_text

    page = None
    if html_path:  # rendered first: a plotting error then leaves no report half-written
        from onnxlr.render.html_report import render_html

        page = render_html(report)
    if report_path:
        write_json(report, report_path)
    if markdown_path:
        write_text(render_markdown(report), markdown_path)
    if page is not None and html_path:
        write_text(page, html_path)
    print_report(report, state.console)
    if "verification" in report:
        print_verification(report["verification"], state.console)
    if "output" in report and report.get("folder", {}).get("output"):
        folder = report["folder"]
        state.console.print(f"wrote {folder['output']}: {folder['model']} and {len(folder['copied'])} other files "
                            "copied from the input folder")
    elif "output" in report:
        state.console.print(f"wrote {report['output']}")


# ----------------------------------------------------------------------------- verify

EXAMPLES_VERIFY = """
\b
Examples:
  onnxlr verify model.onnx model-lr.onnx
  onnxlr verify model.onnx model-lr.onnx --inputs eval.npz --min-cosine 0.99 --json verify.json
  onnxlr verify model.onnx model-lr.onnx --providers cpu,cuda --shape input_ids:4x128 --per-layer
  onnxlr verify model.onnx model-lr.onnx --atol 1e-3 --rtol 1e-2
  onnxlr verify minilm_dir minilm_lr_dir --inputs sentences.txt --min-metric neighbours=0.9
"""

@cli.command(epilog=EXAMPLES_VERIFY)
@click.argument("reference_path", metavar="REFERENCE", type=click.Path(dir_okay=True))
@click.argument("candidate_path", metavar="CANDIDATE", type=click.Path(dir_okay=True))
@settings_options("verification", declared=VerifySettings)
@text_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.json",
              help="Write every metric as JSON.")
@click.option("--no-memory-check", is_flag=True,
              help="Run each model whole, even when it looks too large for the memory available (by default such "
                   "models, and any over 2 GB of weights, run in segments of consecutive nodes).")
@verbosity_options
@click.pass_obj
def verify(state: State, reference_path: str, candidate_path: str, json_path: str | None, no_memory_check: bool,
           **options: Any) -> None:
    """Run REFERENCE and CANDIDATE with onnxruntime and compare their outputs.

    Each is an ONNX file or an exported model folder (its model.onnx or onnx/model.onnx); --inputs may be text
    (with --tokenizer, or the reference folder's tokenizer.json) or a folder of images (--image-spec).

    Metrics per output and execution provider: max/mean absolute error, max relative error,
    cosine similarity, SNR, top-1 agreement for score-like outputs, NaN/Inf counts. Exit code 1
    when a gate (--atol/--rtol, --min-cosine, or NaN/Inf the reference does not have) fails. Without a gate
    flag the default gate applies: each float output keeps cosine >= 0.99 (integer and boolean outputs:
    >= 99% of elements equal); --no-gate turns it off.
    """
    from onnxlr.errors import GateFailed
    from onnxlr.job import TextOptions, verify_files
    from onnxlr.render.report import print_verification, write_json

    checks = verify_settings(options)
    text = TextOptions(tokenizer=options.pop("tokenizer"), seq_len=options.pop("seq_len"),
                       text_field=options.pop("text_field"))
    result = verify_files(reference_path, candidate_path, checks, text, options.pop("image_spec"),
                          memory_check=not no_memory_check)
    if json_path:
        write_json(result.to_json(), json_path)
    print_verification(result.to_json(), state.console)
    if not result.passed:
        raise GateFailed("verification failed: " + "; ".join(result.failures))


# ----------------------------------------------------------------------------- bench

EXAMPLES_BENCH = """
\b
Examples:
  onnxlr bench model.onnx
  onnxlr bench model.onnx --compare model-lr.onnx --threads 1 --runs 200
  onnxlr bench model.onnx --compare model-lr.onnx --inputs eval.npz --samples 1 --json bench.json
  onnxlr bench model.onnx --shape input_ids:1x128 --providers cpu,cuda
  onnxlr bench model-lr.onnx --compare model.onnx --profile
  onnxlr bench model.onnx --shape input:1x1x8x8 --threads 4 --export-latency-table device.json
"""


@cli.command(epilog=EXAMPLES_BENCH)
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=True))
@click.option("--compare", "compare_path", type=click.Path(dir_okay=True), default=None, metavar="OTHER",
              help="Time OTHER interleaved with MODEL and report the speedup MODEL/OTHER.")
@click.option("--providers", default="cpu", show_default=True, metavar="LIST", help="Execution providers.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="onnxruntime intra-op threads (0: onnxruntime's default); inter-op is 1.")
@click.option("--runs", type=click.IntRange(min=2), default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--optimization-level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              show_default=True, help="onnxruntime graph optimization level (the same for both models).")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.npz",
              help="Inputs keyed by input name; the first --samples samples are used. Default: synthesized.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME:DIMS", help="Shape of a synthesized input.")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size of each timed run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of synthesized inputs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.json",
              help="Write every figure and the run context as JSON.")
@click.option("--profile", is_flag=True,
              help="With --compare: onnxruntime's per-node profile, each factorized layer against its pair.")
@click.option("--export-latency-table", "table_path", type=click.Path(dir_okay=False), default=None,
              metavar="FILE.json", help="Time every factorizable layer of MODEL and its factor pairs at every rank a "
                                        "plan may ask for, here, at the inputs' shapes; `onnxlr optimize "
                                        "--latency-table FILE.json` plans with it on another machine.")
@click.option("--targets-estimate", is_flag=True,
              help="Also ESTIMATE latency on edge targets (roofline from published peak figures, not measured).")
@click.option("--targets", "targets_path", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="FILE.toml", help="Extra edge targets (same schema as onnxlr/data/devices.toml); "
                                        "implies --targets-estimate.")
@verbosity_options
@click.pass_obj
def bench(state: State, model_path: str, compare_path: str | None, providers: str, threads: int, runs: int,
          warmup: int, optimization_level: str, inputs_path: str | None, shapes: tuple[str, ...], samples: int,
          seed: int, json_path: str | None, profile: bool, targets_estimate: bool = False,
          targets_path: str | None = None, table_path: str | None = None) -> None:
    """Measure MODEL's latency with onnxruntime (p50/p90/p99, mean, std), optionally against OTHER.

    With --compare, the two models run interleaved in one process (A B, B A, ...) after the same
    warm-up, and the speedup is the median of the per-run ratios, with its 10th-90th percentile spread.
    """
    from onnxlr.model_io import inputs, synthesis
    from onnxlr.model_io.folders import model_path as model_in
    from onnxlr.render.report import print_bench, print_estimates, write_json
    from onnxlr.timing import bench as b
    from onnxlr.verification import runtime

    model_path, compare_path = model_in(model_path), model_in(compare_path) if compare_path else None
    loaded = io.load(model_path)
    graphs = [loaded.model]
    if compare_path:
        graphs.append(io.load(compare_path).model)  # the same safety checks before onnxruntime reads it
    given = synthesis.model_feeds(model_path, inputs.input_specs(loaded.model), inputs_path, seed, samples,
                                  inputs.parse_shape_overrides(shapes))
    feeds = given.arrays
    if not given.synthesized:  # the first --samples samples of the file
        feeds = {name: (array[:samples] if array.ndim else array) for name, array in feeds.items()}
    models = [model_path] + ([compare_path] if compare_path else [])
    results: dict[str, Any] = {"providers": {}, "inputs": {name: list(a.shape) for name, a in feeds.items()},
               "synthesized": given.synthesized,
               # what each model weighs on disk (its external data too): a quantized model's real size
               "files": [{"model": str(path), "bytes": io.file_bytes(path)} for path in models]}
    if targets_estimate or targets_path:  # before timing: a bad targets file fails fast
        from onnxlr.timing import edge

        results["targets"] = edge.for_bench(models, feeds, targets_path)
    for provider in runtime.parse_providers(split_list(providers)):
        results["providers"][provider] = b.benchmark(models, feeds, provider, threads=threads, runs=runs,
                                                     warmup=warmup, optimization_level=optimization_level,
                                                     progress=state.progress, graphs=graphs,
                                                     hint=runtime.SYNTHESIZED_HINT if given.synthesized
                                                     else runtime.GIVEN_HINT)
    if profile:
        if not compare_path:
            raise OnnxlrError("--profile needs --compare OTHER (it compares each layer with its factor pair)")
        for provider, result in results["providers"].items():
            result["profile"] = b.profile_layers(model_path, compare_path, feeds, provider, threads=threads)
    if table_path:
        from onnxlr.timing import latency

        provider = runtime.parse_providers(split_list(providers))[0]
        results["latency_table"] = latency.export_table(loaded.model, {n: a.shape for n, a in feeds.items()},
                                                        table_path, provider, threads, state.progress)
        state.console.print(f"wrote the latency table {table_path}: {results['latency_table']['entries']} times of "
                            f"{results['latency_table']['layers']} layers on {provider} ({threads} thread(s))")
    if json_path:
        write_json(results, json_path)
    print_bench(results, state.console)
    if "targets" in results:
        print_estimates(results["targets"], state.console)


# ----------------------------------------------------------------------------- analyze

EXAMPLES_ANALYZE = """
\b
Examples:
  onnxlr analyze model.onnx
  onnxlr analyze model.onnx --energy 0.99 --json spectra.json --html spectra.html
  onnxlr analyze model.onnx --param-budget 0.5
  onnxlr analyze model.onnx --calibration calib.npz --html spectra.html
"""


@cli.command(epilog=EXAMPLES_ANALYZE)
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=True))
@click.option("--energy", type=FRACTION, default=None, metavar="E",
              help="Plan ranks keeping fraction E of the squared singular values (default 0.95); also the "
                   "level at which a layer counts as compressible.")
@click.option("--param-budget", type=FRACTION, default=None, metavar="P",
              help="Plan ranks as optimize --param-budget P instead (the factorizable layers keep <= P of their parameters).")
@calibration_options
@click.option("--ops", default=None, metavar="LIST",
              help="Op types to analyze, as optimize --ops (default: optimize's; add Gather for embedding tables).")
@click.option("--power-law/--no-power-law", default=True, show_default=True,
              help="Fit the heavy-tail exponent alpha of each weight's eigenvalues (WeightWatcher-style).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.json",
              help="Write every statistic (spectra included) and the recommendation as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.html",
              help="Write one self-contained page with a spectrum and an energy plot per layer.")
@verbosity_options
@click.pass_obj
def analyze(state: State, model_path: str, energy: float | None, param_budget: float | None,
            calibration_path: str | None, calibration_samples: int | None, ops: str | None, power_law: bool,
            json_path: str | None, html_path: str | None) -> None:
    """Show how compressible each MatMul/Gemm/Conv weight of MODEL is, before choosing ranks.

    Per layer and view: full rank, ranks keeping 90/95/99% of the energy, effective and stable
    rank, break-even rank, the heavy-tail exponent alpha; then the `onnxlr optimize` command that
    applies the plan for --energy (default 0.95) or --param-budget.
    """
    from onnxlr import analyze as a
    from onnxlr.model_io.folders import model_path as model_in
    from onnxlr.render.html_analyze import write_html
    from onnxlr.render.report import print_analysis, write_json

    model_path = model_in(model_path)
    if energy is not None and param_budget is not None:
        raise OnnxlrError("choose --energy or --param-budget, not both")
    loaded = io.load(model_path)
    statistics = _calibrate(model_path, loaded, calibration_path, calibration_samples, batch_size=16)
    result = a.analyze_model(loaded.model, model_path=model_path, energy=energy, param_budget=param_budget,
                             statistics=statistics, calibration_path=calibration_path, power_law=power_law,
                             progress=state.progress, ops=split_ops(ops) if ops else None)
    if json_path:
        write_json(result, json_path)
    if html_path:
        write_html(result, html_path)
    print_analysis(result, state.console)


# ----------------------------------------------------------------------------- entry point


def _raise_interrupt(signum: int, frame: Any) -> None:
    # SIGTERM behaves like Ctrl-C, so temporary files are cleaned up by the same `finally` blocks.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    cli.main(args=list(argv) if argv is not None else None, prog_name="onnxlr")


__all__ = ["cli", "main"]
