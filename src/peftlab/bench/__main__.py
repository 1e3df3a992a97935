"""python -m peftlab.bench: the command line (see peftlab.bench)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftlab.bench import __doc__ as DOC
from peftlab.bench.workloads import DEFAULT_ARCH_DIR, MODEL_PRESETS
from peftlab.memory import HOST_MMAP_THRESHOLD_BYTES, release_host_memory


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m peftlab.bench", description=DOC.split("\n")[0])
    parser.add_argument("--model", default="qwen2-50m",
                        help=f"a bench shape ({', '.join(MODEL_PRESETS)}: random weights), a public architecture "
                             "(scripts/make_arch_checkpoint.py --list) or a local model directory")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="model vocabulary of a bench shape (default: the preset's, else the tokenizer's)")
    parser.add_argument("--seq-len", type=int, default=256, help="longest prompt + answer (model.max_length)")
    parser.add_argument("--peft", default="lora,dora", help="comma-separated peft groups")
    parser.add_argument("--algo", default="sft,dpo,grpo", help="comma-separated algos (sft, dpo, grpo)")
    parser.add_argument("--trl", default="default,best",
                        help="TRL settings to run (default, best, liger: GPU only); empty: none")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (>= 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences (SFT) or pairs (DPO) per step")
    parser.add_argument("--grpo-prompts", type=int, default=1, help="GRPO prompts per step (× --num-generations)")
    parser.add_argument("--num-generations", type=int, default=8, help="GRPO completions per prompt (TRL's default)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="GRPO completion budget")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both tools")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="trainer.precision, the same for both tools (auto: fp32 on CPU, bf16 on a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench", help="directory for the results (bench.* or scale.*)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=HOST_MMAP_THRESHOLD_BYTES,
                        metavar="BYTES", help="glibc: freed blocks of this size and more go back to the system, so CPU "
                        "peak RSS counts what runs hold, not what the allocator kept; the same for both tools "
                        "(default: train.py's trainer.release_host_memory; 0: glibc's own dynamic rule)")
    parser.add_argument("--arch-dir", default=str(DEFAULT_ARCH_DIR),
                        help="where public-architecture checkpoints are written once and reused")
    suite = parser.add_argument_group("--suite scale (peftlab.bench.scale)")
    suite.add_argument("--suite", choices=["scale"], default=None,
                       help="the real-architecture suite instead of the comparison above")
    suite.add_argument("--quick", action="store_true", help="the suite on a tiny 152k-vocabulary model (tests)")
    suite.add_argument("--parts", default="compare,seqlen,qlora", help="comma-separated parts of the suite")
    suite.add_argument("--mem-limit-gb", type=float, default=12.0,
                       help="a memory run is stopped above this resident size; also the budget of a timing group")
    suite.add_argument("--jobs", type=int, default=None,
                       help="memory runs at once (default 1; --quick: 2). Their peaks stay per process")
    suite.add_argument("--render", action="store_true",
                       help="rewrite scale.md and scale.csv from the scale.json in --out (no runs)")
    suite.add_argument("--one", default=None, metavar="SPEC",
                       help="one memory run in this process (a JSON spec, as the suite writes it); prints its figures")
    args = parser.parse_args(argv)
    args.peft = [p for p in args.peft.split(",") if p]
    args.algo = [a for a in args.algo.split(",") if a]
    args.trl = [s for s in args.trl.split(",") if s]
    args.parts = [p for p in args.parts.split(",") if p]
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: a step's time is measured from the end of the step before it")
    from peftlab.bench.scale import PARTS

    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part {unknown[0]} (parts: {', '.join(PARTS)})")
    return args


def main(argv=None) -> None:
    import shlex
    import sys

    args = parse_args(argv)
    command = "python -m peftlab.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.one is not None:  # its allocator setting comes in the spec
        from peftlab.bench.isolated import RESULT_PREFIX, measure_one

        print(RESULT_PREFIX + json.dumps(measure_one(json.loads(args.one))), flush=True)
        return
    if args.malloc_mmap_threshold:
        release_host_memory(args.malloc_mmap_threshold)
    if args.suite == "scale":
        from peftlab.bench.report import read_scale, write_scale
        from peftlab.bench.scale import run_suite

        if args.render:
            rows, facts, command = read_scale(Path(args.out))
        else:
            rows, facts = run_suite(args)
        csv_path, md_path = write_scale(rows, facts, Path(args.out), command.strip())
    else:
        from peftlab.bench.report import write_results
        from peftlab.bench.runners import run_all

        csv_path, md_path = write_results(run_all(args), Path(args.out), args, command.strip())
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
