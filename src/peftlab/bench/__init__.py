"""Throughput and memory: our training step against TRL's trainer for the same job, in one process.

    python -m peftlab.bench                                       # qwen2-50m, seq 256, lora,dora × sft,dpo,grpo
    python -m peftlab.bench --algo sft --peft lora --steps 3 --out /tmp/bench
    python -m peftlab.bench --suite scale [--quick] [--parts compare,seqlen,qlora] --out /tmp/scale

For each algo and peft, in this process:

    ours         train.py's builders (tokenizer, algo, policy, reference, algo.setup) and `peftlab.loop.train`
                 itself: the step that runs is the step a run runs, with the repo's default algo settings
    TRL default  SFTTrainer / DPOTrainer / GRPOTrainer with its defaults (gradient checkpointing on, ...)
    TRL best     its fastest settings for the job: SFT packing (best-fit decreasing, padding-free rows), DPO
                 precomputed reference log-probs, both with the gradient checkpointing our memory policy picks for
                 the job (trainer.gradient_checkpointing=auto); GRPO: defaults only
    TRL liger    best + use_liger_kernel=True, on a GPU with liger-kernel installed (Triton); elsewhere not run

with the same weights (a random-init model saved once, loaded fresh by each run), the same rows, batch, sequence
length, LoRA config (peftlab.adapters.lora_config), learning rate and precision (fp32 on CPU, bf16 on GPU), the
same torch thread count and seed. The runs of one algo (every peft, ours and TRL) live in threads that take turns
one optimizer step at a time (`Turns`): a shared machine's changing load then falls on all of them alike. Each
does `--warmup` steps (the first also holds its setup), then `--steps` timed ones.

Measured per optimizer step: wall time (time.perf_counter, after torch.cuda.synchronize on a GPU) from receiving
the turn to the end of the optimizer step (data, forward, backward, optimizer), and trained tokens = non-padding
tokens fed to the forward with gradients (prompt + answer; for GRPO prompt + sampled completion). Reported: medians over the timed steps of the
step time and of the time per trained token, peak memory during the run's own steps (GPU: max allocated; CPU: the
process's resident high-water mark, reset at each turn, which includes the other runs' resident weights) and, on a
GPU, MFU. Results: <out>/bench.csv (one row per run) and <out>/bench.md (ours vs TRL per peft × algo, and DoRA's
step time vs LoRA's).

--model takes a bench shape (qwen2-50m, qwen2-tiny: a Qwen2 body, the toy tokenizer's vocabulary), a public
architecture of scripts/make_arch_checkpoint.py (qwen2.5-1.5b, llama-3.2-1b, ...: its exact config, random bf16
weights written once into --arch-dir) or a checkpoint directory.

--suite scale (peftlab.bench.scale) measures at real sizes instead: ours vs TRL on the Qwen2.5-0.5B architecture,
peak memory against sequence length, QLoRA on Llama-3.2-1B and Mistral-7B-v0.3, each memory figure from a process
of its own; results in <out>/scale.csv and <out>/scale.md (with the issue's targets met or missed).

Layout: `workloads` (the models and rows measured), `harness` (turn-taking, step clocks, memory, FLOPs),
`runners` (ours through peftlab.build.build_run and peftlab.loop.train; TRL's trainers), `scale` (the suite:
memory runs in their own processes, timing groups), `report` (CSV and markdown), `environment` (versions, for
scripts/gpu_check.sh), `__main__` (the command line).
"""
