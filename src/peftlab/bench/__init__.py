"""Throughput and memory: our training step against TRL's trainer for the same job, in one process.

    python -m peftlab.bench                                       # qwen2-50m, seq 256, lora,dora × sft,dpo,grpo
    python -m peftlab.bench --algo sft --peft lora --steps 3 --out /tmp/bench

For each algo and peft, in this process:

    ours         train.py's builders (tokenizer, algo, policy, reference, algo.setup) and `peftlab.loop.train`
                 itself: the step that runs is the step a run runs, with the repo's default algo settings
    TRL default  SFTTrainer / DPOTrainer / GRPOTrainer with its defaults (gradient checkpointing on, ...)
    TRL best     its fastest settings for the job: SFT packing (best-fit decreasing, padding-free rows), DPO
                 precomputed reference log-probs, both with gradient checkpointing off (as ours); GRPO: defaults only

with the same weights (a random-init model saved once, loaded fresh by each run), the same rows, batch, sequence
length, LoRA config (peftlab.adapters.lora_config), learning rate and precision (fp32 on CPU, bf16 on GPU), the
same torch thread count and seed. The runs of one algo (every peft, ours and TRL) live in threads that take turns
one optimizer step at a time (`Turns`): a shared machine's changing load then falls on all of them alike. Each
does `--warmup` steps (the first also holds its setup), then `--steps` timed ones.

Measured per optimizer step: wall time (time.perf_counter) from receiving the turn to the end of the optimizer
step (data, forward, backward, optimizer), and trained tokens = non-padding tokens fed to the forward with
gradients (prompt + answer; for GRPO prompt + sampled completion). Reported: medians over the timed steps of the
step time and of the time per trained token, peak memory during the run's own steps (GPU: max allocated; CPU: the
process's resident high-water mark, reset at each turn, which includes the other runs' resident weights) and, on a
GPU, MFU. Results: <out>/bench.csv (one row per run) and <out>/bench.md (ours vs TRL per peft × algo, and DoRA's
step time vs LoRA's).

Layout: `workloads` (the models and rows measured), `harness` (turn-taking, step clocks, memory, FLOPs),
`runners` (ours through peftlab.build.build_run and peftlab.loop.train; TRL's trainers), `report` (CSV and
markdown), `__main__` (the command line).
"""
