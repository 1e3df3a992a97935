"""W&B offline files carry the run's name, group, tags, flattened config and summary; logger=none writes none."""

from __future__ import annotations

import json

import pytest

from conftest import compose, read_metrics, train_run
from peftlab.tracking import read_offline_run

RUN = ["eval=none", "trainer.eval_base=false", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.log_every=1"]


def offline_run(run_dir) -> dict:
    """The run's offline W&B record. wandb's service may still be writing the file after run.finish() returns
    (seen on a process's first run); its teardown waits for it."""
    import wandb

    wandb.teardown()
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    return read_offline_run(files[0])


def test_wandb_offline_run_files(tmp_path):
    run_dir = train_run(tmp_path / "run", ["logger=wandb", "peft.r=8", "peft.alpha=16", *RUN])
    run = offline_run(run_dir)
    assert run["name"] == "peft.r=8,peft.alpha=16," + ",".join(RUN)
    assert run["group"] == "tiny_qwen-sft-lora"
    assert {"tiny_qwen", "sft", "lora"} <= set(run["tags"])
    config = run["config"]
    assert config["peft.r"] == 8 and config["peft.alpha"] == 16 and config["peft"] == "lora"
    assert config["algo"] == "sft" and config["model"] == "tiny_qwen" and config["trainer.max_steps"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run["summary"]["train/loss"] == summary["train/loss"]
    assert run["summary"]["trainable_params"] == summary["trainable_params"]
    logged = [h for h in run["history"] if "train/loss" in h]
    assert [h["train/loss"] for h in logged] == [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


def test_logger_none_writes_no_wandb_files(tmp_path):
    run_dir = train_run(tmp_path / "run", ["logger=none", *RUN])
    assert not (run_dir / "wandb").exists()
    lines = read_metrics(run_dir)
    assert [m["step"] for m in lines if "train/loss" in m] == [1, 2]
    assert "eval/loss" in lines[-1]


def test_sweep_group_is_the_sweep_directorys_date_and_time():
    from peftlab.tracking import sweep_group

    assert sweep_group("outputs/multirun/2026-11-22/09-00-06") == "2026-11-22_09-00-06"
    assert sweep_group("/runs/rank_sweep") == "runs_rank_sweep"
    assert sweep_group("rank_sweep") == "rank_sweep"


def test_effective_alpha_follows_the_ratio():
    from omegaconf import OmegaConf

    from peftlab.adapters import effective_alpha, lora_config

    assert effective_alpha(OmegaConf.create({"r": 8, "alpha": 16, "alpha_ratio": None})) == 16
    peft_cfg = compose(["peft.r=8", "peft.alpha=64", "peft.alpha_ratio=4"])[0].peft
    assert effective_alpha(peft_cfg) == 32  # the ratio replaces alpha
    assert lora_config(peft_cfg, "qwen2").lora_alpha == 32


def test_wandb_config_and_summary_carry_the_effective_alpha(tmp_path):
    run_dir = train_run(tmp_path / "run", ["logger=wandb", "peft.r=8", "peft.alpha_ratio=4", *RUN])
    run = offline_run(run_dir)
    assert run["name"] == "peft.r=8,peft.alpha_ratio=4," + ",".join(RUN)
    assert run["config"]["peft.alpha"] == 32 and run["config"]["peft.alpha_ratio"] == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["alpha"] == 32 and run["summary"]["alpha"] == 32
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 32


def offline_tracker(run_dir, mode="offline"):
    from omegaconf import OmegaConf

    from peftlab.tracking import WandbTracker

    logger_cfg = OmegaConf.create({"backend": "wandb", "mode": mode, "project": "peftlab-test", "entity": None})
    return WandbTracker(logger_cfg, run_dir, config={"peft.r": 8}, name="samples-test", group="g", tags=[])


def test_log_samples_writes_samples_jsonl_and_wandb_tables(tmp_path):
    from peftlab.tracking import RunLog

    runlog = RunLog(tmp_path, offline_tracker(tmp_path))
    runlog.log_samples([{"prompt": "2+2?", "answer": "5"}], step=0, prefix="base")
    runlog.log({"eval/accuracy": 0.5}, step=2)
    runlog.log_samples([{"prompt": "2+2?", "answer": "4", "correct": True, "reward": 1.0},
                        {"prompt": "3+3?", "answer": "7", "correct": False, "reward": float("nan")}], step=2)
    runlog.close()
    runlog.tracker.finish()

    lines = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert lines == [{"step": 0, "prefix": "base", "prompt": "2+2?", "answer": "5"},
                     {"step": 2, "prefix": "eval", "prompt": "2+2?", "answer": "4", "correct": True, "reward": 1.0},
                     {"step": 2, "prefix": "eval", "prompt": "3+3?", "answer": "7", "correct": False, "reward": None}]
    run = offline_run(tmp_path)
    assert run["tables"]["samples/base"] == [{"step": 0, "columns": ["prompt", "answer"], "data": [["2+2?", "5"]]}]
    assert run["tables"]["samples/eval"] == [{"step": 2, "columns": ["prompt", "answer", "correct", "reward"],
                                              "data": [["2+2?", "4", True, 1.0], ["3+3?", "7", False, None]]}]


def test_resume_drops_samples_past_the_checkpoint(tmp_path):
    from peftlab.tracking import NullTracker, RunLog

    runlog = RunLog(tmp_path, NullTracker())
    for step in (2, 4):
        runlog.log({"train/loss": 1.0}, step=step)
        runlog.log_samples([{"prompt": "p", "answer": f"a{step}"}], step=step)
    runlog.close()
    RunLog(tmp_path, NullTracker(), resume_step=2).close()
    assert [json.loads(l)["answer"] for l in (tmp_path / "samples.jsonl").read_text().splitlines()] == ["a2"]
    assert [m["step"] for m in read_metrics(tmp_path)] == [2]


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No W&B credentials anywhere and no settings file: a machine where nobody ran `wandb login`."""
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.chdir(tmp_path)  # no workspace settings file either
    return tmp_path


def logger(mode="online", backend="wandb"):
    from omegaconf import OmegaConf

    return OmegaConf.create({"backend": backend, "mode": mode})


def test_wandb_mode_environment_wins(no_wandb_login, monkeypatch):
    from peftlab.tracking import wandb_mode

    assert wandb_mode(logger("online")) == ("online", "logger.mode=online")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(logger("online")) == ("offline", "WANDB_MODE=offline")
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode(logger("offline")) == ("offline", "WANDB_MODE=dryrun")


def test_tracker_says_when_wandb_mode_overrides_logger_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    offline_tracker(tmp_path, mode="online").finish()
    assert capsys.readouterr().err.splitlines() == [
        "W&B mode offline from WANDB_MODE=offline, which wins over logger.mode=online (unset WANDB_MODE to use "
        "logger.mode)"]
    assert offline_run(tmp_path)["name"] == "samples-test"  # an offline run, written on disk


def test_online_without_credentials_is_one_line_with_the_fix(no_wandb_login, monkeypatch):
    from peftlab.tracking import check_wandb_online
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        check_wandb_online(logger("online"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("logger.mode=online: no W&B credentials for api.wandb.ai")
    assert "`wandb login`" in message and "logger.mode=offline" in message
    monkeypatch.setenv("WANDB_MODE", "online")  # online because of the environment: the fix is there
    with pytest.raises(ConfigError, match=r"^WANDB_MODE=online: .*`wandb login`, or unset WANDB_MODE"):
        check_wandb_online(logger("offline"))


@pytest.mark.parametrize("mode,backend,env", [("offline", "wandb", None), ("disabled", "wandb", None),
                                              ("online", "none", None), ("online", "wandb", "offline")])
def test_guard_is_silent_unless_the_run_goes_online(no_wandb_login, monkeypatch, mode, backend, env):
    from peftlab.tracking import check_wandb_online

    if env:
        monkeypatch.setenv("WANDB_MODE", env)
    check_wandb_online(logger(mode, backend))


def test_credentials_as_wandb_finds_them(no_wandb_login, monkeypatch):
    from peftlab.tracking import wandb_base_url, wandb_credentials

    netrc = no_wandb_login / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_base_url() == "https://api.wandb.ai" and wandb_credentials(wandb_base_url()) == str(netrc)
    assert wandb_credentials("https://wandb.example.com") is None  # an entry for another server does not count
    (no_wandb_login / "wandb-config").mkdir()
    (no_wandb_login / "wandb-config" / "settings").write_text("[default]\nbase_url = https://wandb.example.com\n")
    assert wandb_base_url() == "https://wandb.example.com"  # where `wandb login --host` writes it
    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080/")
    assert wandb_base_url() == "http://localhost:8080"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_credentials("http://localhost:8080") == "WANDB_API_KEY"


def test_guard_checks_the_server_answers(no_wandb_login, monkeypatch):
    import socket
    import threading

    from peftlab import tracking
    from peftlab.errors import ConfigError

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        tracking.check_wandb_online(logger("online"))  # listening: fine
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")  # closed now
    with pytest.raises(ConfigError, match=rf"^logger.mode=online: the W&B server 127.0.0.1:{port} is unreachable"):
        tracking.check_wandb_online(logger("online"))

    never = threading.Event()

    def hang(*args, **kwargs):  # a name server that does not answer
        never.wait()
        raise OSError("released by the test")

    monkeypatch.setattr(tracking.socket, "create_connection", hang)
    with pytest.raises(ConfigError, match=r"unreachable \(no answer within 0.2 s\).*logger.mode=offline"):
        tracking.check_wandb_online(logger("online"), timeout_s=0.2)
    never.set()


def test_train_online_without_credentials_ends_in_one_line(no_wandb_login):
    """`python train.py logger.mode=online` on a machine without a W&B login: exit 2, one error line, before any
    weight loads, and no run directory left behind."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "logger.mode=online",
                             f"output_root={no_wandb_login / 'out'}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    errors = [l for l in result.stderr.splitlines() if l.startswith("error")]
    assert errors == [l for l in result.stderr.splitlines() if "W&B" in l or "wandb" in l]
    assert len(errors) == 1 and errors[0].startswith("error: logger.mode=online: no W&B credentials")
    assert "trainable of" not in result.stdout  # stopped before the model was built
    assert not [p for p in (no_wandb_login / "out").rglob("*") if p.is_file()]
