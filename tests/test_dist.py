"""Several processes on CPU: `torchrun --nproc_per_node=2 train.py dist=ddp|zero2|zero3` against one process.

2 ranks × grad_accum a must see the same micro-batches as 1 process × grad_accum 2a (peftlab.loop.Batches) and
weight them by their share of the step's tokens (or pairs) across ranks, so per-step losses and the saved adapter
must match the single-process run's. DDP adds and halves the two ranks' gradients, which is exact in floating
point: we ask for agreement to 1e-6. DeepSpeed sums in its own order (flat buffers, reduce-scatter, its own
clipping norm), which we measured at ~3e-7 on the losses and up to ~4e-5 on adapter weights of magnitude ~0.1
after 4 steps (Adam turns tiny gradient differences into update differences): we ask for 1e-5 and 2e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, REPO, compose, read_metrics, step_losses, train_run
from peftlab import dist
from peftlab.errors import ConfigError

COMMON = [*FAST, "trainer.max_steps=4", "trainer.save_every=0", "peft=lora", "peft.dropout=0.0"]
# DPO's reference forward runs every step through the wrapped model (adapter disabled): the path where DDP or
# DeepSpeed could interfere, unlike log-probs precomputed before the model is wrapped.
ALGOS = {"sft": ["algo=sft", "trainer.batch_size=4"],
         "dpo": ["algo=dpo", "trainer.batch_size=2", "algo.precompute_ref=false"]}
TOLERANCE = {  # (per-step loss, adapter weight): max absolute difference from the single-process run
    "ddp": (1e-6, 1e-6),
    "zero2": (1e-5, 2e-4),
    "zero3": (1e-5, 2e-4),
}


def torchrun(*overrides: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 train.py ...` (standalone: a free rendezvous port, so runs of
    other jobs on this machine cannot collide with ours)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    # DeepSpeed compiles its shared-memory collective op once into this cache (about a minute the first time).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "peftlab" / "torch_extensions"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "train.py", *overrides]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def largest_difference(a: dict[str, float | torch.Tensor], b: dict[str, float | torch.Tensor]) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max(float(torch.as_tensor(a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process with grad_accum 2 (the 2-process runs use 1), per algo, run once per module."""
    runs = {}

    def get(algo: str) -> Path:
        if algo not in runs:
            run_dir = tmp_path_factory.mktemp(f"single-{algo}") / "run"
            runs[algo] = train_run(run_dir, [*COMMON, *ALGOS[algo], "trainer.grad_accum=2"])
        return runs[algo]

    return get


def check_matches_single_process(run_dir: Path, reference: Path, strategy: str) -> tuple[float, float]:
    losses, expected = step_losses(run_dir), step_losses(reference)
    assert sorted(losses) == sorted(expected) == [1, 2, 3, 4]
    loss_difference = largest_difference(losses, expected)
    weights, expected_weights = adapter_weights(run_dir), adapter_weights(reference)
    assert all(weights[k].shape == expected_weights[k].shape for k in expected_weights)  # not empty ZeRO-3 shards
    weight_difference = largest_difference(weights, expected_weights)
    print(f"{strategy}: per-step loss max |diff| {loss_difference:.3g}, adapter max |diff| {weight_difference:.3g}")
    loss_tolerance, weight_tolerance = TOLERANCE[strategy]
    assert loss_difference <= loss_tolerance, f"{strategy}: per-step losses differ by up to {loss_difference}"
    assert weight_difference <= weight_tolerance, f"{strategy}: adapter weights differ by up to {weight_difference}"
    return loss_difference, weight_difference


def test_ddp_sft_matches_one_process_and_shares_one_run_dir(tmp_path, single_process):
    """DDP over gloo, 2 ranks: same losses and adapter as one process with twice the accumulation; one run
    directory even when each rank's Hydra names its own (a microsecond timestamp differs between ranks), and only
    rank 0 writes the log."""
    root = tmp_path / "outputs"
    torchrun("dist=ddp", *COMMON, *ALGOS["sft"], "trainer.grad_accum=1", f"output_root={root}",
             "hydra.run.dir=${output_root}/${now:%H-%M-%S-%f}")
    run_dirs = [p for p in root.iterdir()]
    assert len(run_dirs) == 1, f"expected one run directory, found {sorted(p.name for p in run_dirs)}"
    run_dir = run_dirs[0]
    assert [m["step"] for m in read_metrics(run_dir) if "train/loss" in m] == [1, 2, 3, 4]  # no rank-1 copies
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dist"] == "ddp" and summary["processes"] == 2
    check_matches_single_process(run_dir, single_process("sft"), "ddp")


@pytest.mark.slow
@pytest.mark.parametrize("strategy,algo", [("ddp", "dpo"), ("zero2", "sft"), ("zero2", "dpo"), ("zero3", "sft"),
                                           ("zero3", "dpo")])
def test_two_processes_match_one_process(tmp_path, single_process, strategy, algo):
    run_dir = tmp_path / "run"
    torchrun(f"dist={strategy}", *COMMON, *ALGOS[algo], "trainer.grad_accum=1", f"hydra.run.dir={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dist"] == strategy and summary["processes"] == 2
    # DeepSpeed really ran: its own checkpoint, one optimizer shard per rank
    shards = sorted((run_dir / "checkpoints" / "step-4").glob("deepspeed/*/*optim_states.pt"))
    assert len(shards) == (2 if strategy.startswith("zero") else 0)
    check_matches_single_process(run_dir, single_process(algo), strategy)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])  # zero2 saves and loads through the same DeepSpeed calls
def test_resume_under_two_processes_continues_exactly(tmp_path, strategy):
    """A 6-step run checkpoints at step 3; a second run resumed from that checkpoint logs the same losses for steps
    4-6 and saves the same adapter (weights, optimizer state and each rank's RNG travel with the checkpoint)."""
    overrides = [f"dist={strategy}", *FAST, "trainer.max_steps=6", "trainer.save_every=3", *ALGOS["sft"],
                 "peft.dropout=0.1"]  # dropout on: each rank's RNG stream must be restored too
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun(*overrides, f"hydra.run.dir={full}")
    assert (full / "checkpoints" / "step-3").exists()
    torchrun(*overrides, f"hydra.run.dir={resumed}", f"trainer.resume={full / 'checkpoints' / 'step-3'}")
    expected, got = step_losses(full), step_losses(resumed)
    assert sorted(got) == [4, 5, 6]
    assert largest_difference(got, {s: expected[s] for s in got}) <= 1e-6
    assert largest_difference(adapter_weights(resumed), adapter_weights(full)) <= 1e-6


def test_two_ranks_see_the_batches_of_one_process_with_double_accumulation():
    """Step by step, the union of both ranks' micro-batches is the single process's, across epoch boundaries too
    (37 examples make an odd number of batches of 4 per epoch)."""
    from peftlab.loop import Batches

    examples, batch_size, accum = list(range(37)), 4, 3
    one = Batches(examples, batch_size, seed=0)
    ranks = [Batches(examples, batch_size, seed=0, rank=r, world=2) for r in range(2)]
    for step in range(8):  # 8 steps × 6 micro-batches = 48 batches > 5 epochs of 9
        single = [one(step * 2 * accum + i) for i in range(2 * accum)]
        both = [rank(step * accum + i) for rank in ranks for i in range(accum)]
        assert sorted(map(sorted, single)) == sorted(map(sorted, both)), step
        assert all(len(b) == batch_size for b in both)


def test_a_checkpoint_resumes_only_under_a_launch_that_can_load_it(tmp_path):
    """DeepSpeed shards need DeepSpeed and as many processes as wrote them; a plain checkpoint is not DeepSpeed's."""
    from types import SimpleNamespace

    from peftlab.checkpoint import check_resumable

    def launch(deepspeed: bool, processes: int):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=object() if deepspeed else None),
                               num_processes=processes)

    zero, plain = tmp_path / "zero" / "step-3", tmp_path / "plain" / "step-3"
    (zero / "deepspeed").mkdir(parents=True)
    plain.mkdir(parents=True)
    for rank in range(2):
        (zero / f"rng-{rank}.pt").touch()
        (plain / f"rng-{rank}.pt").touch()
    check_resumable(zero, launch(deepspeed=True, processes=2))
    check_resumable(plain, launch(deepspeed=False, processes=4))  # DDP/single: any number of processes
    with pytest.raises(ConfigError, match="written with DeepSpeed"):
        check_resumable(zero, launch(deepspeed=False, processes=2))
    with pytest.raises(ConfigError, match="written without DeepSpeed"):
        check_resumable(plain, launch(deepspeed=True, processes=2))
    with pytest.raises(ConfigError, match="resume it with 2 processes, not 4"):
        check_resumable(zero, launch(deepspeed=True, processes=4))


def test_deepspeed_config_follows_trainer_and_dist_keys():
    cfg, _ = compose(["dist=zero3", "trainer.batch_size=3", "trainer.grad_accum=5", "trainer.max_grad_norm=0.5",
                      "+dist.deepspeed.zero_optimization.overlap_comm=true"])
    config = dist.deepspeed_config(cfg.dist, cfg.trainer, bf16=False)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 5
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": False}
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True}  # dist.deepspeed merged, stage kept


@pytest.mark.parametrize("overrides,world,needs_reference,message", [
    (["dist=single"], "2", False, "dist=single but 2 processes"),
    (["dist=zero3", "peft=qlora"], "1", False, "not supported"),
    (["dist=zero3", "peft=none"], "1", True, "reference model"),
    (["dist=zero2", "dist.offload_params=true"], "1", False, "zero_stage=3"),
    (["dist=zero2", "trainer.optimizer=adamw8bit"], "1", False, "trainer.optimizer=adamw8bit"),
], ids=["single-under-torchrun", "zero3-qlora", "zero3-full-reference", "zero2-param-offload", "zero2-bnb-optim"])
def test_unsupported_combinations_fail_with_one_line(monkeypatch, overrides, world, needs_reference, message):
    monkeypatch.setenv("WORLD_SIZE", world)
    cfg, _ = compose(overrides)
    with pytest.raises(ConfigError, match=message) as error:
        dist.check(cfg.dist, peft_cfg=cfg.peft, optimizer=cfg.trainer.optimizer, needs_reference=needs_reference)
    assert "\n" not in str(error.value)


def test_supported_combinations_pass_the_checks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for overrides, needs_reference in ((["dist=ddp"], True), (["dist=zero2", "peft=qlora"], True),
                                       (["dist=zero3", "peft=dora"], True), (["dist=zero3", "peft=none"], False)):
        cfg, _ = compose(overrides)
        dist.check(cfg.dist, peft_cfg=cfg.peft, optimizer=cfg.trainer.optimizer, needs_reference=needs_reference)


GATHER_SCRIPT = """
import json, sys
import torch.distributed as d
from peftlab.dist import gather_lists
d.init_process_group("gloo")
rank = d.get_rank()
with open(f"{sys.argv[1]}/{rank}.json", "w") as f:
    json.dump(gather_lists([rank, 10 * rank + 1]), f)
d.destroy_process_group()
"""


def test_gather_lists_gives_every_rank_all_ranks_values(tmp_path):
    """safe_dpo's λ is driven by every rank's sampled costs: each rank must see the same, full list."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    gathered = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert gathered == [[0, 1, 1, 11], [0, 1, 1, 11]]
    assert dist.gather_lists([3, 4]) == [3, 4]  # one process: unchanged
