"""SHA-256 digests of the models `onnxlr optimize` writes, over a fixed matrix of runs.

What it is for: proving that a refactor (or any change meant to keep behaviour) leaves every
written model byte-identical. Record the digests with the old code, then with the new code, and
compare:

    PYTHONPATH=/path/to/old/tree python scripts/output_digests.py --json base.json
    python scripts/output_digests.py --compare base.json          # exit 1 and the list on any difference

Each case runs `[sys.executable, "-m", "onnxlr", "optimize", MODEL, model-lr.onnx, --report ...,
FLAGS]` as a subprocess, with this process's environment (relative PYTHONPATH entries made
absolute), in its own empty temporary folder as working directory. So the caller's PYTHONPATH
decides which onnxlr is imported, never the repository the script happens to sit in (`-m` puts the
working directory first on sys.path); the module actually imported is printed first. For each case
it records the exit code and the sha256 of every file the run wrote into that folder (the model,
its external-data file when there is one, and anything left behind); the JSON report goes outside
that folder and is not hashed. --workers cases (default 2) run side by side; what onnxlr writes does
not depend on that (BLAS runs one thread per SVD, onnxruntime's thread count is fixed), and the
results are printed and stored in matrix order. The whole matrix takes about 5 minutes on 2 cores.

The matrix covers the digits CNN and MiniLM reference models and every synthetic model found under
CACHE/synthetic/ (`python -m models build digits-cnn|minilm|synthetic` builds them): each rank
policy, --rank-multiple, --min-params, --exclude/--include, --conv-scheme (conv models), --svd,
--jobs 1/2, --external-data, calibration (alone, with budgets, --compensate,
--calibration-samples, --target-cosine/--target-error), and a few runs with verification on (it
does not change the bytes; the other runs use --no-verify for speed). A case may legitimately end
with a non-zero exit code (2 for an infeasible budget, 1 for a failed gate); that is recorded like
any other result. Cases in one "same-bytes" group (--jobs 1 / --jobs 2 / default jobs, verify on
and off, --external-data and a low --external-data-threshold) must produce identical files; a mismatch is reported and makes the exit code 1.

The JSON (--json) maps case name -> {"rc": exit code, "files": {filename: sha256}}.
Exit codes: 0 all cases ran (and, with --compare, match); 1 a difference or a same-bytes group
mismatch; 2 bad usage or missing models.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / ".cache" / "models"
OUTPUT_NAME = "model-lr.onnx"
REPORT_NAME = "report.json"
TIMEOUT_RC = "timeout"


@dataclass
class Case:
    name: str
    model: Path
    args: list[str]
    group: str | None = None  # cases of one group must write identical files (README promises it)
    verify: bool = False  # False: --no-verify is appended

    def command(self, report: Path | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "onnxlr", "optimize", str(self.model), OUTPUT_NAME]
        if report is not None:
            cmd += ["--report", str(report)]
        cmd += self.args
        if not self.verify:
            cmd.append("--no-verify")
        return cmd


@dataclass
class ModelInfo:
    key: str  # case-name prefix, e.g. "digits-cnn" or "synthetic/mlp"
    path: Path
    node_names: list[str] = field(default_factory=list)  # MatMul/Gemm/Conv nodes, graph order
    has_conv: bool = False
    calib: Path | None = None
    eval: Path | None = None


# ----------------------------------------------------------------------------- the matrix


def inspect_model(key: str, path: Path) -> ModelInfo:
    import onnx  # only to name nodes and detect convs; never onnxlr, whose version is under test

    model = onnx.load(str(path), load_external_data=False)
    targets = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    info = ModelInfo(key, path, [n.name for n in targets], any(n.op_type == "Conv" for n in targets))
    for attr, filename in (("calib", "calib.npz"), ("eval", "eval.npz")):
        if (path.parent / filename).is_file():
            setattr(info, attr, path.parent / filename)
    return info


def common_cases(m: ModelInfo, exclude: list[str], ops: list[str] | None = None) -> list[Case]:
    """Rank policies and other plain (no calibration) flags, all with --no-verify.

    `ops`, when given, is added to the cases marked below (MiniLM: --ops MatMul on some runs, the
    default ops on the others)."""
    o = ops or []
    k, p = m.key, m.path
    cases = [
        Case(f"{k}/default", p, [], group=f"{k}/default"),
        Case(f"{k}/rank-ratio-0.5", p, [*o, "--rank-ratio", "0.5"]),
        Case(f"{k}/rank-8", p, ["--rank", "8"]),
        Case(f"{k}/energy-0.9", p, [*o, "--energy", "0.9"]),
        Case(f"{k}/param-ratio-0.5", p, ["--param-ratio", "0.5"]),
        Case(f"{k}/param-budget-0.6", p, [*o, "--param-budget", "0.6"], group=f"{k}/param-budget-0.6"),
        Case(f"{k}/mac-budget-0.5", p, ["--mac-budget", "0.5"]),
        Case(f"{k}/rank-multiple-8", p, [*o, "--rank-multiple", "8"]),
        Case(f"{k}/min-params-4096", p, ["--min-params", "4096"], group=f"{k}/min-params-4096"),
        Case(f"{k}/exclude", p, [arg for glob in exclude for arg in ("--exclude", glob)]),
        Case(f"{k}/svd-exact", p, ["--svd", "exact"]),
        Case(f"{k}/svd-randomized", p, [*o, "--svd", "randomized"]),
        Case(f"{k}/jobs-1", p, ["--jobs", "1"], group=f"{k}/default"),
        Case(f"{k}/jobs-2", p, ["--jobs", "2"], group=f"{k}/default"),
        Case(f"{k}/param-budget-0.6-jobs-1", p, [*o, "--param-budget", "0.6", "--jobs", "1"],
             group=f"{k}/param-budget-0.6"),
        Case(f"{k}/param-budget-0.6-jobs-2", p, [*o, "--param-budget", "0.6", "--jobs", "2"],
             group=f"{k}/param-budget-0.6"),
        Case(f"{k}/external-data", p, ["--external-data"], group=f"{k}/external-data"),
    ]
    if o:
        cases.append(Case(f"{k}/ops-{'-'.join(o[1:]).replace(',', '-')}", p, o))
    if m.has_conv:
        cases += [Case(f"{k}/conv-scheme-{s}", p, ["--conv-scheme", s]) for s in ("input", "output", "spatial")]
    return cases


CALIBRATION_VARIANTS = ("calib", "jobs", "samples-64", "param-budget-0.7", "mac-budget-0.6", "compensate",
                        "target-cosine-0.95", "target-error-0.2")


def calibration_cases(m: ModelInfo, variants: tuple[str, ...] = CALIBRATION_VARIANTS, extra: list[str] | None = None,
                      tag: str = "calib") -> list[Case]:
    """--calibration alone ("calib") and with the data-aware options; `extra` goes into every case.

    "jobs" adds --jobs 1 and --jobs 2 twins of "calib" (same bytes)."""
    if m.calib is None:
        return []
    k, p = m.key, m.path
    cal = ["--calibration", str(m.calib), *(extra or [])]
    heldout = ["--inputs", str(m.eval)] if m.eval is not None else None
    options = {
        "calib": [],
        "samples-64": ["--calibration-samples", "64"],
        "param-budget-0.7": ["--param-budget", "0.7"],
        "mac-budget-0.6": ["--mac-budget", "0.6"],
        "compensate": ["--compensate"],
        "target-cosine-0.95": ["--target-cosine", "0.95", *heldout] if heldout else None,
        "target-error-0.2": ["--target-error", "0.2", *heldout] if heldout else None,
    }
    cases = []
    for variant in variants:
        if variant == "jobs":
            cases += [Case(f"{k}/{tag}-jobs-{n}", p, [*cal, "--jobs", str(n)], group=f"{k}/{tag}") for n in (1, 2)]
        elif options[variant] is not None:
            name = tag if variant == "calib" else f"{tag}-{variant}"
            group = f"{k}/{tag}" if variant == "calib" and "jobs" in variants else None
            cases.append(Case(f"{k}/{name}", p, [*cal, *options[variant]], group=group))
    return cases


def generic_exclude(m: ModelInfo) -> list[str]:
    """A glob on the first target's name prefix (before the first '.' or '/'), e.g. 'layer0*'."""
    for name in m.node_names:
        prefix = re.split(r"[./]", name.lstrip("/"), maxsplit=1)[0]
        if prefix:
            return [("/" if name.startswith("/") else "") + prefix + "*"]
    return ["*no-such-node*"]


def build_cases(cache: Path) -> list[Case]:
    digits_path = cache / "digits-cnn" / "model.onnx"
    minilm_path = cache / "minilm" / "model.onnx"
    synthetic = sorted((cache / "synthetic").glob("**/*.onnx"))
    missing = [str(p) for p in (digits_path, minilm_path) if not p.is_file()]
    if not synthetic:
        missing.append(str(cache / "synthetic" / "*" / "*.onnx"))
    if missing:
        raise SystemExit(f"error: missing models: {', '.join(missing)}\n"
                         "build them with `python -m models build digits-cnn|minilm|synthetic` (or pass --cache)")
    cases: list[Case] = []

    # digits CNN (Conv + Gemm): everything, calibration in full, verification with a passing gate.
    d = inspect_model("digits-cnn", digits_path)
    cases += common_cases(d, exclude=["/0/*", "/1?/Gemm"])
    cases += calibration_cases(d)
    if d.eval is not None:
        cases.append(Case("digits-cnn/verify-min-params-4096", d.path,
                          ["--min-params", "4096", "--inputs", str(d.eval), "--min-cosine", "0.95"],
                          group="digits-cnn/min-params-4096", verify=True))

    # MiniLM (transformer, MatMul only): --ops MatMul on some cases, the default ops on the others.
    m = inspect_model("minilm", minilm_path)
    cases += common_cases(m, exclude=["*/intermediate/*"], ops=["--ops", "MatMul"])
    cases += [
        Case("minilm/include-layer-0", m.path, ["--include", "/bert/encoder/layer.0/*"]),
        Case("minilm/svd-randomized-param-ratio-0.5", m.path, ["--svd", "randomized", "--param-ratio", "0.5"]),
        Case("minilm/external-data-param-budget-0.5", m.path,
             ["--ops", "MatMul", "--external-data", "--param-budget", "0.5"]),
        Case("minilm/external-data-threshold-1MB", m.path, ["--external-data-threshold", "1MB"],
             group="minilm/external-data"),
        # Verification on, no default gate: MiniLM at the default --rank-ratio 0.25 without calibration keeps cosine
        # 0.35, so the default gate (rightly) writes nothing, and the case would compare no bytes.
        Case("minilm/verify-default", m.path, ["--no-gate"], group="minilm/default", verify=True),
    ]
    if m.calib is not None:
        # The slow ones (sensitivity probes and compensation stages run the whole model): 64 samples
        # everywhere, and the budget and compensation only on the last encoder block.
        cases += calibration_cases(m, ("samples-64",), ["--ops", "MatMul"])
        cases += calibration_cases(m, ("param-budget-0.7", "compensate"),
                                   ["--ops", "MatMul", "--calibration-samples", "64",
                                    "--include", "/bert/encoder/layer.5/*"], tag="calib64-layer5")

    # Every synthetic model: synthetic/NAME/model.onnx is "synthetic/NAME", synthetic/X/Y.onnx "synthetic/X/Y".
    def synthetic_key(path: Path) -> str:
        rel = path.relative_to(cache).with_suffix("")
        return (rel.parent if rel.name == "model" else rel).as_posix()

    for path in synthetic:
        key = synthetic_key(path)
        s = inspect_model(key, path)
        cases += common_cases(s, exclude=generic_exclude(s))
        cases.append(Case(f"{key}/allow-no-gain-full-rank", path, ["--rank-ratio", "1", "--allow-no-gain"]))
        cases += calibration_cases(s, ("calib", "param-budget-0.7", "compensate", "target-cosine-0.95",
                                       "target-error-0.2"))
    # A failing verification gate: exit code 1, nothing written.
    mlp = [p for p in synthetic if "mlp" in synthetic_key(p)]
    if mlp:
        cases.append(Case(f"{synthetic_key(mlp[0])}/verify-gate-fails", mlp[0], ["--rank", "1", "--min-cosine", "0.9999"], verify=True))

    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"duplicate case names: {duplicates}"
    return cases


# ----------------------------------------------------------------------------- running


def child_env() -> dict[str, str]:
    """This process's environment, with PYTHONPATH entries made absolute (the children run elsewhere)."""
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(entry or os.curdir) for entry in env["PYTHONPATH"].split(os.pathsep))
    return env


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = "<symlink>"
        elif path.is_dir():
            if not any(path.iterdir()):
                out[rel + "/"] = "<empty dir>"
        else:
            out[rel] = sha256(path)
    return out


def which_onnxlr(env: dict[str, str], work: Path) -> str:
    probe = work / "_probe"
    probe.mkdir()
    code = "import onnxlr, onnxlr.passes; print(onnxlr.__file__); print(onnxlr.passes.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=probe, env=env, capture_output=True, text=True)
    shutil.rmtree(probe)
    if r.returncode != 0:
        raise SystemExit(f"error: the child interpreter cannot import onnxlr:\n{r.stderr.strip()}")
    return ", ".join(r.stdout.split())


def run_case(case: Case, work: Path, env: dict[str, str], timeout: float) -> tuple[dict, float, float, str]:
    """-> ({"rc", "files"}, wall seconds, CPU seconds of the child, last stderr line when rc != 0)."""
    case_dir = work / re.sub(r"[^A-Za-z0-9_.-]+", "_", case.name)
    out_dir = case_dir / "out"
    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    with open(case_dir / "stdout.txt", "wb") as stdout, open(case_dir / "stderr.txt", "wb") as stderr:
        proc = subprocess.Popen(case.command(case_dir / REPORT_NAME), cwd=out_dir, env=env,
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own CPU time, whatever runs beside it
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    rc: int | str = proc.returncode
    if rc < 0 and wall >= timeout:
        rc = TIMEOUT_RC
    message = ""
    if rc != 0:
        lines = [line for name in ("stderr.txt", "stdout.txt")
                 for line in (case_dir / name).read_text(errors="replace").strip().splitlines()]
        message = f"timed out after {timeout:g} s" if rc == TIMEOUT_RC else (lines[-1] if lines else "")
    return {"rc": rc, "files": digests(out_dir)}, wall, usage.ru_utime + usage.ru_stime, message


# ----------------------------------------------------------------------------- checks and output


def group_mismatches(cases: list[Case], results: dict[str, dict]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for case in cases:
        if case.group and case.name in results:
            groups.setdefault(case.group, []).append(case.name)
    problems = []
    for group, names in groups.items():
        first = results[names[0]]
        for name in names[1:]:
            if results[name] != first:
                problems.append(f"same-bytes group {group}: {name} differs from {names[0]} "
                                f"({describe(first, results[name]) or 'rc'})")
    return problems


def describe(a: dict, b: dict) -> str:
    """What differs between two results (a: expected, b: actual)."""
    parts = []
    if a.get("rc") != b.get("rc"):
        parts.append(f"rc {a.get('rc')} -> {b.get('rc')}")
    fa, fb = a.get("files", {}), b.get("files", {})
    for name in sorted(set(fa) | set(fb)):
        if name not in fb:
            parts.append(f"{name} missing")
        elif name not in fa:
            parts.append(f"{name} new")
        elif fa[name] != fb[name]:
            parts.append(f"{name} {fa[name][:12]} -> {fb[name][:12]}")
    return "; ".join(parts)


def compare(results: dict[str, dict], other: dict[str, dict], selected) -> list[str]:
    diffs = []
    for name, result in results.items():
        if name not in other:
            diffs.append(f"{name}: not in the other JSON")
        elif other[name] != result:
            diffs.append(f"{name}: {describe(other[name], result)}")
    for name in other:
        if name not in results and selected(name):
            diffs.append(f"{name}: in the other JSON, not in this run")
    return diffs


def short_files(files: dict[str, str]) -> str:
    return " ".join(f"{name}={digest[:12]}" for name, digest in files.items()) or "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Runs `python -m onnxlr optimize` over a fixed matrix "
        "(the onnxlr imported is the caller's PYTHONPATH's) and records each case's exit code and "
        "the sha256 of each file written.",
        epilog="example: PYTHONPATH=/tmp/base python scripts/output_digests.py --json base.json; "
               "then python scripts/output_digests.py --compare base.json",
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="folder of the reference models (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write {case: {rc, files}} here")
    parser.add_argument("--compare", type=Path, metavar="OTHER.json",
                        help="compare with a previous --json; exit 1 listing every difference")
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="run only the cases whose name contains SUBSTRING (repeatable: any of them; "
                             "a SUBSTRING with * or ? is a glob on the whole name)")
    parser.add_argument("--list", action="store_true", help="print the cases and their commands; run nothing")
    parser.add_argument("--timeout", type=float, default=900, metavar="S",
                        help="per-case limit in seconds, recorded as rc 'timeout' (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="cases run at once (default: %(default)s; the bytes do not depend on it)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with every output")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")

    def selected(name: str) -> bool:
        if not args.only:
            return True
        return any(fnmatch.fnmatchcase(name, s) if any(c in s for c in "*?[") else s in name for s in args.only)

    other = None
    if args.compare is not None:
        try:
            other = json.loads(args.compare.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--compare {args.compare}: {exc}")

    cases = [c for c in build_cases(args.cache.resolve()) if selected(c.name)]
    if not cases:
        parser.error("no case matches --only")
    if args.list:
        for case in cases:
            group = f"  [same bytes: {case.group}]" if case.group else ""
            print(f"{case.name}{group}\n    {shlex.join(case.command())}")
        print(f"{len(cases)} cases")
        return 0

    env = child_env()
    work = Path(tempfile.mkdtemp(prefix="onnxlr-digests-"))
    results: dict[str, dict] = {}
    try:
        print(f"onnxlr under test: {which_onnxlr(env, work)}")
        print(f"python: {sys.executable}; PYTHONPATH={env.get('PYTHONPATH', '')}")
        print(f"{len(cases)} cases, outputs in {work}\n", flush=True)
        width = max(len(c.name) for c in cases)
        print(f"{'case':<{width}}  {'rc':>7}  {'wall s':>7}  {'cpu s':>7}  files (sha256, first 12)")
        total_start = time.perf_counter()
        total_cpu = 0.0
        # Cases run side by side (--workers); results are printed and stored in matrix order.
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            runs = pool.map(lambda case: run_case(case, work, env, args.timeout), cases)
            for case, (result, wall, cpu, message) in zip(cases, runs):
                results[case.name] = result
                total_cpu += cpu
                line = f"{case.name:<{width}}  {result['rc']!s:>7}  {wall:7.1f}  {cpu:7.1f}  {short_files(result['files'])}"
                if message:
                    line += f"  [{message[:160]}]"
                print(line, flush=True)
        total_wall = time.perf_counter() - total_start
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    failed = {n: r["rc"] for n, r in results.items() if r["rc"] != 0}
    print(f"\n{len(results)} cases in {total_wall:.1f} s wall, {total_cpu:.1f} s CPU (children); "
          f"non-zero exit codes: {', '.join(f'{n}={rc}' for n, rc in failed.items()) or 'none'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")

    status = 0
    problems = group_mismatches(cases, results)
    for problem in problems:
        print(f"MISMATCH {problem}")
    if problems:
        status = 1
    if other is not None:
        diffs = compare(results, other, selected)
        if diffs:
            print(f"\n{len(diffs)} difference(s) against {args.compare}:")
            for diff in diffs:
                print(f"  {diff}")
            status = 1
        else:
            print(f"all {len(results)} cases identical to {args.compare}")
    return status


if __name__ == "__main__":
    sys.exit(main())
