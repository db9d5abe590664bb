"""Wall time and peak anonymous memory of `onnxlr optimize` next to the I/O floor, measured in one run.

    python scripts/bench_scale.py --json out/bench-scale.json
    python scripts/bench_scale.py --models llm-1b --jobs 2 --onnxlr-args "--svd exact"

For each model (built or reused with `python -m models build NAME` into the git-ignored .cache/):

  floor   a fresh Python process loads the model with onnx (external data included) and saves it
          again with onnx (external data when the input had it): the least any rewriting tool pays
          to read and write the same bytes.
  svd     with --svd-floor: a fresh Python process reads every MatMul/Gemm weight and decomposes it at
          the rank --rank-ratio 0.25 gives, with the solver onnxlr's default --svd auto picks (randomized
          for large matrices; before 2026-12-02 this floor took the exact SVD, far slower than what
          onnxlr runs), as many at once as the largest --jobs (one BLAS thread each, as
          onnxlr runs them): the least the SVDs themselves cost. Issue 19's
          target: onnxlr <= 1.25 x (floor + svd) on the 8B-parameter llm-8b, peak anonymous memory <= 2 GB:
              python scripts/bench_scale.py --models llm-8b --jobs 2 --verify --svd-floor
  onnxlr  `onnxlr optimize MODEL OUT --rank-ratio 0.25 --no-verify -q --jobs N` (plus --onnxlr-args)
          in its own process, once for each N of --jobs. With --verify, the default verification runs
          too (`--no-gate`: the reference models' weights are random); with $ONNXLR_MEMORY_LIMIT below
          what one whole model needs, it runs in segments (issue 19):
              ONNXLR_MEMORY_LIMIT=2.5GB python scripts/bench_scale.py --models llm-1b --jobs 2 --verify

With --calibration-samples N, onnxlr also calibrates on the first N samples of the model's calib.npz (random
token ids, 32 per sample): a model that does not fit whole beside its statistics is calibrated block by block, and
issue 19's memory target (<= 2 GB peak anonymous memory) applies:
              python scripts/bench_scale.py --models llm-8b --jobs 2 --verify --calibration-samples 8

Each is timed as a whole process (interpreter start-up and imports included) after a warm-up read of
the model's files, so all see the same page cache; onnxlr runs first, the floors after it. Peak anonymous memory is the largest
RssAnon of /proc/PID/status sampled every --interval seconds (heap, not the memory-mapped weights);
VmHWM (all resident memory, mapped files included) is reported too. Targets (issue 8): onnxlr's
wall time <= 3x the floor and peak anonymous memory <= 1 GB on the >= 0.8B-parameter model.
Outputs go to --work (removed afterwards unless --keep).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "models"
DEFAULT_MODELS = ("llm-1b", "digits-cnn", "minilm")
WALL_TARGET = 3.0  # x the floor
ANON_TARGET_BYTES = 10**9  # 1 GB
WALL_TARGET_WITH_SVD = 1.25  # x (floor + svd floor), issue 19
ANON_TARGET_VERIFIED_BYTES = 2 * 10**9  # 2 GB with the default verification, issue 19
RANK_RATIO = 0.25

FLOOR_CODE = """
import sys, onnx
source, target, external = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model = onnx.load(source)  # reads the external data into memory
if external:
    onnx.save_model(model, target, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=target.rsplit("/", 1)[-1] + ".data")
else:
    onnx.save_model(model, target)
"""

SVD_FLOOR_CODE = """
import sys, numpy as np, onnx
from concurrent.futures import ThreadPoolExecutor
from onnxlr import lowrank
source, ratio, jobs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
model = onnx.load(source, load_external_data=False)
weights = {t.name: t for t in model.graph.initializer if len(t.dims) == 2}
names = dict.fromkeys(n.input[1] for n in model.graph.node
                      if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights)
base = source.rsplit("/", 1)[0] if "/" in source else "."
def one(name):  # one weight in memory per thread
    array = onnx.numpy_helper.to_array(weights[name], base)
    lowrank.decompose(array.astype(np.float32)[None], lowrank.rank_for_ratio(ratio, min(array.shape)),
                      lowrank.Solver("auto"))  # onnxlr optimize's default --svd
if jobs > 1:  # as onnxlr --jobs runs them: that many at once, one BLAS thread each
    with lowrank.one_blas_thread(), ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, names))
else:
    for name in names:
        one(name)
print(len(names), "weights")
"""


def ensure_built(name: str) -> Path:
    subprocess.run([sys.executable, "-m", "models", "build", name], cwd=ROOT, check=True)
    return CACHE / name / "model.onnx"


def data_files(model: Path) -> list[Path]:
    return sorted(p for p in model.parent.iterdir() if p.name.startswith(model.name))


def digest(model: Path) -> str:
    """sha256 over the model file and its data file: the --jobs runs must give the same bytes."""
    hasher = hashlib.sha256()
    for path in data_files(model):
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                hasher.update(chunk)
    return hasher.hexdigest()


def warm_up(model: Path) -> None:
    """Read every file of the model once, so the floor and onnxlr both start from a warm page cache."""
    for path in data_files(model):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def _status(pid: int) -> dict[str, int]:
    """RssAnon and VmHWM of a live process, in bytes (empty once it has exited)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields


def measure(command: list[str], interval: float) -> dict:
    """Run `command`; wall time, exit code, and peak RssAnon / VmHWM sampled every `interval` seconds."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_anon = peak_hwm = 0
    while process.poll() is None:
        fields = _status(process.pid)
        peak_anon = max(peak_anon, fields.get("RssAnon", 0))
        peak_hwm = max(peak_hwm, fields.get("VmHWM", 0))
        time.sleep(interval)
    wall = time.perf_counter() - start
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise SystemExit(f"command failed ({process.returncode}): {shlex.join(command)}\n{output}")
    return {"wall_s": round(wall, 2), "peak_anon_bytes": peak_anon, "peak_rss_bytes": peak_hwm,
            "command": shlex.join(command)}


def model_facts(model: Path) -> dict:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    params = 0
    for tensor in proto.graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        params += count
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    return {"params": params, "bytes_on_disk": sum(p.stat().st_size for p in data_files(model)),
            "external_data": external}


def onnxlr_command() -> list[str]:
    script = Path(sys.executable).parent / "onnxlr"
    return [str(script)] if script.exists() else [sys.executable, "-m", "onnxlr"]


def bench_model(name: str, work: Path, jobs: list[int], extra: list[str], interval: float,
                verify: bool = False, svd_floor: bool = False, calibration_samples: int | None = None) -> list[dict]:
    model = ensure_built(name)
    if calibration_samples is not None:
        extra = [*extra, "--calibration", str(model.parent / "calib.npz"),
                 "--calibration-samples", str(calibration_samples)]
    facts = model_facts(model)
    out_dir = work / name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    results: list[dict] = []
    runs = []
    for count in jobs:
        report = out_dir / "report.json"
        output = out_dir / "model-lr.onnx"
        checks = ["--no-gate"] if verify else ["--no-verify"]
        command = [*onnxlr_command(), "optimize", str(model), str(output), "--rank-ratio", str(RANK_RATIO),
                   *checks, "-q", "--jobs", str(count), "--report", str(report), *extra]
        warm_up(model)
        run = measure(command, interval)
        solvers: dict[str, int] = {}
        methods: dict[str, int] = {}  # "svd", or "whitened" where calibration statistics applied
        for layer in json.loads(report.read_text())["layers"]:
            if layer["status"] == "factorized":
                solvers[layer["svd"]] = solvers.get(layer["svd"], 0) + 1
                methods[layer["method"]] = methods.get(layer["method"], 0) + 1
        output_bytes = sum(p.stat().st_size for p in data_files(output))
        sha256 = digest(output)
        for path in data_files(output):
            path.unlink()
        runs.append((count, run, solvers, methods, output_bytes, sha256))
    # The floors after onnxlr: a long benchmark can then be watched (and the machine used) while onnxlr runs, and
    # left alone while the floors are measured, without flattering onnxlr.
    warm_up(model)
    floor = measure([sys.executable, "-c", FLOOR_CODE, str(model), str(out_dir / "floor.onnx"),
                     "1" if facts["external_data"] else "0"], interval)
    for path in data_files(out_dir / "floor.onnx"):
        path.unlink()  # free the disk (and the page cache)
    # The SVDs at the parallelism of the largest --jobs run (each onnxlr SVD runs on one BLAS thread): the floor of
    # what that run could do. With --jobs 1 the floor's one SVD at a time may use every core: a stricter floor.
    svd = measure([sys.executable, "-c", SVD_FLOOR_CODE, str(model), str(RANK_RATIO), str(max(jobs))],
                  interval) if svd_floor else None
    anon_target = ANON_TARGET_VERIFIED_BYTES if verify or calibration_samples else ANON_TARGET_BYTES
    for count, run, solvers, methods, output_bytes, sha256 in runs:
        ratio = run["wall_s"] / floor["wall_s"]
        with_svd = {}
        if svd is not None:
            svd_ratio = run["wall_s"] / (floor["wall_s"] + svd["wall_s"])
            with_svd = {"svd_floor": svd, "wall_ratio_with_svd": round(svd_ratio, 2),
                        "wall_target_with_svd_met": svd_ratio <= WALL_TARGET_WITH_SVD}
        results.append({"model": name, "jobs": count, **facts, "floor": floor, **with_svd, "onnxlr": run,
                        "output_bytes": output_bytes, "output_sha256": sha256,
                        "same_output_as_first_jobs": sha256 == runs[0][5],
                        "solvers": solvers, "methods": methods, "wall_ratio": round(ratio, 2),
                        "wall_target_met": ratio <= WALL_TARGET,
                        "anon_target_met": run["peak_anon_bytes"] <= anon_target})
        if calibration_samples is not None:
            results[-1]["calibration_samples"] = calibration_samples
    return results


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": memory, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "load_average_at_start": os.getloadavg()}


def gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB"


def print_table(results: list[dict]) -> None:
    header = (f"{'model':<11} {'jobs':>4} {'params':>8} {'on disk':>9} {'floor s':>8} {'onnxlr s':>9} {'x floor':>8} "
              f"{'floor anon':>11} {'onnxlr anon':>12} {'onnxlr rss':>11}  svd")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['model']:<11} {r['jobs']:>4} {r['params'] / 1e9:>7.3f}B {gb(r['bytes_on_disk']):>9} {r['floor']['wall_s']:>8.1f} "
              f"{r['onnxlr']['wall_s']:>9.1f} {r['wall_ratio']:>8.2f} {gb(r['floor']['peak_anon_bytes']):>11} "
              f"{gb(r['onnxlr']['peak_anon_bytes']):>12} {gb(r['onnxlr']['peak_rss_bytes']):>11}  "
              f"{', '.join(f'{k} {v}' for k, v in sorted(r['solvers'].items()))}"
              f"{_svd_column(r)}"
              f"{'' if r['same_output_as_first_jobs'] else '  OUTPUT DIFFERS FROM THE FIRST --jobs RUN'}")


def _svd_column(result: dict) -> str:
    if "svd_floor" not in result:
        return ""
    return (f"; svd floor {result['svd_floor']['wall_s']:.1f} s, onnxlr {result['wall_ratio_with_svd']:.2f}x "
            f"(floor + svd floor)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated reference models (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--jobs", default="1,2", help="comma-separated --jobs values, one onnxlr run each (default: 1,2)")
    parser.add_argument("--onnxlr-args", default="", help="extra optimize flags, e.g. \"--svd exact\"")
    parser.add_argument("--json", type=Path, help="write every figure and the machine facts here")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-scale",
                        help="folder for the outputs (default: .cache/bench-scale)")
    parser.add_argument("--interval", type=float, default=0.02, help="memory sampling interval in seconds")
    parser.add_argument("--keep", action="store_true", help="keep the written models")
    parser.add_argument("--verify", action="store_true",
                        help="run optimize's default verification too (--no-gate), instead of --no-verify")
    parser.add_argument("--svd-floor", action="store_true",
                        help="also time the SVDs alone (every MatMul/Gemm weight at the same rank) in their own process")
    parser.add_argument("--calibration-samples", type=int, default=None, metavar="N",
                        help="calibrate onnxlr on the first N samples of the model's calib.npz")
    args = parser.parse_args(argv)
    extra = shlex.split(args.onnxlr_args)
    jobs = [int(j) for j in args.jobs.split(",") if j.strip()]
    facts = machine()  # before the runs: the load average says whether the machine was quiet
    results = []
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            results.extend(bench_model(name, args.work, jobs, extra, args.interval, args.verify,
                                       args.svd_floor, args.calibration_samples))
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print_table(results)
    summary = {"machine": facts, "command": shlex.join([Path(sys.executable).name, *sys.argv]),
               "targets": {"wall_x_floor": WALL_TARGET, "peak_anon_bytes": ANON_TARGET_BYTES,
                           "wall_x_floor_plus_svd": WALL_TARGET_WITH_SVD,
                           "peak_anon_bytes_verified": ANON_TARGET_VERIFIED_BYTES}, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
