"""Validate kronops on one CUDA GPU in a single run of at most --total seconds (default 480),
writing everything under OUT as it goes, so that a run cut short still returns what it did.

    python scripts/gpu_validate.py [--out DIR] [--total S] [--stages NAMES] [--rehearse]
    scripts/gpu_validate.sh [ARGS]   (the same; OUT=DIR for --out)

First env.json: GPU, driver and clocks (nvidia-smi), CUDA, torch, triton, Python, commit.
Then the stages, in order, each cut at its deadline (its budget, scaled to --total, never
past the run's end; time a stage leaves goes to the ones after it):

  tests   170 s  the tests that run the Triton kernels (``pytest -m kernels``, see
                 tests/conftest.py), compiled, fp32/fp16/bf16: Kronecker, S²FT (ranges,
                 master weights), serving, index safety under torch.compile, opcheck, the
                 graph capture of the CUDA kernels; op-level tests first, one config per
                 tuning key (KRONOPS_AUTOTUNE=0: the bench and the sweep autotune):
                 tests.log (one line a test), tests-junit.xml
  bench   180 s  the benchmark's GPU set with CUDA-graph timing, the pinned alternatives
                 beside the default paths (three-kernel vs one-pass backward, persistent vs
                 row-block forward, merged vs separate adapter step, fused vs materialised):
                 bench-kron.json, bench-s2ft.json, bench-serving.json, then the profiler's
                 kernel totals (kernel-totals.json); each JSON rewritten after every case, with
                 the configs the autotuner chose
  runner   70 s  the KronA + S²FT model compiled by AOTInductor for CUDA (its Triton kernels
                 in the package) and run by the C++ runner without Python (scripts/gpu_runner.py;
                 the native build starts in the background at the beginning): runner.json
  sweep   rest   both paths of every dispatch rule around its threshold (bench.dispatch_sweep):
                 sweep.json, and the thresholds it implies for kronops/kron/dispatch.py
                 (bench.propose_thresholds): thresholds.txt

Each stage's output goes to <stage>.log (a step's to <step>.log); summary.md is rewritten
after every step: each step's status (ok, failed with its exit code, cut at its deadline,
skipped), its time, and the figures it produced.

``--rehearse`` runs every stage on CPU with the Triton interpreter at tiny shapes (tests: the
selection collected and one kernel file run; bench and sweep: their --tiny sets; runner: the
CPU package) within --total (180 s by default; uncut it took 281 s on a 2-core machine at
load ~10, where the last stages are cut): the GPU run meets no typo.
"""
import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# Seconds per stage at the default --total (GPU 480, rehearsal 180), scaled to another
# --total; the sweep takes what is left.
BUDGETS = {False: {"tests": 170, "bench": 180, "runner": 70, "sweep": 60},
           True: {"tests": 45, "bench": 75, "runner": 40, "sweep": 20}}
STAGES = tuple(BUDGETS[False])
TOTAL_S = {False: 480, True: 180}
# Where the tests marked ``kernels`` are, in the order the GPU runs them (a folder that gains
# such tests is added here; the rehearsal collects these paths).
TEST_ORDER = ["tests/kron", "tests/s2ft", "tests/serving", "tests/kernels", "tests/adapters",
              "tests/test_op_validation.py"]
GRACE_S = 5  # between SIGTERM and SIGKILL of a step cut at its deadline


@dataclass
class Step:
    """One command of a stage: ``share`` of the stage's budget (cumulative: a step finishing
    early leaves its time to the next), its log, and what its result file is."""
    name: str
    argv: list
    share: float
    result: str | None = None
    stdout: bool = False  # the step's stdout is its result file (its stderr goes to the log)
    env: dict = field(default_factory=dict)  # set for this step only


@dataclass
class Outcome:
    name: str
    status: str           # ok, failed (rc N), cut, skipped
    seconds: float
    note: str = ""


def stage_steps(stage: str, out: str, rehearse: bool) -> list[Step]:
    """The commands of ``stage``: the GPU run's, or with ``rehearse`` their CPU rehearsal."""
    def at(name):
        return os.path.join(out, name)

    if stage == "tests":
        pytest = [PY, "-m", "pytest", "-m", "kernels", "-p", "no:cacheprovider"]
        run = [*pytest, "-v", "-rfE", "--durations=20", f"--junitxml={at('tests-junit.xml')}"]
        if rehearse:  # the whole selection collected, one kernel file run
            return [Step("tests-collect", [*pytest, "--collect-only", "-q", *TEST_ORDER], 0.5,
                         "tests-collect.log"),
                    Step("tests", [*run, "tests/kernels/test_kron_rows_persistent.py"], 1.0,
                         "tests-junit.xml")]
        # The op-level tests first (compile, opcheck, the public API), then the kernels'.
        # One config per tuning key: the tests check results, the bench and sweep autotune.
        return [Step("tests", [*run, *TEST_ORDER], 1.0, "tests-junit.xml",
                     env={"KRONOPS_AUTOTUNE": "0"})]
    if stage == "bench":
        size = ["--tiny", "--budget", "0.01"] if rehearse else ["--full"]
        steps = [Step(f"bench-{ops}", [PY, "-m", "bench", *size, "--ops", ops, "--no-overhead",
                                       "--out", at(f"bench-{ops}.json")],
                      share, f"bench-{ops}.json")
                 for ops, share in (("kron", 0.45), ("s2ft", 0.65), ("serving", 0.8))]
        totals = [PY, "-m", "bench.kernel_totals", size[0], "--ops", "kron,serving",
                  "--out", at("kernel-totals.json")]
        return steps + [Step("kernel-totals", totals, 1.0, "kernel-totals.json")]
    if stage == "runner":
        device = "cpu" if rehearse else "cuda"
        return [Step("runner", [PY, os.path.join("scripts", "gpu_runner.py"), at("runner"),
                                "--device", device, "--json", at("runner.json")],
                     1.0, "runner.json")]
    if stage == "sweep":
        return [Step("sweep", [PY, "-m", "bench.dispatch_sweep", *(["--tiny"] if rehearse else []),
                               "--out", at("sweep.json")], 0.9, "sweep.json"),
                Step("thresholds", [PY, "-m", "bench.propose_thresholds", at("sweep.json")], 1.0,
                     "thresholds.txt", stdout=True)]
    raise ValueError(f"unknown stage {stage!r}")


def run_step(step: Step, deadline: float, out: str, env: dict) -> Outcome:
    """Run ``step`` with its output in <name>.log, killed (its process group) at ``deadline``."""
    start = time.monotonic()
    if deadline - start < 1:
        return Outcome(step.name, "skipped", 0.0, "no time left")
    log_path = os.path.join(out, f"{step.name}.log")
    stdout_path = os.path.join(out, step.result) if step.stdout else log_path
    with open(log_path, "w") as log, open(stdout_path, "w" if step.stdout else "a") as stdout:
        log.write(f"$ {' '.join(step.argv)}\n")
        log.flush()
        proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=stdout, stderr=log,
                                env={**env, **step.env}, start_new_session=True)
        try:
            rc = proc.wait(timeout=deadline - start)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=GRACE_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return Outcome(step.name, "cut", time.monotonic() - start,
                           f"at its deadline ({deadline - start:.0f} s)")
    status = "ok" if rc == 0 else f"failed (rc {rc})"
    return Outcome(step.name, status, time.monotonic() - start)


def environment(out: str, rehearse: bool) -> dict:
    """env.json: what the run measured on."""
    import platform

    import torch
    import triton

    def command(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                                  timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            return None

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               rehearsal=rehearse, python=platform.python_version(), torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda,
               commit=command("git", "rev-parse", "HEAD") or os.environ.get("KRONOPS_COMMIT"),
               dirty=bool(command("git", "status", "--porcelain", "--untracked-files=no")),
               cpu_count=os.cpu_count(), host=platform.node())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   nvidia_smi=command("nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                      "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"))
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    return env


def junit_counts(path: str) -> str:
    """"N passed, F failed, E errors, S skipped" from a JUnit XML file."""
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in
                                      ("tests", "failures", "errors", "skipped"))
    return (f"{total - failed - errors - skipped} passed, {failed} failed, {errors} errors, "
            f"{skipped} skipped in {float(suite.get('time', 0)):.0f} s")


def progress(log: str) -> str:
    """What a pytest -v log shows so far: results counted, the last test started."""
    with open(log) as f:
        text = f.read()
    counts = {word: len(re.findall(rf" {word}( |$)", text, re.M))
              for word in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return ", ".join(f"{n} {word.lower()}" for word, n in counts.items() if n)


def result_note(step: Step, out: str) -> str:
    """The figures a finished (or cut) step left: test counts, rows written, proposals."""
    path = os.path.join(out, step.result) if step.result else None
    try:
        if step.result == "tests-junit.xml":
            if os.path.exists(path):
                return junit_counts(path)
            return "so far: " + progress(os.path.join(out, f"{step.name}.log"))
        if path and path.endswith(".json") and os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            if "results" in data:
                rows = data["results"]
                bad = [r for r in rows if r.get("kronops") and not r.get("error_ok", True)]
                return (f"{len(rows)} rows{'' if data.get('complete', True) else ' (cut short)'}"
                        + (f", {len(bad)} kronops rows out of tolerance" if bad else ""))
            return ", ".join(f"{k}={data[k]}" for k in ("ok", "kernels_ok", "rel_error", "kernels")
                             if k in data)
        if path and os.path.exists(path):
            with open(path) as f:
                lines = f.read().strip().splitlines()
            return lines[-1] if lines else ""
    except (OSError, ValueError, ElementTree.ParseError) as e:
        return f"unreadable result: {e}"
    return ""


def write_summary(out: str, env: dict, outcomes: list[Outcome], started: float,
                  total: float) -> None:
    """summary.md: the environment, then each step's status, time and result."""
    lines = [f"# GPU validation{' rehearsal (CPU)' if env.get('rehearsal') else ''}", "",
             f"{env.get('gpu', 'no GPU')} | driver/clocks: {env.get('nvidia_smi')} | "
             f"torch {env['torch']} (CUDA {env['cuda']}) | triton {env['triton']} | "
             f"Python {env['python']} | commit {env['commit']}"
             f"{' (dirty)' if env['dirty'] else ''} | {env['date']}", "",
             f"Elapsed {time.monotonic() - started:.0f} s of {total:.0f} s.", "",
             "| step | status | seconds | result |", "|---|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.note} |" for o in outcomes]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def background_build(out: str, env: dict) -> subprocess.Popen:
    """The native library and the C++ runner, built while the tests run (for the runner stage)."""
    log = open(os.path.join(out, "native-build.log"), "w")
    return subprocess.Popen([PY, "-m", "kronops.native", "build"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"),
                   help="where the results go (default $OUT, else bench/results/gpu-validate, "
                        "bench/results/local/gpu-rehearsal with --rehearse)")
    p.add_argument("--total", type=float, default=None,
                   help=f"seconds for the whole run (default {TOTAL_S[False]}; {TOTAL_S[True]} "
                        "with --rehearse)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated, of {', '.join(STAGES)} (env.json is always written)")
    p.add_argument("--rehearse", action="store_true",
                   help="CPU, Triton interpreter, tiny shapes: the plumbing of every stage")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)}; valid: {', '.join(STAGES)}")
    total = args.total or TOTAL_S[args.rehearse]
    default = ("local", "gpu-rehearsal") if args.rehearse else ("gpu-validate",)
    out = os.path.abspath(args.out or os.path.join(ROOT, "bench", "results", *default))
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    if args.rehearse:
        env["TRITON_INTERPRET"] = "1"
    else:
        import torch
        if not torch.cuda.is_available():
            print("gpu_validate: no CUDA GPU here; --rehearse runs the CPU rehearsal",
                  file=sys.stderr)
            return 2
    started = time.monotonic()
    end = started + total
    scale = total / TOTAL_S[args.rehearse]
    info = environment(out, args.rehearse)
    print(f"gpu_validate: {total:.0f} s, stages {', '.join(stages)}; results in {out}", flush=True)
    builder = background_build(out, env) if "runner" in stages and not args.rehearse else None
    outcomes = [Outcome("env", "ok", time.monotonic() - started, info.get("gpu", "no GPU"))]
    write_summary(out, info, outcomes, started, total)
    for stage in (s for s in STAGES if s in stages):
        stage_start = time.monotonic()
        budget = BUDGETS[args.rehearse][stage] * scale if stage != "sweep" else end - stage_start
        stage_end = min(end, stage_start + budget)
        if stage == "runner" and builder is not None:
            try:
                builder.wait(timeout=max(1.0, stage_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if builder.returncode != 0:
                outcomes.append(Outcome("native-build", "failed" if builder.returncode is not None
                                        else "cut", time.monotonic() - stage_start,
                                        "see native-build.log"))
                write_summary(out, info, outcomes, started, total)
                continue
        for step in stage_steps(stage, out, args.rehearse):
            deadline = min(stage_end, stage_start + step.share * (stage_end - stage_start))
            outcome = run_step(step, deadline, out, env)
            outcome.note = " ".join(filter(None, [outcome.note, result_note(step, out)]))
            outcomes.append(outcome)
            write_summary(out, info, outcomes, started, total)
            print(f"gpu_validate: {outcome.name}: {outcome.status}, {outcome.seconds:.0f} s; "
                  f"{outcome.note}", flush=True)
    if builder is not None and builder.poll() is None:
        os.killpg(builder.pid, signal.SIGKILL)
    failed = [o for o in outcomes if o.status not in ("ok",)]
    print(f"gpu_validate: wrote {out}/summary.md ({len(failed)} of {len(outcomes)} steps not ok)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
