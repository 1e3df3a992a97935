"""User mistakes end in one line that names the key and the fix, before any weight is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, train_run


def expect_error(tmp_path, capsys, overrides, pattern):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_run(run_dir, [*FAST, *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert pytest.importorskip("re").search(pattern, err[0]), err[0]
    assert not run_dir.exists(), "a failed start leaves no run directory behind"


TINY_LLAMA_SFT = str(REPO / "assets" / "adapters" / "tiny_llama_sft")
TINY_LLAMA = str(REPO / "assets" / "models" / "tiny_llama")

# (overrides, what the one line must say). {name} is a data file of that name made by `data_files` below.
BAD_INPUTS = [
    # adapter keys
    (["peft.targets=[q_proj,qkv_proj]"], r"peft.targets: unknown module 'qkv_proj' for qwen2 \(linear modules: "),
    (["peft.r=0"], r"peft.r=0 must be a positive integer"),
    (["peft=dora", "peft.r=-4"], r"peft.r=-4 must be a positive integer"),
    (["peft.r=2.5"], r"peft.r=2.5 must be a positive integer"),
    (["peft.alpha=abc"], r"peft.alpha=abc must be a number > 0"),
    (["peft.alpha=0"], r"peft.alpha=0 must be > 0"),
    (["peft.dropout=1.5"], r"peft.dropout=1.5 must be >= 0 and < 1"),
    (["peft.alpha_ratio=-1"], r"peft.alpha_ratio=-1 must be > 0"),
    (["peft=qlora", "peft.quantize=int4"], r"peft.quantize=int4 must be one of nf4, fp4, int8"),
    (["peft.bias=some"], r"peft.bias=some must be one of none, all, lora_only"),
    (["+peft.rank=8"], r"peft.rank is not a config key: nothing reads it"),
    # trainer keys
    (["trainer.optimizer=adam"], r"trainer.optimizer=adam must be one of adamw, adamw8bit"),
    (["trainer.precision=fp16"], r"trainer.precision=fp16 must be one of auto, fp32, bf16"),
    (["trainer.batch_size=2.5"], r"trainer.batch_size=2.5 must be a positive integer"),
    (["trainer.batch_size=0"], r"trainer.batch_size=0 must be a positive integer"),
    (["trainer.max_steps=abc"], r"trainer.max_steps=abc must be a positive integer"),
    (["trainer.lr=-1"], r"trainer.lr=-1 must be > 0"),
    (["trainer.lr=abc"], r"trainer.lr=abc must be a number > 0"),
    (["trainer.warmup_ratio=1.5"], r"trainer.warmup_ratio=1.5 must be >= 0 and < 1"),
    (["trainer.grad_accum=0"], r"trainer.grad_accum=0 must be a positive integer"),
    (["trainer.betas=[0.9]"], r"trainer.betas=\[0.9\] must be two numbers in \[0, 1\)"),
    (["trainer.on_nonfinite=ignore"], r"trainer.on_nonfinite=ignore must be one of stop, skip"),
    (["trainer.logits_chunk_size=0"], r"trainer.logits_chunk_size=0 must be auto, null or a positive integer"),
    (["trainer.gradient_checkpointing=maybe"], r"trainer.gradient_checkpointing=maybe must be one of True, False, auto"),
    (["trainer.num_threads=0"], r"trainer.num_threads=0 must be a positive integer"),
    (["+trainer.learning_rate=1e-4"], r"trainer.learning_rate is not a config key: nothing reads it \(did you mean "),
    (["+foo=1"], r"foo is not a config key: nothing reads it"),
    (["trainer.resume=/nonexistent/run"], r"trainer.resume=/nonexistent/run: no such run"),
    # model keys
    (["model.max_length=4"], r"model.max_length=4 must be an integer >= 8"),
    (["model.max_length=16"], r"model.max_length=16 cuts \d+ of \d+ rows of data.path=.*: raise model.max_length"),
    (["model.dtype=int8"], r"model.dtype=int8 must be one of auto, float32"),
    (["model=local", "model.name_or_path=/nonexistent/model"], r"model.name_or_path=/nonexistent/model is not a local directory"),
    (["model=qwen"], r"model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct .*pass model.name_or_path=DIR"),
    (["model.name_or_path={my_model}"], r"with a shipped toy model preset .*use model=local model.name_or_path="),
    # data
    (["data.path=/nonexistent/train.jsonl"], r"data.path=/nonexistent/train.jsonl: file not found"),
    (["data.path={empty.jsonl}"], r"data.path=.*empty.jsonl has no rows"),
    (["data.path={broken.jsonl}"], r"data.path=.*broken.jsonl, line 3: not valid JSON"),
    (["data.path={holes.csv}"], r"data.path=.*holes.csv, row 2 \(alpaca schema\): column `output` is empty"),
    (["data.path={odd.jsonl}"], r"data.path=.*odd.jsonl: unknown dataset columns \['question', 'reply'\]"),
    (["data.path={no_answer.jsonl}"], r"data.path=.*no_answer.jsonl, row 1 \(messages schema\): .*assistant"),
    (["data.path={two_rows.jsonl}", "data.eval_size=0"], r"2 training rows cannot fill one batch of trainer.batch_size=16"),
    (["data.path={alpaca.jsonl}", "data.schema=messages"], r"data.schema=messages needs column\(s\) \['messages'\]"),
    (["data.eval_size=-1"], r"data.eval_size=-1 must be an integer >= 0"),
    (["data.eval_path={empty.jsonl}"], r"data.eval_path=.*empty.jsonl has no rows"),
    # algorithms (their constructors' errors, not wrapped by Hydra)
    (["algo=grpo", "algo.num_generations=1"], r"algo.num_generations=1 must be an integer >= 2"),
    (["algo=grpo", "algo.rewards=[peftlab.toyworld.judge.no_such_reward]"], r"reward function .* cannot be imported"),
    (["algo=grpo", "algo.loss_type=ppo"], r"algo.loss_type=ppo: choose one of grpo, bnpo, dr_grpo, dapo"),
    (["algo=dpo", "algo.loss_type=kto"], r"algo.loss_type=kto: choose one of sigmoid, ipo, hinge"),
    (["algo=dpo", "algo.beta=0"], r"algo.beta=0 must be > 0"),
    (["algo=safe_dpo", "algo.lagrangian.lambda_init=20"], r"algo.lagrangian.lambda_init=20 must be in \(0, lambda_max"),
    (["algo=safe_dpo", "algo.cost_model=/nonexistent/cost"], r"algo.cost_model=/nonexistent/cost: not a run directory"),
    (["algo.start_from=middle"], r"algo.start_from=middle must be one of base, sft"),
    (["algo=dpo", "+algo.temperature=0.7"], r"algo.temperature is not an option of DPO"),
    (["algo=dpo", f"model.adapter={REPO / 'conf'}"], r"model.adapter=.*conf: no adapter_config.json there"),
    (["algo=dpo", f"model.adapter={TINY_LLAMA_SFT}"], r"model.adapter=.*tiny_llama_sft was trained on .*tiny_llama, not on"),
    (["algo=dpo", "peft.r=8"], r"peft.r=8 \(the adapter has 16\)"),
    # evaluation, logging, processes
    (["eval=toy", "eval.tasks.accuracy.path=/nonexistent/tasks.jsonl"], r"eval.tasks.accuracy.path=/nonexistent/tasks.jsonl: file not found"),
    (["eval=lm_eval", "eval.tasks=[no_such_task]"], r"eval.tasks: unknown lm-eval task 'no_such_task'"),
    (["logger=wandb", "logger.mode=sometimes"], r"logger.mode=sometimes must be one of offline, online, disabled"),
    (["dist=zero3", "peft=qlora"], r"peft=qlora \(4/8-bit base\) with dist=zero3 is not supported"),
    (["dist=zero2", "trainer.on_nonfinite=skip"], r"trainer.on_nonfinite=skip is not supported under DeepSpeed"),
]


def data_files(directory: Path) -> dict[str, Path]:
    """The bad data files the table names, written into `directory`."""
    alpaca = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(40)]
    files = {
        "empty.jsonl": "",
        "broken.jsonl": json.dumps(alpaca[0]) + "\n" + json.dumps(alpaca[1]) + "\n{not json\n",
        "holes.csv": "instruction,input,output\nAdd 1 and 1.,,2\nAdd 2 and 2.,,\n",
        "odd.jsonl": '{"question": "q", "reply": "r"}\n' * 8,
        "no_answer.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
        "two_rows.jsonl": "".join(json.dumps(r) + "\n" for r in alpaca[:2]),
        "alpaca.jsonl": "".join(json.dumps(r) + "\n" for r in alpaca),
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    (directory / "my_model").mkdir()  # a checkpoint of the user's own (its config is enough before weights load)
    (directory / "my_model" / "config.json").write_text((Path(TINY_LLAMA) / "config.json").read_text())
    return {name: directory / name for name in [*files, "my_model"]}


@pytest.mark.parametrize("overrides, pattern", BAD_INPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line(tmp_path, capsys, overrides, pattern):
    for name, path in data_files(tmp_path).items():
        overrides = [o.replace("{" + name + "}", str(path)) for o in overrides]
    expect_error(tmp_path, capsys, overrides, pattern)


def test_the_table_is_large():
    assert len(BAD_INPUTS) >= 40


def test_unknown_dataset_column(tmp_path, capsys):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q", "reply": "r"}\n' * 8)
    expect_error(tmp_path, capsys, [f"data.path={path}", "data.eval_path=null"],
                 r"data.path=.*odd.jsonl: unknown dataset columns \['question', 'reply'\]")


def test_qlora_where_bitsandbytes_cannot_run(tmp_path, capsys, monkeypatch):
    """A machine whose bitsandbytes has no kernel for the device: the quantization probe fails, the run doesn't start."""
    import bitsandbytes.functional as F

    def no_backend(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(F, "quantize_4bit", no_backend)
    expect_error(tmp_path, capsys, ["peft=qlora"], r"peft=qlora \(peft.quantize=nf4\) cannot run here: .*use peft=lora")


def test_command_line_error_has_no_traceback(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "train.py", "peft.r=0", "logger=none", f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: peft.r=0 must be a positive integer (the adapter rank)"
    assert not run_dir.exists()


def test_a_local_checkpoint_brings_its_own_settings_and_no_toy_adapter(tmp_path, capsys):
    """model=local with a Llama-architecture directory: algo=dpo (which starts from an SFT adapter) stops with one
    line, since no toy adapter applies to it; from the base it trains at the checkpoint's own context length."""
    import shutil

    my_llama = tmp_path / "my-llama"
    shutil.copytree(TINY_LLAMA, my_llama)
    expect_error(tmp_path, capsys, ["model=local", f"model.name_or_path={my_llama}", "algo=dpo"],
                 r"algo.start_from=sft but model .*my-llama has no sft_adapter: pass model.adapter=")
    run_dir = train_run(tmp_path / "base", [*FAST, "model=local", f"model.name_or_path={my_llama}", "algo=dpo",
                                            "algo.start_from=base", "trainer.max_steps=1", "trainer.batch_size=4"])
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((my_llama / "config.json").read_text())
    assert summary["status"] == "finished" and summary["start_adapter"] is None
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert OmegaConf.to_container(saved.model, resolve=True)["max_length"] == min(config["max_position_embeddings"], 2048)
    assert OmegaConf.to_container(saved.model, resolve=True)["family"] == "llama"
