"""python -m peftlab.bench end to end on a tiny model (the default comparison and --suite scale --quick),
scripts/gpu_check.sh --dry-run, and packing (SFT and DPO) against the padded computation.

No timing assertions: timings belong to the bench's output, not to tests.
"""

from __future__ import annotations

import csv
import math
import subprocess

import pytest
import torch

from conftest import REPO, algorithm, compose, live_policy, set_up
from peftlab import losses
from peftlab.bench import isolated, report, runners, scale, workloads
from peftlab.bench.__main__ import main, parse_args
from peftlab.logprobs import lm_logits
from peftlab.data import load_splits
from peftlab.models import Reference

CPU = torch.device("cpu")


@pytest.mark.slow  # whole bench runs (TRL included): the fast suite keeps the report and grouping tests
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


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # whole bench runs (TRL included): the fast suite keeps the report and grouping tests
def test_scale_suite_quick_end_to_end(tmp_path):
    """Every part on the tiny 152k-vocabulary model: files, columns, each memory run's figures from its own
    process, ours and TRL on the same tokens, the timing runs, the Liger row, and the report's tables."""
    main(["--suite", "scale", "--quick", "--out", str(tmp_path), "--arch-dir", str(tmp_path / "arch")])

    rows = read_csv(tmp_path / "scale.csv")
    assert list(rows[0]) == report.SCALE_COLUMNS
    memory = [r for r in rows if r["measure"] == "memory" and not r["status"].startswith("not run")]
    assert {r["part"] for r in memory} == {"compare", "seqlen", "qlora"}
    for r in memory:
        assert r["status"] == "ok", r
        assert min(float(r[k]) for k in ("load_peak_mb", "train_peak_mb", "sampled_peak_mb", "tokens_total")) > 0
        assert float(r["peak_mb"]) == max(float(r["load_peak_mb"]), float(r["train_peak_mb"]))
    runs = {("ours", "default"), ("trl", "default"), ("trl", "best")}
    for algo in ("sft", "dpo"):
        compared = [r for r in memory if r["part"] == "compare" and r["algo"] == algo]
        assert {(r["tool"], r["setting"]) for r in compared} == runs
        assert len({r["tokens_total"] for r in compared}) == 1, compared  # the same tokens, both tools
        timed = [r for r in rows if r["measure"] == "time" and r["algo"] == algo]
        assert {(r["tool"], r["setting"]) for r in timed} == runs
        assert len({r["tokens_total"] for r in timed}) == 1 and all(float(r["us_per_token"]) > 0 for r in timed)
    liger = [r for r in rows if r["setting"] == "liger"]
    assert len(liger) == 2 and all(r["status"].startswith("not run: ") for r in liger)
    assert {(int(r["seq_len"]), r["tool"]) for r in memory if r["part"] == "seqlen"} == \
        {(n, tool) for n in scale.QUICK.seq_lens for tool in ("ours", "trl")}
    assert {(r["peft"], int(r["seq_len"])) for r in memory if r["part"] == "qlora"} == \
        {("lora", scale.QUICK.qlora_small_seq), ("qlora", scale.QUICK.qlora_small_seq),
         ("qlora", scale.QUICK.qlora_large_seq)}
    # the large QLoRA run trains in bf16 (QLoRA's compute dtype); everything else in auto's fp32 on CPU
    assert {(r["part"], int(r["seq_len"]), r["precision"]) for r in memory if r["part"] == "qlora"} == \
        {("qlora", scale.QUICK.qlora_small_seq, "float32"), ("qlora", scale.QUICK.qlora_large_seq, "bfloat16")}
    assert {r["precision"] for r in memory if r["part"] != "qlora"} == {"float32"}

    table = (tmp_path / "scale.md").read_text()
    for expected in ("load average", "cores", "## Ours vs TRL", "## Peak memory against sequence length",
                     "## QLoRA", "| sft | ours |", "| dpo | TRL best |", "(≤ 0.6)", "(≤ 0.8)", "not run: Liger"):
        assert expected in table
    (tmp_path / "scale.md").unlink()  # --render makes the same report again from scale.json
    main(["--suite", "scale", "--render", "--out", str(tmp_path)])
    assert (tmp_path / "scale.md").read_text() == table


@pytest.mark.slow  # whole bench runs (TRL included): the fast suite keeps the report and grouping tests
def test_a_memory_run_in_a_fresh_process_and_one_stopped_at_the_limit(tmp_path):
    """The full suite's path: `python -m peftlab.bench --one SPEC` in a new interpreter reports its figures; a run
    whose resident memory passes the limit is stopped and recorded as such."""
    model_dir = workloads.arch_checkpoint("tiny-qwen-152k", tmp_path / "arch")
    spec = {"part": "qlora", "algo": "sft", "peft": "lora", "tool": "ours", "setting": "default",
            "model": "tiny-qwen-152k", "model_dir": str(model_dir), "seq_len": 32, "batch_size": 1, "warmup": 1,
            "steps": 1, "threads": 1, "seed": 0, "precision": "auto", "malloc_mmap_threshold": 2**20}
    stopped = isolated.run_isolated([spec], tmp_path / "logs", limit_mb=64, jobs=1, needed_mb=0)
    assert next(iter(stopped.values()))["status"].startswith("stopped: resident memory passed the 64 MB limit")
    [figures] = isolated.run_isolated([spec], tmp_path / "logs", limit_mb=8192, jobs=1, needed_mb=0).values()
    assert figures["status"] == "ok" and figures["tokens_per_step"] > 0
    assert figures["peak_mb"] >= figures["load_peak_mb"] > figures["start_mb"] > 0


def test_timing_groups_fit_the_budget_else_pairs_else_single_runs():
    ours, default, best = ("lora", "ours", "default"), ("lora", "trl", "default"), ("lora", "trl", "best")
    figures = {run: {"start_mb": 500, "held_mb": held, "train_peak_mb": peak}
               for run, held, peak in ((ours, 2500, 4000), (default, 2600, 7000), (best, 2600, 5000))}
    runs = [ours, default, best]
    # all three: 500 + (2000 + 2100 + 2100) held + 4400 (TRL default's step); ours + default 9000; ours + best 7000
    assert scale.timing_groups(runs, figures, budget_mb=11_100) == [runs]
    assert scale.timing_groups(runs, figures, budget_mb=9_000) == [[ours, default], [ours, best]]
    assert scale.timing_groups(runs, figures, budget_mb=8_000) == [[ours], [default], [ours, best]]


def test_scale_report_gives_the_ratios_against_their_targets():
    def memory(tool, setting, peak):
        return {"part": "compare", "measure": "memory", "algo": "sft", "peft": "lora", "tool": tool,
                "setting": setting, "status": "ok", "peak_mb": peak, "load_peak_mb": 100.0, "train_peak_mb": peak,
                "checkpointing": True, "tokens_per_step": 2040}

    def timed(tool, setting, us, group):
        return {"part": "compare", "measure": "time", "algo": "sft", "peft": "lora", "tool": tool, "setting": setting,
                "us_per_token": us, "step_s": 1.0, "group": group}

    group = "ours + trl default + trl best"
    rows = [memory("ours", "default", 3000.0), memory("trl", "default", 6000.0), memory("trl", "best", 2000.0),
            timed("ours", "default", 900.0, group), timed("trl", "default", 1000.0, group),
            timed("trl", "best", 600.0, group)]
    lines = report.compare_tables(rows, {"sizes": scale.FULL, "limit_mb": 12288.0})
    assert "| sft | 0.50 met (≤ 0.6) | 0.90 missed (≤ 0.8) | 1.50 | 1.50 |" in lines
    assert "| sft | ours | on | 2040 | 3000 (100 / 3000) | 900 | 1.0 | ours + trl default + trl best |" in lines


def test_gpu_check_dry_run_names_each_part(tmp_path):
    out = tmp_path / "gpu_check"
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for expected in ("environment", "gpu-tests", "pytest -m gpu tests/test_gpu.py", "mfu",
                     "--model qwen2.5-1.5b --seq-len 2048", "--peft lora,none", "ours-vs-trl", "--parts compare",
                     "qlora-7b", "--parts qlora", str(out / "gpu_check_report.md")):
        assert expected in result.stdout, expected
    assert not out.exists()  # a dry run writes nothing


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
