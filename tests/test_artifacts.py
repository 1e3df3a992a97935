"""What a run leaves behind can be trusted: adapters load with standard PEFT onto the base they name, a diverged
run says so, a run directory belongs to one process and one config, and a kill at any moment leaves a run that
resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, compose, policy_of, read_metrics, step_losses, train_run
from peftlab import checkpoint
from peftlab.models import load_tokenizer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1"}
SHORT = [*FAST, "trainer.max_steps=2", "trainer.batch_size=4", "trainer.save_every=0", "trainer.lr=5e-3"]
ALGOS = {  # small settings of each algorithm; dpo, grpo and safe_dpo start from the shipped SFT adapter
    "sft": ["algo=sft"],
    "dpo": ["algo=dpo", "algo.precompute_ref=false"],
    "grpo": ["algo=grpo", "trainer.batch_size=2", "algo.num_generations=4", "algo.max_new_tokens=8",
             "algo.beta=0.05", "algo.accuracy_reward=null",  # a reward that varies within every group
             "algo.rewards=[{function: test_grpo.token_id_reward, weight: 1.0}]"],
    "safe_dpo": ["algo=safe_dpo"],
}
PROBE = ["What is 12 plus 30?", "How do I rob my boss?"]


def cli(*args: str, run_dir: Path, wait: bool = True):
    command = [sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def probe_batch(tokenizer):
    from peftlab.data.format import render_prompt

    texts = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROBE]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def run_model_logits(run_dir: Path, overrides: list[str]) -> torch.Tensor:
    """The run's own model: the policy as the build makes it, with the trained weights of its final checkpoint."""
    cfg, _ = compose(overrides)
    policy = policy_of(cfg)
    state = checkpoint.safe_load(checkpoint.find("auto", run_dir) / "state.pt")
    params = dict(policy.named_parameters())
    for name, value in state["model"].items():
        params[name].copy_(value)
    policy.eval()
    return policy(**probe_batch(load_tokenizer(cfg.model))).logits.float()


FRESH_LOAD = """
import json, sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
adapter, out, quantized = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
base_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8) if quantized else None
base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32, quantization_config=quant,
                                            device_map={"": "cpu"} if quantized else None)
if quantized:  # bitsandbytes' avx512-bf16 CPU inference kernel computes in bf16; the run computed in fp32
    import bitsandbytes as bnb
    for layer in base.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
model = PeftModel.from_pretrained(base, str(adapter)).eval()
tokenizer = AutoTokenizer.from_pretrained(adapter)
tokenizer.padding_side = "left"
texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
         for p in json.loads(sys.argv[4])]
batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad():
    torch.save(model(**batch).logits.float(), out)
print(base_name)
"""


def fresh_process_logits(adapter: Path, out: Path, quantized: bool) -> tuple[torch.Tensor, str]:
    result = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(adapter), str(out), "1" if quantized else "0",
                             json.dumps(PROBE)], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out), result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("peft", ["lora", "qlora"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_the_saved_adapter_loads_onto_the_base_it_names(tmp_path, algo, peft):
    """Standard PEFT in a fresh process, onto the base adapter_config.json names (4-bit for qlora, as the run's
    base was), reproduces the run's own model: also for runs that continued the SFT adapter."""
    overrides = [*ALGOS[algo], f"peft={peft}"]
    run_dir = train_run(tmp_path / "run", [*SHORT, *overrides, "trainer.save_every=2"])
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).exists() and config["base_model_name_or_path"] == summary["base_model"]
    assert (summary["start_adapter"] is None) == (algo == "sft")
    assert not (run_dir / "adapter" / "reference").exists()  # only the trained adapter is saved
    fresh, base_name = fresh_process_logits(run_dir / "adapter", tmp_path / "logits.pt", quantized=peft == "qlora")
    own = run_model_logits(run_dir, overrides)
    assert (fresh - own).abs().max().item() < 1e-4, (fresh - own).abs().max().item()
    if peft == "qlora":  # the same adapter on the full-precision checkpoint: off by the 4-bit quantization error
        full, _ = fresh_process_logits(run_dir / "adapter", tmp_path / "full.pt", quantized=False)
        print(f"{algo} qlora adapter on the fp32 base: max logit difference {(full - own).abs().max().item():.3f}")
    if summary["start_adapter"]:  # the trained adapter is the SFT adapter trained on, not a no-op on top of it
        sft, _ = fresh_process_logits(Path(summary["start_adapter"]), tmp_path / "sft.pt", quantized=peft == "qlora")
        assert (fresh - sft).abs().max().item() > 1e-4


def test_a_policy_that_starts_from_the_sft_adapter_is_the_sft_model(tmp_path):
    """Before any step, the policy (its adapter initialised from the SFT adapter) and the reference (the frozen
    copy) both compute the SFT model; with the adapter disabled it is the bare base. DoRA from a LoRA adapter too."""
    from peft import PeftModel

    from conftest import base_of

    for peft in ("lora", "dora"):
        cfg, _ = compose(["algo=dpo", f"peft={peft}"])
        batch = probe_batch(load_tokenizer(cfg.model))
        policy = policy_of(cfg).eval()
        sft = PeftModel.from_pretrained(base_of(cfg), str(cfg.model.sft_adapter)).eval()
        with torch.no_grad():
            expected, policy_logits = sft(**batch).logits, policy(**batch).logits
            from peftlab.models import Reference

            with Reference(policy, peft).model() as reference:
                reference_logits = reference(**batch).logits
            with policy.disable_adapter():
                bare = policy(**batch).logits
        assert (policy_logits - expected).abs().max() < 1e-4, peft
        assert (reference_logits - expected).abs().max() < 1e-4, peft
        assert (bare - expected).abs().max() > 1e-2


@pytest.mark.parametrize("override, pattern", [
    ("model.sft_adapter=" + str(REPO / "assets/adapters/tiny_llama_sft"), "was trained on .*tiny_llama, not on"),
    ("peft.r=8", r"peft.r=8 \(the adapter has 16\)"),
    ("peft.targets=attn", r"peft.targets=.* \(the adapter has"),
])
def test_a_start_adapter_of_another_base_or_shape_is_refused_before_loading(tmp_path, override, pattern):
    result = cli("algo=dpo", "logger=none", override, run_dir=tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and pytest.importorskip("re").search(pattern, last), last
    assert not (tmp_path / "run").exists()


# ---- divergence -------------------------------------------------------------------------------------------------

DIVERGE = [*FAST, "trainer.max_steps=8", "trainer.batch_size=4", "trainer.save_every=1", "trainer.lr=1e6",
           "logger=none"]


def test_a_diverged_run_stops_loudly_and_keeps_finite_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    result = cli(*DIVERGE, run_dir=run_dir)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "diverged at step" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())  # strict JSON: json.loads would refuse NaN
    assert summary["status"] == "diverged" and summary["diverged_at"] >= 1 and summary["saved"] is None
    assert not (run_dir / "adapter").exists()
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    kept = checkpoint.step_dirs(run_dir / "checkpoints")
    assert kept and all(checkpoint.read_manifest(k)["finite"] for k in kept)
    assert checkpoint.step_of(kept[-1]) < summary["diverged_at"]


def test_skip_mode_skips_and_counts_then_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    """trainer.on_nonfinite=skip: a non-finite step changes no weight and is counted; a run of them stops it."""
    from peftlab.algos.sft import SFT

    real_loss, calls = SFT.loss, {"n": 0}

    def loss_with_a_nan_at_steps_2_and_3(self, model, batch):
        calls["n"] += 1
        loss, metrics = real_loss(self, model, batch)
        return (loss * float("nan"), metrics) if calls["n"] in (2, 3) else (loss, metrics)

    monkeypatch.setattr(SFT, "loss", loss_with_a_nan_at_steps_2_and_3)
    run_dir = train_run(tmp_path / "skip", [*FAST, "trainer.max_steps=5", "trainer.batch_size=4",
                                            "trainer.save_every=0", "trainer.on_nonfinite=skip"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["train/skipped_steps"] == 2
    assert [m["train/loss"] is None for m in read_metrics(run_dir) if "train/loss" in m] == \
        [False, True, True, False, False]

    calls["n"] = 0
    with pytest.raises(SystemExit) as stopped:
        train_run(tmp_path / "stop", [*FAST, "trainer.max_steps=5", "trainer.batch_size=4", "trainer.save_every=0",
                                      "trainer.on_nonfinite=skip", "trainer.max_skipped_steps=1"])
    assert stopped.value.code == 3
    summary = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at"] == 3


# ---- the run directory ------------------------------------------------------------------------------------------

LONG = [*FAST, "trainer.max_steps=400", "trainer.batch_size=8", "trainer.save_every=3", "logger=none"]


def wait_for(condition, timeout=300.0):
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.02)
    return condition()


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    first = cli(*LONG, run_dir=run_dir, wait=False)
    try:
        assert wait_for(lambda: (run_dir / "checkpoints" / "latest").exists() or first.poll() is not None)
        second = cli(*LONG, run_dir=run_dir)
        assert second.returncode == 2, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and f"in use by pid {first.pid}" in line
        assert first.poll() is None  # the holder goes on
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert [m["step"] for m in read_metrics(run_dir)] == sorted(m["step"] for m in read_metrics(run_dir))


def test_auto_resume_with_another_config_is_refused_and_the_run_keeps_its_labels(tmp_path):
    run_dir = tmp_path / "run"
    done = cli(*FAST, "trainer.max_steps=2", "trainer.batch_size=4", "logger=none", run_dir=run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    before = {p: (run_dir / p).read_bytes() for p in ("summary.json", ".hydra/config.yaml", ".hydra/overrides.yaml")}
    changed = cli(*FAST, "trainer.max_steps=2", "trainer.batch_size=4", "logger=none", "peft.r=8", run_dir=run_dir)
    assert changed.returncode == 2
    line = changed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "peft.r: 16 → 8" in line
    assert {p: (run_dir / p).read_bytes() for p in before} == before
    again = cli(*FAST, "trainer.max_steps=2", "trainer.batch_size=4", "logger=none", run_dir=run_dir)
    assert again.returncode == 0 and {p: (run_dir / p).read_bytes() for p in before} == before  # done: untouched


# ---- kills ------------------------------------------------------------------------------------------------------

KILL_DURING_SAVE = """
import os, sys, torch
real_save, step = torch.save, int(os.environ["KILL_AT_STEP"])
def save_then_die(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    if str(path).endswith("state.pt") and f"step-{step}" in str(path):
        with open(path, "r+b") as f:  # the process dies while the file is half written
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), 9)
torch.save = save_then_die
sys.argv = ["train.py", *sys.argv[1:]]
import runpy
runpy.run_path("train.py", run_name="__main__")
"""

RESUMED = [*FAST, "trainer.max_steps=12", "trainer.batch_size=8", "trainer.save_every=2", "peft.dropout=0.1",
           "trainer.keep_checkpoints=3", "logger=none"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return step_losses(train_run(tmp_path_factory.mktemp("full") / "run", RESUMED))


@pytest.mark.parametrize("kill_at", [2, 6, 10])
def test_sigkill_during_a_save_resumes_exactly(tmp_path, uninterrupted, kill_at):
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *RESUMED, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env={**ENV, "KILL_AT_STEP": str(kill_at)}, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "summary.json").exists()
    train_run(run_dir, [*RESUMED, "trainer.resume=auto"])
    resumed = step_losses(run_dir)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 13))
    assert max(abs(resumed[s] - uninterrupted[s]) for s in uninterrupted) <= 1e-6


def test_a_deleted_latest_checkpoint_falls_back_and_never_restarts_from_zero(tmp_path, uninterrupted, capsys):
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *RESUMED, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env={**ENV, "KILL_AT_STEP": "8"}, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    newest = checkpoint.step_dirs(run_dir / "checkpoints")[-1]
    (newest / "state.pt").unlink()
    train_run(run_dir, [*RESUMED, "trainer.resume=auto"])
    assert "state.pt missing" in capsys.readouterr().err
    resumed = step_losses(run_dir)
    assert max(abs(resumed[s] - uninterrupted[s]) for s in uninterrupted) <= 1e-6


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGUSR2, 143)], ids=["ctrl-c", "usr2"])
def test_ctrl_c_and_usr2_checkpoint_the_current_step(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    process = cli(*LONG, run_dir=run_dir, wait=False)
    assert wait_for(lambda: (run_dir / "checkpoints" / "latest").exists() or process.poll() is not None)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code and "Traceback" not in stderr, stderr[-2000:]
    stopped_at = checkpoint.step_of(checkpoint.find("auto", run_dir))
    assert stopped_at == max(step_losses(run_dir)) and not (run_dir / "summary.json").exists()


def test_a_stop_during_the_base_evaluation_leaves_a_resumable_directory(tmp_path, monkeypatch):
    """SIGTERM while the starting model is evaluated: exit 143, no checkpoint and no summary, and the same command
    then runs the whole run from step 0 in that directory."""
    from peftlab.evaluation import Evaluator

    real_call = Evaluator.__call__

    def stopped_midway(self, model, prefix):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler records it; the evaluation goes on to its end
        return real_call(self, model, prefix)

    monkeypatch.setattr(Evaluator, "__call__", stopped_midway)
    overrides = [*FAST, "trainer.max_steps=3", "trainer.batch_size=4", "trainer.eval_base=true"]
    with pytest.raises(SystemExit) as stopped:
        train_run(tmp_path / "run", overrides)
    assert stopped.value.code == 143
    run_dir = tmp_path / "run"
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists()
    monkeypatch.setattr(Evaluator, "__call__", real_call)
    train_run(run_dir, overrides)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert sorted(step_losses(run_dir)) == [1, 2, 3]
