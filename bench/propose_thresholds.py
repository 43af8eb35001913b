"""The thresholds of ``kronops/kron/dispatch.py`` that a dispatch sweep's results imply.

    python -m bench.propose_thresholds SWEEP.json [--device cuda]

Reads the rows ``python -m bench.dispatch_sweep`` wrote and prints, per rule, each point's
two medians, the proposed value beside the current one, and the bracket it comes from
(the last point where the rule's path won and the first where it lost). A proposal is a
reading of one run, to be written into dispatch.py by hand with its measurement in
bench/NOTES.md; rules without points in the file are left out.
"""
import argparse
import json
import sys
from collections import defaultdict


def medians(rows: list[dict], rule: str) -> list[tuple[dict, dict]]:
    """[(first row of the point, {provider: median ms})] of ``rule``'s points, in file order."""
    points = defaultdict(dict)
    first = {}
    for row in rows:
        if row["rule"] == rule:
            key = (row["op"], row["shape"])
            first.setdefault(key, row)
            points[key][row["provider"]] = row["median_ms"]
    return [(first[key], times) for key, times in points.items()]


def largest_winning(points: list[tuple[float, bool]]) -> tuple[float | None, float | None]:
    """For (score, the rule's path won) pairs: (the largest score below which the path won at
    every point, the smallest score where it lost), None where there is none."""
    lost = [score for score, won in points if not won]
    first_loss = min(lost) if lost else None
    wins = [score for score, won in points if won and (first_loss is None or score < first_loss)]
    return (max(wins) if wins else None), first_loss


def smallest_winning(points: list[tuple[float, bool]]) -> tuple[float | None, float | None]:
    """For (score, the rule's path won) pairs: (the smallest score from which the path won at
    every larger point, the largest score where it lost), None where there is none."""
    lost = [score for score, won in points if not won]
    last_loss = max(lost) if lost else None
    wins = [score for score, won in points if won and (last_loss is None or score > last_loss)]
    return (min(wins) if wins else None), last_loss


def report_points(rule: str, points, paths: tuple[str, str], score: str) -> list[bool]:
    """Print each point's two medians; returns whether ``paths[0]`` won at each."""
    print(f"{rule}: {paths[0]} vs {paths[1]}")
    won = []
    for row, times in points:
        mine, other = times.get(paths[0]), times.get(paths[1])
        if mine is None or other is None:
            print(f"  {row['shape']}: incomplete point ({', '.join(times)})")
            won.append(None)
            continue
        won.append(mine < other)
        print(f"  {row['shape']} ({score} {row[score]:.4g}): {paths[0]} {mine:.4f} ms, "
              f"{paths[1]} {other:.4f} ms -> {paths[0] if won[-1] else paths[1]}")
    return won


def propose(rows: list[dict], current: dict, device: str) -> dict:
    """{threshold name: proposed value}, printing the evidence per rule."""
    proposals = {}
    points = medians(rows, "materialise")
    if points:
        won = report_points("materialise", points, ("materialised", "fused"), "intensity")
        cap = current["MATERIALISE_MAX_ELEMENTS"].get(device, 0)
        within = [(row["intensity"], w) for (row, _), w in zip(points, won)
                  if w is not None and row["elements"] <= cap]
        best, loss = largest_winning(within)
        proposals["MATERIALISE_MAX_INTENSITY"] = best or 0.0
        print(f"  -> MATERIALISE_MAX_INTENSITY[{device!r}] = {best or 0.0:g} (now "
              f"{current['MATERIALISE_MAX_INTENSITY'].get(device)}; first loss at {loss}); "
              f"points over {cap} elements: " + ", ".join(
                  f"{row['shape']} {'materialised' if w else 'fused'}"
                  for (row, _), w in zip(points, won) if w is not None and row["elements"] > cap))
    points = medians(rows, "merge")
    if points:
        won = report_points("merge", points, ("merged", "separate"), "tokens_per_intensity")
        best, loss = smallest_winning([(row["tokens_per_intensity"], w)
                                       for (row, _), w in zip(points, won) if w is not None])
        proposals["MERGE_TOKEN_FACTOR"] = best
        print(f"  -> MERGE_TOKEN_FACTOR[{device!r}] = {best} (now "
              f"{current['MERGE_TOKEN_FACTOR'].get(device)}; last loss at {loss})")
    points = medians(rows, "sparse_merge")
    if points:
        won = report_points("sparse_merge", points, ("merged", "Δ products"),
                            "selected_tokens_per_intensity")
        best, loss = smallest_winning([(row["selected_tokens_per_intensity"], w)
                                       for (row, _), w in zip(points, won) if w is not None])
        proposals["SPARSE_MERGE_TOKEN_FACTOR"] = best
        print(f"  -> SPARSE_MERGE_TOKEN_FACTOR[{device!r}] = {best} (now "
              f"{current['SPARSE_MERGE_TOKEN_FACTOR'].get(device)}; last loss at {loss})")
    points = medians(rows, "group")
    if points:
        won = report_points("group", points, ("grouped", "mode by mode"), "group_elements")
        best, loss = largest_winning([(row["group_elements"], w)
                                      for (row, _), w in zip(points, won) if w is not None])
        proposals["GROUP_MAX_ELEMENTS"] = int(best or 0)
        print(f"  -> GROUP_MAX_ELEMENTS[{device!r}] = {int(best or 0)} (now "
              f"{current['GROUP_MAX_ELEMENTS'].get(device, 0)}; first loss at {loss})")
    for rule, paths, name in [("persistent", ("persistent", "row blocks"), "persistent_forward"),
                              ("one_pass", ("one pass", "three kernels"), "one_pass_backward")]:
        points = medians(rows, rule)
        if points:
            won = [w for w in report_points(rule, points, paths, "intensity") if w is not None]
            proposals[name] = bool(won) and all(won)
            print(f"  -> {name}: {paths[0] if proposals[name] else paths[1]} "
                  f"({sum(won)} of {len(won)} points won by {paths[0]})")
    return proposals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.propose_thresholds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="a JSON file python -m bench.dispatch_sweep wrote")
    p.add_argument("--device", default=None, help="the device kind to propose for "
                   "(default: the sweep's, cuda unless it ran --tiny on cpu)")
    args = p.parse_args(argv)
    with open(args.sweep) as f:
        data = json.load(f)
    device = args.device or ("cpu" if data.get("tiny") else "cuda")
    print(f"{data['device']} | torch {data['torch']} | triton {data['triton']} | {data['dtype']}"
          + ("" if data.get("complete") else " | INCOMPLETE (cut short)"))
    proposals = propose(data["results"], data["thresholds"], device)
    print(json.dumps(proposals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
