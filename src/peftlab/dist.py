"""Processes and how the model is spread over them: the `dist=` group (single, ddp, zero2, zero3).

    python train.py                                                   # dist=single: one process
    torchrun --nproc_per_node=2 train.py dist=ddp                     # data parallel (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=2 train.py dist=zero3                   # DeepSpeed ZeRO-3 through accelerate

Every strategy is an `accelerate.Accelerator`; DeepSpeed gets a config dict built from the dist keys and the trainer
keys it must agree with (micro-batch, accumulation, clipping, precision), so there is no separate DeepSpeed JSON.
The optimizer stays the torch one the loop builds: DeepSpeed's fused/CPU Adam would compile C++ ops on first use.
"""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

from peftlab.errors import ConfigError
from peftlab.sampling import unwrap

STRATEGIES = ("single", "ddp", "deepspeed")


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, deepspeed) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check(d, *, peft_cfg, optimizer: str, needs_reference: bool) -> None:
    """One-line ConfigErrors for the `dist` (d) combinations we do not support, checked before any weight loads.

    Needs the peft group (ZeRO-3 cannot shard 4-bit weights), the optimizer (DeepSpeed takes torch's AdamW only)
    and whether the algorithm needs a reference model (a frozen full copy cannot be a ZeRO-3 shard)."""
    if d.strategy not in STRATEGIES:
        raise ConfigError(f"dist.strategy={d.strategy}: choose one of {', '.join(STRATEGIES)}")
    if d.strategy == "single" and launched_processes() > 1:
        raise ConfigError(f"dist=single but {launched_processes()} processes were launched: "
                          "pass dist=ddp, dist=zero2 or dist=zero3")
    if d.strategy != "deepspeed":
        return
    if d.zero_stage not in (2, 3):
        raise ConfigError(f"dist.zero_stage={d.zero_stage}: use 2 or 3")
    if optimizer != "adamw":
        raise ConfigError(f"trainer.optimizer={optimizer} under DeepSpeed (dist.strategy=deepspeed): "
                          "only trainer.optimizer=adamw is supported")
    if d.offload_params and d.zero_stage != 3:
        raise ConfigError("dist.offload_params=true needs dist.zero_stage=3 (ZeRO-2 keeps whole weights on each rank)")
    if d.zero_stage == 3 and peft_cfg.quantize and peft_cfg.method != "none":
        raise ConfigError(f"peft={peft_cfg.method} (4/8-bit base) with dist=zero3 is not supported: "
                          "use dist=zero2 or dist=ddp")
    if d.zero_stage == 3 and peft_cfg.method == "none" and needs_reference:
        raise ConfigError("peft=none with an algorithm that needs a reference model is not supported under "
                          "dist=zero3 (the frozen copy would be a shard): use an adapter or dist=zero2")


def deepspeed_config(d, t, bf16: bool) -> dict:
    """The DeepSpeed config of a run: dist keys (d) + the trainer keys (t) DeepSpeed must agree with (micro-batch,
    accumulation, clipping) + dist.deepspeed."""
    zero = {"stage": int(d.zero_stage)}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": int(t.batch_size),
        # engine.backward divides each micro-batch's loss by this, as accelerator.backward does without DeepSpeed
        "gradient_accumulation_steps": int(t.grad_accum),
        "gradient_clipping": float(t.max_grad_norm or 0.0),
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the loop's torch AdamW: nothing to compile
        "zero_force_ds_cpu_optimizer": False,  # ...even with optimizer offload (slower than CPUAdam, but no build)
        "steps_per_print": 10**9,  # the loop logs; DeepSpeed's own step prints are noise
    }
    if not d.deepspeed:
        return config
    return OmegaConf.to_container(OmegaConf.merge(config, d.deepspeed), resolve=True)  # nested keys merge, not replace


def gather_lists(values: list) -> list:
    """Every rank's `values` concatenated in rank order: the same list on every rank (`values` with one process).

    For per-rank Python figures that must agree across ranks, e.g. the sampled costs that move safe_dpo's λ.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(values))
    return [v for part in parts for v in part]


def broadcast(value, accelerator):
    """Rank 0's `value` on every rank (a picklable object; `value` itself with one process)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_accelerator(d, t, bf16: bool):
    """The Accelerator for the `dist` group d and the trainer group t (accumulation; DeepSpeed's batch keys).
    The process group is created here, so call it before anything collective."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    kwargs = {}
    if d.strategy == "ddp":
        unused = bool(d.find_unused_parameters)
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=unused)]
    if d.strategy == "deepspeed":
        # DeepSpeed wants ranks in the environment (else it tries MPI); `python train.py dist=zero2` is a world of 1.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        # accelerate only treats the run as DeepSpeed (and every rank as part of one world) when told so by the
        # environment and when the process group exists first; on CPU that group must be gloo (DeepSpeed's ccl
        # backend is not installed).
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(cpu=not cuda, backend=None if cuda else "gloo")
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(d, t, bf16))
    accelerator = Accelerator(
        cpu=not cuda and d.strategy != "deepspeed",  # cpu=True would switch DeepSpeed off; the device is the CPU anyway
        mixed_precision="bf16" if bf16 else "no",
        # sync_gradients (DDP's all-reduce, DeepSpeed's optimizer step) on the last micro-batch of each step only
        gradient_accumulation_steps=int(t.grad_accum),
        # accelerate would step the scheduler once per process per optimizer step; the loop steps it once
        step_scheduler_with_optimizer=False,
        **kwargs,
    )
    if d.strategy == "deepspeed":
        # With a ZeRO-3 config registered, transformers builds every model already sharded (deepspeed.zero.Init),
        # which breaks merging a starting adapter into the base and validation's meta-device models. Build whole
        # on each rank instead; `prepare` registers the config again and shards.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return accelerator


def prepare(accelerator, *objects):
    """accelerator.prepare, with the DeepSpeed config registered again for transformers and peft: generation
    then keeps ZeRO-3 ranks in step (synced_gpus) and DoRA gathers the sharded weights it needs."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.set_deepspeed_weakref()
    return accelerator.prepare(*objects)


def uses_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def is_zero3(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def gathered(params, accelerator):
    """Under ZeRO-3 each rank holds a shard of every weight: inside this context they are whole (collective)."""
    if not is_zero3(accelerator):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def trainable_state(model, accelerator) -> dict[str, torch.Tensor]:
    """Full-size CPU copies of the trainable weights, by name; every rank must call it under ZeRO-3."""
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    with gathered([p for _, p in named], accelerator):
        return {n: p.detach().cpu().clone() for n, p in named}


def shared_run_dir(own: Path, accelerator) -> Path:
    """Rank 0's run directory, on every rank.

    Hydra names a run directory by the instant its process started (`${now:...}`), so ranks that started a second
    apart name different ones and Hydra has already created each. Rank 0's wins; another rank's own directory
    (only Hydra's .hydra/ and log inside) is removed so that no stray run is left behind.
    """
    if accelerator.num_processes == 1:
        return own
    from accelerate.utils import broadcast_object_list

    chosen = Path(broadcast_object_list([str(own)], from_process=0)[0])
    if chosen.resolve() != own.resolve():
        shutil.rmtree(own, ignore_errors=True)
        try:
            own.parent.rmdir()  # the date directory, if this rank alone created it (a run across midnight)
        except OSError:
            pass
    return chosen
