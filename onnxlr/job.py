"""One `onnxlr optimize` job, start to end, as a library call: what the CLI and `onnxlr.optimize` both run.

    load -> check the output path -> plan memory (onnxlr.verification.memory_plan) -> factorize (onnxlr.factorize.pipeline: targets,
    calibration statistics, plan, rewrite, quantize) -> write, staged (onnxlr.model_io.save) -> verify, whole or in
    segments -> gate -> speed check -> move into place

Each stage takes its own settings (`Settings` for the factorization, `VerifySettings`, `OutputSettings`) and
returns its own result; `run` returns an `Outcome`. A failed gate raises `GateFailed` carrying the report (the CLI
still writes it: it says why), and nothing is written, unless `VerifySettings.keep_failed`. Without an output path
(the Python API returning a model) the verified file is a temporary one, removed afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxlr.errors import GateFailed, OnnxlrError
from onnxlr.factorize.pipeline import optimize_loaded
from onnxlr.factorize.results import Report
from onnxlr.model_io import folders
from onnxlr.model_io.io import LoadedModel, first_line, load
from onnxlr.model_io.save import PROTOBUF_LIMIT_BYTES, check_output_path, staging, use_external_data
from onnxlr.model_io.text import TextOptions
from onnxlr.protocols import WeightSink
from onnxlr.settings import Progress, Settings, check_setting, setting, split_list
from onnxlr.verification.memory_plan import MemoryPlan, check_memory

logger = logging.getLogger(__name__)

# What a failed gate suggests, with the settings it names ({0}...: the API's keywords, the CLI's flags).
GATE_ADVICE = ("Nothing written. To keep more of the model: a higher {0} or {1}, {2} data (with {3} to search the "
               "size), or {4} for sensitive layers; {5} writes it anyway")
GATE_ADVICE_SETTINGS = ("rank_ratio", "energy", "calibration", "target_cosine", "exclude", "keep_failed")


def _providers(text: str) -> tuple[str, ...] | None:
    return split_list(text) or None  # None: the default providers


def _shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    from onnxlr.model_io.inputs import parse_shape_overrides

    return parse_shape_overrides(items)


@dataclasses.dataclass(frozen=True)
class VerifySettings:
    """How the result is checked against the input with onnxruntime: the CLI's verification options, declared here
    once (onnxlr.settings.setting) and generated from these fields (onnxlr.cli.options.settings_options)."""

    enabled: bool = setting(True, "", "", kind="bool")  # --verify/--no-verify
    providers: tuple[str, ...] | None = setting(
        None, "Execution providers, comma-separated (cpu, cuda, ...). Default: cpu, plus cuda when onnxruntime-gpu is "
        "installed and a GPU is visible.", "verification", metavar="LIST", parse=_providers)
    inputs: str | os.PathLike | None = setting(
        None, "Inputs keyed by input name, samples along the first axis (or text with --tokenizer: a .txt or .jsonl "
        "file; or a folder of images, see --image-spec). Default: synthesized.", "verification", metavar="FILE.npz",
        path="any")
    input_shapes: Mapping[str, tuple[int, ...]] = setting(
        {}, "Fix an input's dynamic dims, e.g. input_ids:1x128 (repeatable): for synthesized inputs and, in optimize, "
        "for the MAC/FLOP counts.", "verification", flag="--shape", metavar="NAME:DIMS", multiple=True,
        parse=_shapes, show_default=False)
    seed: int = setting(0, "Seed of synthesized inputs.", "verification", kind="int")
    samples: int = setting(8, "Batch dimension of synthesized inputs.", "verification", kind="count")
    batch_size: int = setting(16, "Samples per onnxruntime run.", "verification", kind="count")
    atol: float | None = setting(None, "Gate: every element within atol + rtol x |reference|.", "verification",
                                 kind="number", bounds=(0, math.inf))
    rtol: float | None = setting(None, "Gate: see --atol.", "verification", kind="number", bounds=(0, math.inf))
    min_cosine: float | None = setting(
        None, "Gate: cosine similarity of each float output to the reference (integer and boolean outputs: the share of "
        "elements exactly equal). Without --atol/--rtol/--min-cosine the default gate is --min-cosine 0.99, or a "
        "--target-* run's goal.",
        "verification", kind="number", bounds=(-1, 1))
    labels: str | os.PathLike | None = setting(
        None, "The class of each --inputs sample, in order (.npy, .npz with one array or a 'labels' array, or .txt with "
        "one integer a line): score outputs report the accuracy of both models on them (--min-metric accuracy=A "
        "gates the candidate's).", "verification", metavar="FILE", path="existing")
    pairs: str | os.PathLike | None = setting(
        None, "Scored sentence pairs (.tsv: sentence1, sentence2 and score a line; or .jsonl with those fields), "
        "tokenized like text inputs: embedding outputs report the Spearman correlation of each model's cosine "
        "similarities with the scores (--min-metric spearman=S gates the candidate's).", "verification",
        metavar="FILE.tsv", path="existing")
    min_metric: tuple[str, ...] = setting(
        (), "Gate on a task metric, NAME=VALUE (repeatable): top1 (argmax agreement of score outputs), neighbours "
        "(neighbour agreement of embedding outputs: the share of each sample's 5 nearest samples kept), "
        "sample_cosine (mean per-sample cosine), accuracy (with --labels), perplexity_kept (a language model's "
        "original / written next-token perplexity on the inputs), spearman (with --pairs). Given alone, it replaces "
        "the default gate.",
        "verification",
        metavar="NAME=VALUE", multiple=True, show_default=False)
    no_gate: bool = setting(False, "No default gate: outputs are compared and reported, but only "
                            "--atol/--rtol/--min-cosine (when given) and NaN/Inf the reference does not have can fail "
                            "the run.", "verification", kind="bool")
    per_layer: bool = setting(False, "Also compare the output of every factorized node.", "verification", kind="bool")
    min_layer_cosine: float | None = setting(
        None, "Gate: each factorized layer, run on the original layer's input, keeps at least this cosine to the "
        "original layer's output (the per-layer check, worst layers first; it always runs when the models are "
        "verified in segments).", "verification", kind="number", bounds=(-1, 1))
    keep_failed: bool = setting(False, "Write the model even when a verification gate fails (exit 1).", "keep",
                                kind="bool")

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shapes", {name: tuple(dims) for name, dims in
                                                  dict(self.input_shapes or {}).items()})
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "min_metric", tuple(self.min_metric))
        from onnxlr.verification.verify import parse_min_metrics

        parse_min_metrics(self.min_metric)  # a bad gate is refused before any work
        for field in dataclasses.fields(self):
            check_setting(field, getattr(self, field.name))

    def gates(self, goal: tuple[str, float] | None = None) -> Any:
        """The gates asked for; without any, the default gate: `goal` (metric, value), a --target-* run's, else
        cosine >= 0.99."""
        from onnxlr.verification.verify import Gates, parse_min_metrics

        return Gates.chosen(atol=self.atol, rtol=self.rtol, min_cosine=self.min_cosine, default_gate=not self.no_gate,
                            min_metrics=parse_min_metrics(self.min_metric), goal=goal)


@dataclasses.dataclass(frozen=True)
class OutputSettings:
    """Where and how the model is written (the CLI's OUTPUT and external-data flags)."""

    path: str | os.PathLike | None = None  # None: nothing written (the API returns the model)
    external_data: bool | None = None  # None: as the input, or when its weights exceed the threshold
    external_data_threshold: int = PROTOBUF_LIMIT_BYTES


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything one optimize run needs; `run(job)` does it."""

    source: Any  # a path, or an in-memory model (onnx.ModelProto, onnx_ir.Model, graphsurgeon Graph)
    settings: Settings
    verify: VerifySettings = dataclasses.field(default_factory=VerifySettings)
    output: OutputSettings = dataclasses.field(default_factory=OutputSettings)
    calibration: Any = None  # an .npz, a folder of them, or an iterable of input dicts
    calibration_samples: int | None = None
    heldout: Any = None  # what target_cosine / target_error measure; None: verify.inputs when calibrating
    dry_run: bool = False
    memory_check: bool = True  # stop early when verification or calibration cannot fit the memory available
    speed_check: bool = False  # time the written model against the input, end to end (the report's `speed`)
    edge_targets: bool = False  # the report's latency estimates on edge targets (onnxlr.timing.edge)
    targets_file: str | os.PathLike | None = None  # extra edge targets (implies edge_targets)
    progress: Progress | None = None
    text: TextOptions = dataclasses.field(default_factory=TextOptions)  # .txt/.jsonl data: its tokenizer and length
    image_spec: str | None = None  # image folders: how images become the input (onnxlr.model_io.images)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a job did: the rewritten model (its loaded form), the report (verification included) and where it was
    written; `failure` says which gate failed when `keep_failed` kept the model anyway."""

    loaded: LoadedModel
    report: Report
    memory: MemoryPlan
    written: Path | None = None
    failure: str | None = None


def run(job: Job) -> Outcome:
    """Run the whole optimize job (module doc); raises OnnxlrError for bad input, GateFailed for a failed gate."""
    if job.heldout is not None and job.calibration is None:
        raise OnnxlrError("{0} samples are only used with {1} data (target_cosine)", "heldout", "calibration")
    if folders.is_folder(job.source):
        return _run_folder(job, folders.find(job.source))
    loaded = load(job.source)
    with tempfile.TemporaryDirectory(prefix="onnxlr-data-") as folder:  # text and images, as arrays, live here
        resolved, built = with_data_resolved(job, loaded, Path(folder))
        return _run(resolved, loaded, built)


def _run_folder(job: Job, folder: folders.ModelFolder) -> Outcome:
    """An exported model folder (onnxlr.model_io.folders): its model optimized with its tokenizer and longest sequence
    (unless the job names them), written as a new folder with every other file copied beside it."""
    inner = dataclasses.replace(job, source=folder.model_path, text=_folder_text(job.text, folder))
    if job.output.path is None or job.dry_run:
        outcome = run(dataclasses.replace(inner, output=dataclasses.replace(job.output, path=None)))
        outcome.report.folder = folder.to_json()
        return outcome
    output = folders.check_output_folder(job.output.path, folder)
    with folders.staged_folder(output) as stage:
        (stage / folder.model).parent.mkdir(parents=True, exist_ok=True)
        try:
            outcome = run(dataclasses.replace(inner, output=dataclasses.replace(job.output, path=stage / folder.model)))
        except GateFailed as exc:  # its report says what the folder gave the run too
            if exc.report is not None:
                exc.report.folder = folder.to_json()
            raise
        copied = folders.copy_others(folder, outcome.loaded.external_files, stage)
    outcome.report.output = str(output / folder.model)
    outcome.report.folder = {**folder.to_json(), "output": str(output), "copied": copied}
    return dataclasses.replace(outcome, written=output / folder.model)


def _folder_text(text: TextOptions, folder: folders.ModelFolder) -> TextOptions:
    """`text` with an exported folder's tokenizer and sequence limit where it names none."""
    return dataclasses.replace(text, tokenizer=text.tokenizer or folder.tokenizer,
                               max_length=text.max_length or folder.max_length)


def with_data_resolved(job: Job, loaded: LoadedModel, folder: Path) -> tuple[Job, list[dict[str, Any]]]:
    """The job with its data in the forms the stages read, and what was built (the report's `data`):
    - each .txt/.jsonl file (calibration, held-out, verification inputs) tokenized for the model into an .npz in
      `folder` (onnxlr.model_io.text); text calibration with no held-out data or --inputs gives its last fifth to
      verification (and to the --target-* search);
    - each folder of images decoded and preprocessed (`image_spec`, onnxlr.model_io.images) into an .npz there;
    - `module:function` calibration: the input dicts the function yields."""
    from onnxlr.model_io import images, inputs, text

    built: dict[str, Path] = {}
    figures: list[dict[str, Any]] = []

    def saved(made: text.Tokenized | images.Decoded, key: str) -> Path:
        figures.append({"file": key, "samples": made.samples, "inputs": list(made.feeds),
                        "description": made.describe()})
        return text.save(made.feeds, folder)

    def npz(path: Any) -> Any:
        if not text.is_text(path) and not images.is_image_folder(path):
            return path
        key = os.fspath(path)
        if key not in built:
            made = (text.tokenized_file(path, loaded.model, job.text) if text.is_text(path)
                    else images.decode_folder(path, loaded.model, images.parse_spec(job.image_spec)))
            built[key] = saved(made, key)
        return built[key]

    calibration, heldout, checked = job.calibration, job.heldout, job.verify.inputs
    if text.is_text(calibration) and heldout is None and checked is None:
        tokenized = text.tokenized_file(calibration, loaded.model, job.text)
        # without a goal, only to verify on: not for a dry run, nor from one text (synthesized inputs then)
        if job.settings.goal is not None or (tokenized.samples > 1 and not job.dry_run):
            purpose = "the search and verification" if job.settings.goal is not None else "verification"
            kept, held = text.carve(tokenized, purpose=purpose)
            calibration, heldout = saved(kept, os.fspath(calibration)), saved(held, os.fspath(calibration))
            checked = heldout
    if inputs.is_callable_source(calibration):
        dicts = inputs.callable_source(calibration)
        figures.append({"file": calibration, "samples": len(dicts),
                        "description": f"{calibration}: {len(dicts)} input dicts"})
        calibration = dicts
    return dataclasses.replace(job, calibration=npz(calibration), heldout=npz(heldout),
                               verify=dataclasses.replace(job.verify, inputs=npz(checked))), figures


def _run(job: Job, loaded: LoadedModel, built: list[dict[str, Any]]) -> Outcome:
    from onnxlr.model_io.inputs import batch_shapes

    settings, checks, output = job.settings, job.verify, job.output
    input_shapes = dict(checks.input_shapes)
    if settings.objective == "latency" and not input_shapes and job.calibration is None and checks.inputs:
        input_shapes = batch_shapes(os.fspath(checks.inputs), loaded.model, checks.batch_size)
    if output.path is not None and not job.dry_run:
        check_output_path(output.path, loaded)
    verifying = checks.enabled and not job.dry_run
    memory = MemoryPlan()
    if job.memory_check:
        memory = check_memory(loaded, input_shapes, batch_size=checks.batch_size, samples=checks.samples,
                              inputs_given=bool(checks.inputs), verifying=verifying,
                              calibration=(job.calibration, job.calibration_samples)
                              if isinstance(job.calibration, (str, os.PathLike)) else None, config=settings)
    edge_targets = _edge_targets(loaded, job)
    heldout = job.heldout if job.heldout is not None else (checks.inputs if job.calibration is not None else None)

    def factorize(sink: WeightSink | None) -> Report:
        # memory.calibration_batches: the calibration file, already read by the memory check
        calibration = memory.calibration_batches or job.calibration
        result = optimize_loaded(loaded, settings, source=job.source, calibration=calibration,
                                 calibration_samples=job.calibration_samples, heldout=heldout,
                                 batch_size=checks.batch_size, progress=job.progress, dry_run=job.dry_run,
                                 input_shapes=input_shapes, sink=sink,
                                 calibration_segment_budget=memory.calibration_segment_budget)
        report = result.report
        report.data = built or None
        if isinstance(job.source, (str, os.PathLike)):
            report.input = str(job.source)
        if edge_targets:
            from onnxlr.timing import edge

            targets, precision = edge_targets
            assert result.costs_after is not None  # estimates are made only for a model written
            report.targets = edge.before_after(result.costs_before, result.costs_after, targets, precision)
        return report

    if job.dry_run:
        return Outcome(loaded=loaded, report=factorize(sink=None), memory=memory)
    if output.path is None:
        return _run_in_memory(job, loaded, factorize, memory, input_shapes)
    external = use_external_data(loaded.model, loaded, output.external_data, output.external_data_threshold)
    # The temporary output exists before the rewrite: with external data each layer's factors are
    # written there as soon as they are computed (memory stays near one layer's working set).
    with staging(output.path, source=loaded, external_data=external) as stage:
        report = factorize(sink=stage.data)
        staged = stage.write_model(loaded.model)
        failure = _check_written(job, loaded, staged, report, memory, input_shapes)
    report.output = str(output.path)
    return Outcome(loaded=loaded, report=report, memory=memory, written=Path(output.path), failure=failure)


def _run_in_memory(job: Job, loaded: LoadedModel, factorize: Any, memory: MemoryPlan,
                   input_shapes: Mapping[str, Sequence[int]]) -> Outcome:
    """No output path: the factors stay in memory (the caller gets the model), and verification and the speed check
    read a temporary copy of it, removed afterwards."""
    report = factorize(sink=None)
    failure = None
    if job.verify.enabled or job.speed_check:
        with tempfile.TemporaryDirectory(prefix="onnxlr-") as folder:
            external = use_external_data(loaded.model, loaded, job.output.external_data,
                                         job.output.external_data_threshold)
            with staging(Path(folder) / "model.onnx", source=loaded, external_data=external) as stage:
                staged = stage.write_model(loaded.model)
                failure = _check_written(job, loaded, staged, report, memory, input_shapes)
    return Outcome(loaded=loaded, report=report, memory=memory, failure=failure)


def _check_written(job: Job, loaded: LoadedModel, staged: Path, report: Report, memory: MemoryPlan,
                   input_shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Verify the staged file, gate, and time it (the speed check). Raises GateFailed (with the report) unless
    keep_failed; returns the failure it kept, if any."""
    failure = None
    reference = _reference(loaded, job.source)
    if job.verify.enabled:
        # loaded.model (rewritten by now) has the original's inputs: the signature verification reads
        goal = job.settings.goal
        verification = verify_models(reference, staged, loaded.model, job.verify, memory.segment_budget, job.text,
                                     goal=(goal.metric, goal.value) if goal is not None else None)
        report.verification = verification
        if not verification.passed:
            failure = "verification failed: " + "; ".join(verification.failures)
            if not job.verify.keep_failed:
                raise GateFailed(failure + ". " + GATE_ADVICE, *GATE_ADVICE_SETTINGS, report=report)
    if job.speed_check and job.settings.objective != "latency" and memory.segment_budget is None:
        report.speed = _speed_check(reference, staged, loaded.model, job, input_shapes)
    return failure


def verify_files(reference: str | os.PathLike, candidate: str | os.PathLike, checks: VerifySettings,
                 text: TextOptions | None = None, image_spec: str | None = None, memory_check: bool = True) -> Any:
    """`onnxlr verify`: two model files (or exported model folders, onnxlr.model_io.folders) run and compared under
    `checks`, on inputs that may be text (tokenized with `text`'s tokenizer, else the reference folder's) or a folder
    of images (`image_spec`) as well as arrays; returns the VerificationResult."""
    text = text or TextOptions()
    if folders.is_folder(reference):
        text = _folder_text(text, folders.find(reference))
    reference, candidate = folders.model_path(reference), folders.model_path(candidate)
    loaded = load(reference)
    load(candidate)  # the same safety checks (external data inside its folder) before onnxruntime reads it
    with tempfile.TemporaryDirectory(prefix="onnxlr-data-") as scratch:
        job = Job(source=reference, settings=Settings(), verify=checks, text=text, image_spec=image_spec)
        checks = with_data_resolved(job, loaded, Path(scratch))[0].verify
        memory = MemoryPlan()
        if memory_check:
            memory = check_memory(loaded, dict(checks.input_shapes), batch_size=checks.batch_size,
                                  samples=checks.samples, inputs_given=bool(checks.inputs), verifying=True)
        return verify_models(reference, candidate, loaded.model, checks, memory.segment_budget, text)


def verify_models(reference: Any, candidate: Any, reference_model: Any, checks: VerifySettings,
                  segment_budget: int | None = None, text: TextOptions | None = None,
                  goal: tuple[str, float] | None = None) -> Any:
    """Run both models on onnxruntime and compare them under `checks`' gates; returns the VerificationResult.

    `reference`/`candidate`: paths (or serialized models); `reference_model` (onnx-ir) gives the input signature.
    `segment_budget` (bytes of weights, onnxlr.verification.memory_plan): run them in segments of at most that much.
    `text`: how the scored pairs (`checks.pairs`) are tokenized; `goal`: the run's --target-* (metric, value), the
    default gate when none is asked for."""
    # onnxruntime and numpy load only when a command verifies
    import numpy as np

    from onnxlr.model_io import inputs, synthesis
    from onnxlr.verification import runtime, verify

    providers = runtime.parse_providers(list(checks.providers) if checks.providers else None)
    specs = inputs.input_specs(reference_model)
    shapes = dict(checks.input_shapes)
    gates = checks.gates(goal)
    per_layer = verify.factorized_outputs(candidate) if checks.per_layer else []
    labels = inputs.load_labels(checks.labels) if checks.labels is not None else None
    if labels is not None and not checks.inputs:
        raise OnnxlrError("{0} are the classes of the {1} samples: give both", "labels", "inputs")
    pairs = None
    if checks.pairs is not None:
        from onnxlr.model_io.text import tokenized_pairs

        if segment_budget is not None:
            raise OnnxlrError("{0} are not measured when the models run in segments (too large for memory)", "pairs")
        pairs = tokenized_pairs(checks.pairs, reference_model, text or TextOptions())

    def compare(feeds: dict, synthesized: bool) -> Any:
        samples = min((len(array) for array in feeds.values() if np.ndim(array)), default=1)
        if labels is not None and len(labels) != samples:
            raise OnnxlrError(f"{{0}} holds {len(labels)} classes for {samples} {{1}} samples", "labels", "inputs")
        return verify.verify(reference, candidate, feeds, providers, gates, batch_size=checks.batch_size,
                             per_layer=per_layer, synthesized=synthesized, reference_model=reference_model,
                             segment_budget=segment_budget, min_layer_cosine=checks.min_layer_cosine,
                             labels=labels, pairs=pairs)

    if segment_budget is not None and not checks.inputs:
        # In segments a probe costs a whole pass over the weights: try the first synthesized shapes on the
        # reference itself, and probe only if it refuses them.
        guess = synthesis.unprobed_feeds(specs, checks.seed, checks.samples, shapes)
        if guess is not None:
            try:
                return compare(guess, synthesized=True)
            except verify.ReferenceFailed as exc:
                logger.info("the reference refuses the first synthesized shapes (%s); probing others", exc)
    # Synthesized inputs are sized by running the reference (never the candidate) on a probe.
    feeds = synthesis.model_feeds(reference, specs, checks.inputs, checks.seed, checks.samples, shapes,
                                  segment_budget)
    result = compare(feeds.arrays, feeds.synthesized)
    if segment_budget is None:
        _check_generation(result, reference, candidate, reference_model, specs, feeds.arrays)
    return result


def _check_generation(result: Any, reference: Any, candidate: Any, reference_model: Any, specs: Mapping[str, Any],
                      feeds: Mapping[str, Any]) -> None:
    """A decoder with a KV cache (onnxlr.verification.generation): greedy tokens through the cache must equal the
    uncached ones, for the written model (a failure) and the original (reported: its export's own fault)."""
    import numpy as np

    from onnxlr.verification import generation

    layout = generation.cache_layout(specs, [value.name for value in reference_model.graph.outputs])
    if layout is None:
        return
    ids = np.asarray(feeds[layout.ids])[:generation.PROMPTS]
    mask = (np.asarray(feeds[layout.mask])[:generation.PROMPTS, -ids.shape[1]:]
            if layout.mask is not None and layout.mask in feeds else None)
    prompts = [row[mask[index] != 0] if mask is not None else row for index, row in enumerate(ids)]
    prompts = [prompt for prompt in prompts if len(prompt)]
    result.generation = generation.check_generation({"original": reference, "written": candidate}, layout, prompts)
    if not result.generation["models"]["written"]["agree"]:
        result.passed = False
        result.failures.append(f"the written model's {generation.GENERATED_TOKENS} greedy tokens through its KV cache "
                               "differ from the same model's without it")


def _reference(loaded: LoadedModel, source: Any) -> Any:
    """What onnxruntime runs the original from: its path, else its serialized bytes (read again from the caller's
    object: the loaded model is rewritten by now)."""
    if isinstance(source, (str, os.PathLike)):
        return source
    from onnxlr.timing.confirm import session_source

    return session_source(load(source).model)


def _speed_check(reference: Any, staged: Path, model: Any, job: Job,
                 input_shapes: Mapping[str, Sequence[int]]) -> dict[str, Any] | None:
    """The written model against its input, end to end (the size objective's check; a warning when slower)."""
    from onnxlr.timing import confirm

    try:
        speed = confirm.written_speed(reference, staged, model, job.verify.inputs, input_shapes,
                                      job.verify.batch_size, job.settings.latency_provider,
                                      job.settings.latency_threads, seconds=1.0)
    except Exception as exc:  # inputs it cannot make, a model onnxruntime cannot run: verification says the rest
        logger.warning("end-to-end speed not measured: %s", first_line(exc))
        return None
    return speed.to_json()


def _edge_targets(loaded: LoadedModel, job: Job) -> tuple | None:
    """Edge targets and the original's precision, when the report asks for estimates."""
    if job.dry_run or not (job.edge_targets or job.targets_file):
        return None
    from onnxlr.timing import edge

    # Precision is read before the rewrite: the original's weights decide it.
    targets_file = Path(job.targets_file) if job.targets_file is not None else None
    return edge.load_targets(targets_file), edge.model_precision(loaded.model)
