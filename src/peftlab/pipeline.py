"""Multi-stage pipelines: each stage an ordinary `train.py` run that reads the previous stages' outputs.

    python -m peftlab.pipeline safe_dpo OUT_DIR                    # the toy world, offline, on CPU
    python -m peftlab.pipeline safe_dpo OUT_DIR model=tiny_llama   # extra overrides go to every stage
    python -m peftlab.pipeline safe_dpo OUT_DIR --dry-run          # print the train.py commands only

`safe_dpo` runs, into OUT_DIR/{sft,reward,cost,safe_dpo}:

    python train.py algo=sft                                                       hydra.run.dir=OUT/sft
    python train.py algo=rm algo.objective=reward model.adapter=OUT/sft/adapter    hydra.run.dir=OUT/reward
    python train.py algo=rm algo.objective=cost   model.adapter=OUT/sft/adapter    hydra.run.dir=OUT/cost
    python train.py algo=safe_dpo model.adapter=OUT/sft/adapter algo.lagrangian.threshold=-6 \\
        algo.reward_model=OUT/reward algo.cost_model=OUT/cost                      hydra.run.dir=OUT/safe_dpo

(each stage's loop settings are conf/trainer/<algo>.yaml). The reward and cost models start from the SFT model and so
share the policy's base: safe_dpo holds them as adapters on it. A stage whose summary.json exists is skipped and
an interrupted one resumes from its checkpoint, so rerunning the command continues a pipeline. On real models and
data, run the same commands with `model=... data=...` added (e.g. data=pku_saferlhf for the last three stages).
The final figures are printed and written to OUT_DIR/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from peftlab import REPO_ROOT

# pipeline → ordered stages: (name, train.py overrides; {out} is OUT_DIR)
STAGES: dict[str, list[tuple[str, list[str]]]] = {
    "safe_dpo": [
        ("sft", ["algo=sft"]),
        ("reward", ["algo=rm", "algo.objective=reward", "model.adapter={out}/sft/adapter"]),
        ("cost", ["algo=rm", "algo.objective=cost", "model.adapter={out}/sft/adapter"]),
        # The cost budget d is in the cost model's units: the toy cost model scores safe answers about -7 and
        # unsafe ones about +7, so d = -6 asks for nearly every sampled answer to be safe (d = 0 tolerates half of
        # them unsafe and lets λ fall while the policy is still unsafe: unsafe_rate 0.86 measured).
        ("safe_dpo", ["algo=safe_dpo", "model.adapter={out}/sft/adapter",
                      "algo.reward_model={out}/reward", "algo.cost_model={out}/cost", "algo.lagrangian.threshold=-6"]),
    ],
}

# figures of the final stage's summary that the pipeline reports
REPORTED = ("base/accuracy", "eval/accuracy", "base/unsafe_rate", "eval/unsafe_rate")


def stage_commands(pipeline: str, out_dir: Path, extra: list[str] = ()) -> list[tuple[str, list[str]]]:
    """[(stage name, argv of its train.py run)] with OUT_DIR filled in and `extra` overrides appended."""
    if pipeline not in STAGES:
        raise ValueError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(STAGES)}")
    out = Path(out_dir).resolve()
    commands = []
    for name, overrides in STAGES[pipeline]:
        argv = [sys.executable, str(REPO_ROOT / "train.py"), *(o.format(out=out) for o in overrides), *extra,
                f"hydra.run.dir={out / name}", "trainer.resume=auto"]
        commands.append((name, argv))
    return commands


def finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"


def run_pipeline(pipeline: str, out_dir: Path, extra: list[str] = (), dry_run: bool = False) -> dict:
    """Run every stage not yet finished; return the report written to OUT_DIR/pipeline.json."""
    out_dir = Path(out_dir).resolve()
    commands = stage_commands(pipeline, out_dir, list(extra))
    if dry_run:
        for name, argv in commands:
            print(f"# {name}\n{shlex.join(argv[1:])}")
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stages = {}
    for name, argv in commands:
        run_dir = out_dir / name
        if finished(run_dir):
            print(f"[{name}] already finished: {run_dir}")
            stages[name] = {"skipped": True}
            continue
        print(f"[{name}] {shlex.join(argv[1:])}", flush=True)
        began = time.time()
        result = subprocess.run(argv, cwd=REPO_ROOT)
        stages[name] = {"seconds": round(time.time() - began, 1), "returncode": result.returncode}
        if result.returncode != 0:
            print(f"[{name}] failed with exit status {result.returncode}; rerun the command to resume", file=sys.stderr)
            sys.exit(result.returncode)
    final = json.loads((out_dir / commands[-1][0] / "summary.json").read_text())
    report = {"pipeline": pipeline, "out_dir": str(out_dir), "seconds": round(time.time() - started, 1),
              "stages": stages, **{k: final.get(k) for k in REPORTED}}
    (out_dir / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    print("pipeline: " + "  ".join(f"{k}={report[k]:.3g}" for k in REPORTED if isinstance(report[k], float))
          + f"  seconds={report['seconds']:.0f}")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", choices=sorted(STAGES), help="which pipeline")
    parser.add_argument("out_dir", type=Path, help="where the stages' run directories go")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every stage (e.g. model=tiny_llama)")
    parser.add_argument("--dry-run", action="store_true", help="print the train.py commands and exit")
    args = parser.parse_args(argv)
    run_pipeline(args.pipeline, args.out_dir, args.overrides, args.dry_run)


if __name__ == "__main__":
    main()
