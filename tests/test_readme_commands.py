"""Every command in the README's code blocks runs as written: `trainer.max_steps` lowered, the output directory
redirected, and the README's placeholder paths (a run directory, a checkpoint of your own, your data file, a sweep
directory) replaced by real ones. A command this machine cannot run is listed in NOT_HERE with the reason and the
test that covers it instead; a README command that is in neither list fails the suite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()
COMMAND = re.compile(r"^    ((?:python|torchrun|make|accelerate|deepspeed|wandb) .*?)(?:\s+#.*)?$", re.M)
COMMANDS = [c.strip() for c in COMMAND.findall(README)]

NOT_HERE = {  # command → why it does not run here, and what covers it
    "make train": "the set-up plus the default run: .ci/run runs make test on a fresh clone; `python train.py` below",
    "make test": "the suite itself (CI's first command)",
    "make test-slow": "the slow suite itself (CI's second command)",
    "python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu peft.r=8,16,32":
        "needs a SLURM cluster; tests/test_sweeps.py renders its sbatch script through submitit",
    "wandb sweep sweeps/wandb_rank_targets.yaml && wandb agent <sweep id>":
        "needs the W&B server; tests/test_sweeps.py runs the sweep file's jobs the way the agent renders them",
    "accelerate launch --num_processes 2 train.py dist=zero2": "GPUs only (on CPU it starts one process)",
    "deepspeed --num_gpus 2 --no_local_rank train.py dist=zero3": "GPUs only (the launcher counts GPUs)",
    "python -m peftlab.bench": "every algo at the 51M preset (tens of minutes); the --algo sft command below runs",
    "python -m peftlab.bench --suite scale --out bench-scale":
        "real architectures on CPU (about two hours); the --quick command above runs the same suite",
    "python train.py model=qwen model.name_or_path=/tmp/arch/qwen2.5-0.5b model.max_length=1024 data.max_rows=64":
        "a 494M-parameter model (minutes a step on CPU); tests/test_arch_checkpoint.py trains the 152k-vocabulary "
        "test preset through train.py the same way",
}
HUB = ("model=qwen", "model=llama", "model=mistral")  # these name hub checkpoints: offline, one clear error line
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_every_readme_command_is_run_or_says_why_not():
    assert len(COMMANDS) > 25
    unknown = [c for c in NOT_HERE if c not in COMMANDS]
    assert not unknown, f"NOT_HERE names commands the README no longer has: {unknown}"


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Real stand-ins for the README's placeholders."""
    root = tmp_path_factory.mktemp("readme")
    my_llama = root / "my-llama"
    shutil.copytree(REPO / "assets" / "models" / "tiny_llama", my_llama)
    my_data = root / "my_data.jsonl"
    my_data.write_text("".join(json.dumps({"instruction": f"Say the number {i}.", "input": "",
                                           "output": f"The number is {i}."}) + "\n" for i in range(80)))
    return {"root": root, "/models/my-llama": str(my_llama), "my_data.jsonl": str(my_data)}


def run(argv: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def as_run_here(command: str, index: int, places: dict, produced: dict) -> list[str]:
    """The README command with max_steps lowered, outputs redirected and placeholders replaced."""
    words = shlex.split(command.replace("<date>/<time>", "SWEEP"))
    out = places["root"] / f"cmd{index}"
    for i, word in enumerate(words):
        for placeholder in ("/models/my-llama", "my_data.jsonl"):
            word = word.replace(placeholder, places[placeholder]) if placeholder in word else word
        if "outputs/2026-11-22/10-00-00" in word:
            word = word.replace("outputs/2026-11-22/10-00-00", str(produced["run"]))
        if "outputs/multirun/SWEEP" in word:
            word = word.replace("outputs/multirun/SWEEP", str(produced["sweep"]))
        word = word.replace("OUT_DIR", str(out))
        if "OUT/" in word:
            word = word.replace("OUT/", f"{produced['pipeline']}/")
        words[i] = word
    if words[0] == "python" and words[1] == "train.py" or words[0] == "torchrun":
        steps = [w for w in words if w.startswith("trainer.max_steps=")]
        words = [w for w in words if w not in steps] + ["trainer.max_steps=2"]
        if "-m" in words:
            words.append(f"hydra.sweep.dir={out}")
        elif not any(w.startswith("hydra.run.dir=") for w in words):
            words.append(f"hydra.run.dir={out}")
    if words[:3] == ["python", "-m", "peftlab.pipeline"] and "--dry-run" not in words:
        words += ["trainer.max_steps=2"]
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", "--standalone", *words[1:]]
    elif words[0] == "python":
        words[0] = sys.executable
    return words


def check(result: subprocess.CompletedProcess, command: str) -> None:
    if any(h in command.split() for h in HUB) and "model.name_or_path" not in command:
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith("error: ") and "hf download" in last, result.stderr[-2000:]
        return
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_the_readme_commands_run_as_written(places):
    produced = {}
    first = run([sys.executable, "train.py", "trainer.max_steps=2", f"hydra.run.dir={places['root'] / 'run'}"])
    assert first.returncode == 0, first.stderr[-2000:]
    produced["run"] = places["root"] / "run"
    sweep = run([sys.executable, "train.py", "-m", "peft.r=8,16", "trainer.max_steps=2",
                 f"hydra.sweep.dir={places['root'] / 'sweep'}"])
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    produced["sweep"] = places["root"] / "sweep"
    produced["pipeline"] = places["root"] / "pipeline"
    for index, command in enumerate(COMMANDS):
        if command in NOT_HERE or command.startswith("torchrun"):
            continue
        if command.startswith("python train.py algo=") and "hydra.run.dir=OUT/" in command:
            continue  # the pipeline's four stages, run below by the pipeline command itself
        result = run(as_run_here(command, index, places, produced))
        check(result, command)
        if command.startswith("python -m peftlab.pipeline safe_dpo OUT_DIR") and "--dry-run" not in command:
            produced["pipeline"] = places["root"] / f"cmd{index}"
    for index, command in enumerate(COMMANDS):  # the pipeline's stages as the README lists them
        if command.startswith("python train.py algo=") and "hydra.run.dir=OUT/" in command:
            stage = as_run_here(command, index, places, {**produced, "pipeline": places["root"] / "stages"})
            check(run(stage), command)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["sft", "dpo", "grpo"])
def test_the_readme_torchrun_commands_with_the_default_evaluation(places, algo):
    """`torchrun --nproc_per_node=2 train.py dist=ddp` (and the README's other torchrun command) with the default
    evaluation: generation through DDP, for sft, dpo and grpo."""
    for index, command in enumerate(c for c in COMMANDS if c.startswith("torchrun")):
        words = as_run_here(command + ("" if "algo=" in command else f" algo={algo}"), 100 + index, places, {})
        if "algo=dpo" in command and algo != "dpo":
            continue
        out = Path(next(w for w in words if w.startswith("hydra.run.dir=")).split("=", 1)[1])
        shutil.rmtree(out, ignore_errors=True)
        result = run([*words, "logger=none"], timeout=1200)
        check(result, command)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["processes"] == 2 and "eval/accuracy" in summary
