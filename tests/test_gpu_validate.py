"""The GPU validation driver (scripts/gpu_validate.py) in its cheapest rehearsal, and its
deadline: a stage cut short still leaves its results and a summary."""
import importlib.util
import json
import os
import subprocess
import sys
import time

from bench.dispatch_sweep import RULES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_validate.py")


def driver():
    spec = importlib.util.spec_from_file_location("gpu_validate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rehearsal_of_the_sweep_writes_every_result(tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, "--rehearse", "--stages", "sweep",
                          "--total", "150", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=200)
    assert run.returncode == 0, run.stdout + run.stderr
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["rehearsal"] and env["torch"] and env["python"]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["complete"] and {r["rule"] for r in sweep["results"]} == set(RULES)
    proposals = json.loads((tmp_path / "thresholds.txt").read_text().strip().splitlines()[-1])
    assert {"MATERIALISE_MAX_INTENSITY", "MERGE_TOKEN_FACTOR", "GROUP_MAX_ELEMENTS",
            "persistent_forward", "one_pass_backward"} <= set(proposals)
    summary = (tmp_path / "summary.md").read_text()
    assert "| sweep | ok |" in summary and "| thresholds | ok |" in summary


def test_a_step_past_its_deadline_is_cut(tmp_path):
    gv = driver()
    step = gv.Step("sleeper", [sys.executable, "-c", "import time; print('started', flush=True); "
                               "time.sleep(60)"], 1.0)
    start = time.monotonic()
    outcome = gv.run_step(step, time.monotonic() + 3, str(tmp_path), dict(os.environ))
    assert outcome.status == "cut" and time.monotonic() - start < 20
    assert "started" in (tmp_path / "sleeper.log").read_text()
    assert gv.run_step(step, time.monotonic(), str(tmp_path), dict(os.environ)).status == "skipped"
