"""python -m peftlab.bench end to end on a tiny model, and packing (SFT and DPO) against the padded computation.

No timing assertions: timings belong to the bench's output, not to tests.
"""

from __future__ import annotations

import csv
import math

import torch

from conftest import algorithm, compose, live_policy, set_up
from peftlab import losses
from peftlab.bench import report, runners, workloads
from peftlab.bench.__main__ import parse_args
from peftlab.logprobs import lm_logits
from peftlab.data import load_splits
from peftlab.models import Reference

CPU = torch.device("cpu")


def test_bench_runs_ours_and_trl_and_writes_csv_and_markdown(tmp_path):
    args = parse_args(["--model", "qwen2-tiny", "--seq-len", "64", "--peft", "dora", "--algo", "sft,dpo,grpo",
                             "--trl", "default", "--steps", "1", "--warmup", "1", "--batch-size", "2",
                             "--num-generations", "2", "--max-new-tokens", "8", "--out", str(tmp_path)])
    report.write_results(runners.run_all(args), tmp_path, args, "python -m peftlab.bench ...")

    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == report.CSV_COLUMNS
    runs = {(r["algo"], r["peft"], r["tool"], r["setting"]) for r in rows}
    assert runs == {(a, "dora", t, "default") for a in ("sft", "dpo", "grpo") for t in ("ours", "trl")}
    for r in rows:
        assert float(r["step_s"]) > 0 and float(r["tokens_per_step"]) > 0 and float(r["peak_mem_mb"]) > 0
    for algo in ("sft", "dpo"):  # same rows, same chat template: both tools train on the same tokens
        ours, trl = (next(r for r in rows if (r["algo"], r["tool"]) == (algo, tool)) for tool in ("ours", "trl"))
        assert ours["tokens_per_step"] == trl["tokens_per_step"]

    table = (tmp_path / "bench.md").read_text()
    assert "| algo | peft | ours µs/token | TRL default µs/token | ours / TRL default |" in table
    assert "| grpo | dora |" in table


def test_markdown_gives_ratios_to_trl_and_dora_to_lora():
    args = parse_args(["--peft", "lora,dora", "--algo", "sft"])
    figures = {"steps": 5, "tokens_per_step": 100, "tokens_per_s": 1.0, "peak_mem_mb": 1.0, "mfu": None,
               "threads": 1, "device": "cpu"}
    results = [{**figures, "algo": "sft", "peft": peft, "tool": tool, "setting": setting, "step_s": step_s,
                "us_per_token": step_s * 1e4}
               for peft, tool, setting, step_s in (("lora", "ours", "default", 1.0), ("lora", "trl", "default", 2.0),
                                                   ("lora", "trl", "best", 1.25), ("dora", "ours", "default", 1.1))]
    table = report.markdown(results, args, "cmd")
    assert "| sft | lora | 10000.0 | 20000.0 | 0.50 | 12500.0 | 0.80 |" in table
    assert "| sft | 1.10 | 1.10 |" in table


def test_synthetic_rows_have_varied_lengths_within_the_sequence_budget():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workloads.TOKENIZER_DIR)
    rows = workloads.synthetic_rows("sft", 40, tokenizer, 256, 64, seed=0)
    lengths = [len(e["input_ids"]) for e in algorithm(["model.max_length=10000"]).build_examples(rows)]
    assert max(lengths) <= 256 and min(lengths) >= 48 and max(lengths) - min(lengths) > 100


def sft_examples(n: int = 12):
    cfg, _ = compose(["logger=none"])
    _, tokenizer, policy = live_policy(["logger=none"])
    rows = load_splits(cfg.data, "sft", 0).train
    padded, packed = algorithm(packing=False), algorithm(packing=True)
    set_up(packed, policy)
    return policy, padded, packed, padded.build_examples(rows[:n])


def test_sft_packing_gives_the_padded_loss_and_gradients():
    policy, padded, packed, examples = sft_examples()
    a, b = padded.collate(examples), packed.collate(examples)
    assert b["input_ids"].shape == (1, int(a["attention_mask"].sum()))  # one row, no padding
    assert padded.num_items(a) == packed.num_items(b)

    grads = []
    for algo, batch in ((padded, a), (packed, b)):
        policy.zero_grad()
        loss, _ = algo.loss(policy, batch)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in policy.parameters() if p.requires_grad]))
    (loss_padded, grad_padded), (loss_packed, grad_packed) = grads
    assert abs(loss_padded - loss_packed) < 1e-5
    assert max((x - y).abs().max().item() for x, y in zip(grad_padded, grad_packed)) < 1e-5

    # The check can fail: the same row without restarting position ids attends across sequences.
    leaky = {"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])}
    leaky_loss, _ = losses.sft_loss(lm_logits(policy, leaky), b["labels"])
    assert abs(leaky_loss.item() - loss_padded) > 1e-3


def test_sft_packing_trains():
    policy, _, packed, examples = sft_examples(8)
    policy.train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    batch = packed.collate(examples)
    first = None
    for _ in range(8):
        loss, _ = packed.loss(policy, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 0.1


def test_dpo_packing_gives_the_padded_log_probs_and_reference():
    cfg, tokenizer, policy = live_policy(["logger=none", "algo=dpo"])
    rows = load_splits(cfg.data, "preference", 0).train
    reference = Reference(policy, "lora")
    padded = set_up(algorithm(["algo=dpo"], packing=False, precompute_ref=False), policy, reference)
    packed = set_up(algorithm(["algo=dpo"], packing=True, precompute_ref=False), policy, reference)
    examples = padded.build_examples(rows[:6])
    a, b = padded.collate(examples), packed.collate(examples)
    assert b["input_ids"].shape[0] == 1 and padded.num_items(a) == packed.num_items(b) == 6
    assert torch.allclose(padded.answer_logps(policy, a), packed.answer_logps(policy, b), atol=1e-4)
    assert torch.allclose(padded.reference_logps(a), packed.reference_logps(b), atol=1e-4)
    loss_padded, _ = padded.loss(policy, a)
    loss_packed, _ = packed.loss(policy, b)
    assert abs(loss_padded.item() - loss_packed.item()) < 1e-5
    assert abs(loss_padded.item() - math.log(2)) > 1e-4  # a live adapter: policy ≠ reference, so the check bites
