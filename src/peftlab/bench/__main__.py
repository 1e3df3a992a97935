"""python -m peftlab.bench: the command line (see peftlab.bench)."""

from __future__ import annotations

import argparse
from pathlib import Path

from peftlab.bench import __doc__ as DOC
from peftlab.bench.report import write_results
from peftlab.bench.runners import run_all
from peftlab.bench.workloads import MODEL_PRESETS

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m peftlab.bench", description=DOC.split("\n")[0])
    parser.add_argument("--model", default="qwen2-50m",
                        help=f"a preset ({', '.join(MODEL_PRESETS)}: random weights) or a local model directory")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="model vocabulary (default: the preset's, else the tokenizer's)")
    parser.add_argument("--seq-len", type=int, default=256, help="longest prompt + answer (model.max_length)")
    parser.add_argument("--peft", default="lora,dora", help="comma-separated peft groups")
    parser.add_argument("--algo", default="sft,dpo,grpo", help="comma-separated algos (sft, dpo, grpo)")
    parser.add_argument("--trl", default="default,best", help="TRL settings to run (default, best); empty: none")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (>= 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences (SFT) or pairs (DPO) per step")
    parser.add_argument("--grpo-prompts", type=int, default=1, help="GRPO prompts per step (× --num-generations)")
    parser.add_argument("--num-generations", type=int, default=8, help="GRPO completions per prompt (TRL's default)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="GRPO completion budget")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both tools")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench", help="directory for bench.csv and bench.md")
    args = parser.parse_args(argv)
    args.peft = [p for p in args.peft.split(",") if p]
    args.algo = [a for a in args.algo.split(",") if a]
    args.trl = [s for s in args.trl.split(",") if s]
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: a step's time is measured from the end of the step before it")
    return args


def main(argv=None) -> None:
    import shlex
    import sys

    args = parse_args(argv)
    command = "python -m peftlab.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    results = run_all(args)
    csv_path, md_path = write_results(results, Path(args.out), args, command.strip())
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
