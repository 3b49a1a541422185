"""How fast is the tool itself? (issue 12.5) `surgery --help`, and trace + one pass on resnet50 at 224.

Run by hand (not part of pytest)::

    python benchmarks/apply_speed.py                     # resnet50 at 224, every pass
    python benchmarks/apply_speed.py --model convnext_tiny --repeat 3

Each pass runs alone through ``surgery.apply`` in a fresh subprocess (cold imports, like a
user's first command), with the report's counts but without latency (``--no-latency``):
the wall time from the start of the process to the written JSON, and the steps the report
itself times (``report["seconds"]``: trace, count, the pass with its count, drift). The
goal: every row under 30 s on this CPU. Writes ``apply_speed.md`` and ``apply_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
GOAL_SECONDS = 30.0
HELP_GOAL_SECONDS = 1.0
PASSES = ["fuse", "rescale:factor=0.5", "bilinear", "head:num_classes=10", "ebcle:depth=8", "ebcle:data=digits",
          "prune:ratio=0.3", "prune:flops=0.5", "prune:flops=0.5,importance=taylor,data=digits"]


def _run(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "SURGERY_PROGRESS": "0"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    return time.perf_counter() - start, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--input-size", default="224")
    ap.add_argument("--passes", default=";".join(PASSES),
                    help="pass specs separated by ';'")
    ap.add_argument("--repeat", type=int, default=1, help="runs per pass; the median is reported")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    help_times = [_run(["--help"])[0] for _ in range(5)]
    rows = []
    for spec in args.passes.split(";"):
        walls, seconds, error = [], {}, None
        for _ in range(args.repeat):
            wall, proc = _run(["-q", "apply", args.model, "--input-size", args.input_size, "--pass", spec,
                               "--no-latency", "--json"])
            if proc.returncode != 0:
                error = (proc.stderr.strip().splitlines() or ["?"])[-1]
                break
            walls.append(wall)
            seconds = json.loads(proc.stdout)["seconds"]
        row = {"pass": spec, "wall_s": statistics.median(walls) if walls else None, "steps": seconds,
               "error": error}
        rows.append(row)
        print(json.dumps(row), flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"model": args.model, "input_size": args.input_size, "cores": os.cpu_count(), "load": load,
              "help_s": statistics.median(help_times), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "apply_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Speed of the tool: trace + one pass on {args.model} at {args.input_size}", "",
             f"`python benchmarks/apply_speed.py` on {os.cpu_count()} cores (load average {load:.1f} at the end). "
             f"Wall: a fresh `surgery -q apply {args.model} --input-size {args.input_size} --pass SPEC --no-latency "
             f"--json` process, imports and model creation included (median of {args.repeat}). The step columns are "
             "the report's own timings (`report[\"seconds\"]`); count: the original's FLOPs; the pass column "
             f"includes its after-count. Goal: under {GOAL_SECONDS:.0f} s each.", "",
             f"`surgery --help`: {result['help_s']:.2f} s (median of 5; goal under {HELP_GOAL_SECONDS:.0f} s).", "",
             "| pass | wall (s) | trace | count | pass | drift | under goal |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| `{r['pass']}` | failed: {r['error']} | | | | | no |")
            continue
        s = r["steps"]
        name = next((k for k in s if k not in ("trace", "count", "drift")), "")
        lines.append(f"| `{r['pass']}` | {r['wall_s']:.1f} | {s.get('trace', 0):.1f} | {s.get('count', 0):.1f} | "
                     f"{s.get(name, 0):.1f} | {s.get('drift', 0):.1f} | "
                     f"{'yes' if r['wall_s'] < GOAL_SECONDS else 'NO'} |")
    (args.out / "apply_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
