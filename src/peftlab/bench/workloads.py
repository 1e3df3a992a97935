"""What the benchmark measures on: random-weight models (a bench shape, or a public model's exact architecture
from scripts/make_arch_checkpoint.py) and synthetic rows of realistic lengths."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from peftlab import REPO_ROOT

TOKENIZER_DIR = REPO_ROOT / "assets" / "models" / "tiny_qwen"  # the shipped byte-level BPE
ARCH_SCRIPT = REPO_ROOT / "scripts" / "make_arch_checkpoint.py"
DEFAULT_ARCH_DIR = Path("/tmp/bench-arch")  # where exact-architecture checkpoints are written once and reused

# Qwen2-architecture shapes built from a config with random weights (the vocabulary is the tokenizer's unless set).
MODEL_PRESETS = {
    "qwen2-50m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                      num_key_value_heads=4),
    "qwen2-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),  # for tests: seconds per run
}

WORDS = ("the cat sat on a mat while seven birds sang about rivers and stones near old red houses where people "
         "count apples add numbers write short notes ask careful questions answer them kindly refuse harmful "
         "requests explain simple facts about water light time music maps trains bread and small green hills").split()


def save_random_model(preset: str, out_dir: Path, seed: int, vocab_size: int | None = None) -> Path:
    """A Qwen2ForCausalLM of `preset`'s shape with seeded random weights and the shipped tokenizer, saved to out_dir."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    shape = dict(MODEL_PRESETS[preset])
    shape["vocab_size"] = vocab_size or shape.get("vocab_size", len(tokenizer))
    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def arch_script():
    """scripts/make_arch_checkpoint.py as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("make_arch_checkpoint", ARCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arch_presets() -> list[str]:
    return list(arch_script().PRESETS)


def arch_checkpoint(preset: str, root: Path = DEFAULT_ARCH_DIR) -> Path:
    """root/<preset>: a random-weight bf16 checkpoint with the public model's exact config, written on first use.

    The tokenizer is written last (make_arch_checkpoint.write_checkpoint), so its files mark a complete checkpoint.
    """
    out_dir = Path(root) / preset
    if not (out_dir / "tokenizer_config.json").exists():
        arch_script().write_checkpoint(preset, out_dir)
    return out_dir


def resolve_model(name: str, work_dir: Path, seed: int, vocab_size: int | None = None,
                  arch_dir: Path = DEFAULT_ARCH_DIR) -> Path:
    """--model → a checkpoint directory: a directory as it is, a bench shape (MODEL_PRESETS) saved into work_dir,
    or a public architecture (make_arch_checkpoint's presets) written once into arch_dir."""
    if Path(name).is_dir():
        return Path(name)
    if name in MODEL_PRESETS:
        return save_random_model(name, Path(work_dir) / "model", seed, vocab_size)
    if name in arch_presets():
        return arch_checkpoint(name, arch_dir)
    raise ValueError(f"--model {name}: not a directory, a bench shape ({', '.join(MODEL_PRESETS)}) or an "
                     f"architecture preset ({', '.join(arch_presets())})")


def random_text(generator: torch.Generator, num_tokens: int, word_tokens: dict[str, int]) -> str:
    """Random words whose token count (each word with its leading space) adds up to about `num_tokens`."""
    words, count = [], 0
    while count < num_tokens:
        word = WORDS[int(torch.randint(len(WORDS), (1,), generator=generator))]
        words.append(word)
        count += word_tokens[word]
    return " ".join(words)


def chat_overhead(tokenizer) -> int:
    """Tokens the chat template adds around one user turn and one assistant turn."""
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    ids = tokenizer.apply_chat_template(turns, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def synthetic_rows(algo: str, num_rows: int, tokenizer, seq_len: int, max_new_tokens: int, seed: int,
                   full_length: bool = False) -> list[dict]:
    """Canonical rows (peftlab.data.schemas) of random words with realistic, varied lengths.

    prompt + answer spans seq_len/4 to seq_len tokens (uniform: 64-256 at 256), the prompt taking 20-60% of it, so
    a padded batch wastes about a third of its positions, as real data does. DPO: chosen and rejected get
    independent lengths. GRPO: prompts of seq_len/8 to seq_len - max_new_tokens tokens (the completion is sampled).
    `full_length` (SFT, DPO): every sequence fills the budget (the chat template included) and a pair's answers
    are equally long, so memory at a given sequence length is measured at that length.
    """
    generator = torch.Generator().manual_seed(seed)
    word_tokens = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in WORDS}
    overhead = chat_overhead(tokenizer)

    def uniform(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    def split_lengths() -> tuple[int, int]:
        longest = seq_len - overhead - 4  # a word may run a few tokens past its target
        total = longest if full_length else uniform(seq_len // 4, longest)
        prompt = int(total * (0.2 + 0.4 * float(torch.rand((), generator=generator))))
        return prompt, total - prompt

    rows = []
    for _ in range(num_rows):
        if algo == "grpo":
            prompt = random_text(generator, uniform(seq_len // 8, seq_len - max_new_tokens - overhead), word_tokens)
            rows.append({"prompt": [{"role": "user", "content": prompt}], "answer": "-"})  # unused by its reward
            continue
        prompt_len, answer_len = split_lengths()
        prompt = [{"role": "user", "content": random_text(generator, prompt_len, word_tokens)}]
        if algo == "sft":
            rows.append({"prompt": prompt, "completion": random_text(generator, answer_len, word_tokens)})
        else:  # dpo: two answers to the prompt, each within the sequence budget
            rejected_len = answer_len if full_length else uniform(8, max(8, seq_len - overhead - 4 - prompt_len))
            rows.append({"prompt": prompt, "chosen": random_text(generator, answer_len, word_tokens),
                         "rejected": random_text(generator, rejected_len, word_tokens)})
    return rows


def completion_length_reward(completions, **kwargs) -> list[float]:
    """A GRPO reward with spread inside every group (TRL's reward signature): characters of the answer / 100."""
    return [len(c[-1]["content"] if isinstance(c, list) else c) / 100 for c in completions]


def write_rows(rows: list[dict], path: Path) -> Path:
    """Rows as a jsonl file, so our runs read them through data.path like any user's data."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
