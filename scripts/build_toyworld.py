"""Build the toy world: data files, the shared tokenizer and the three tiny pretrained checkpoints.

    python scripts/build_toyworld.py                  # everything (4-5 min a model on one idle CPU thread)
    python scripts/build_toyworld.py --skip-pretrain  # data files only (+ tokenizer files into existing model dirs)

Outputs (all deterministic, fixed seeds):
    data/toy/*.jsonl                      see peftlab.toyworld.build.write_datasets
    assets/models/tiny_{qwen,llama,mistral}/   config, generation_config, model.safetensors (fp32), tokenizer files

The checkpoints are pretrained on raw text only (peftlab.toyworld.build.pretraining_corpus): they can add and subtract
("37 + 45 =" -> " 82") but have never seen the chat layout or the reply format, so in ChatML they score about 0
until SFT teaches the format.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from peftlab.toyworld import build as toyworld  # noqa: E402

SEED = 0
VOCAB_SIZE = 512
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tiny shapes: under 3 MB of fp32 weights each (Qwen2 ties its embeddings, the other two do not).
ARCH = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, max_position_embeddings=256, rms_norm_eps=1e-6)
# name: (config class, model class, config extras, init seed). Mistral without a sliding window computes exactly
# what Llama does, so it gets its own init seed to be a different model and not a copy.
MODELS = {
    "tiny_qwen": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, use_sliding_window=False), SEED),
    "tiny_llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False), SEED),
    "tiny_mistral": (MistralConfig, MistralForCausalLM, dict(tie_word_embeddings=False, sliding_window=None), SEED + 1),
}

# Pretraining recipe. One idle CPU thread does about 10k tokens/s: a step of 16 x 128 tokens takes ~0.17 s.
# Raw-format accuracy stays near 0 for ~1000 steps and then jumps to ~1.0 within a few hundred steps, at a step
# that moves with the architecture and the corpus. To leave the base models good but not perfect (room for RL),
# training stops at the first check where accuracy on calibration facts (never task_eval) reaches TARGET_ACCURACY.
SEQ_LEN, BATCH, MAX_STEPS, LR, WARMUP, WEIGHT_DECAY = 128, 16, 2400, 3e-3, 100, 0.1
TARGET_ACCURACY, CHECK_EVERY, N_CALIBRATION = 0.85, 50, 300


def world_texts(data_dir: Path, corpus: list[str]) -> list[str]:
    """Every string of the world (corpus + all data file fields), for the tokenizer's round-trip check."""
    texts = list(corpus)
    for path in sorted(data_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Digits one by one (so numbers are digit sequences the model can do arithmetic on), then byte-level BPE.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=EOT, extra_special_tokens=[IM_START],
        model_max_length=ARCH["max_position_embeddings"], clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def check_tokenizer(tok, texts: list[str]) -> None:
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == t, f"round trip failed: {t!r}"
    assert tok.unk_token_id is None
    for i in range(10):
        assert tok.convert_ids_to_tokens(tok(f"1{i}", add_special_tokens=False)["input_ids"]) == ["1", str(i)]


def check_reload(out: Path, tok, texts: list[str]) -> None:
    """The saved directory must give the same ids through AutoTokenizer. (transformers 5 loads a "qwen2" directory
    as Qwen2Tokenizer, which rebuilds the pre-tokenizer from Qwen's regex; on the world's text it splits the same.)"""
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"], f"{out.name}: AutoTokenizer splits differently"
    chat = [{"role": "user", "content": texts[0]}]
    assert loaded.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def build_model(name: str, tok) -> torch.nn.Module:
    config_cls, model_cls, extra, init_seed = MODELS[name]
    config = config_cls(
        vocab_size=len(tok), bos_token_id=tok.convert_tokens_to_ids(EOT), eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **ARCH, **extra,
    )
    torch.manual_seed(init_seed)
    model = model_cls(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=64,
    )
    return model


def token_stream(docs: list[list[int]], eot: int, rng: random.Random) -> list[int]:
    order = list(range(len(docs)))
    rng.shuffle(order)
    out: list[int] = []
    for i in order:
        out += docs[i] + [eot]
    return out


def batches(docs: list[list[int]], eot: int, rng: random.Random):
    """Endless (B, SEQ_LEN + 1) batches of packed corpus text; the documents are reshuffled every epoch."""
    block = SEQ_LEN + 1
    while True:
        stream = token_stream(docs, eot, rng)
        blocks = [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]
        rng.shuffle(blocks)
        for i in range(0, len(blocks) - BATCH + 1, BATCH):
            yield torch.tensor(blocks[i : i + BATCH])


@torch.no_grad()
def raw_accuracy(model, tok, facts, generate: bool = False) -> float:
    """Accuracy of the bare format: "\n37 + 45 =" -> " 82" then a newline.

    Statements are lines in the corpus, so the prompt starts with a newline (as it does after "assistant\n" in
    ChatML); at position 0 with no context at all the tiny models are much worse.

    generate=False scores teacher-forced argmax over the answer tokens (equal to greedy exact match, and fast);
    generate=True runs real greedy decoding.
    """
    model.eval()
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    correct = 0
    for i in range(0, len(facts), 100):
        chunk = facts[i : i + 100]
        prompts = [tok("\n" + toyworld.statement(f).rsplit(" ", 1)[0], add_special_tokens=False)["input_ids"] for f in chunk]
        if generate:
            width = max(map(len, prompts))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
            mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for f, o in zip(chunk, out[:, width:]):
                text = tok.decode(o, skip_special_tokens=True).split("\n")[0].strip()
                correct += text == str(toyworld.fact_result(f))
        else:
            answers = [tok(f" {toyworld.fact_result(f)}", add_special_tokens=False)["input_ids"] + nl for f in chunk]
            full = [p + a for p, a in zip(prompts, answers)]
            width = max(map(len, full))
            ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in full])
            pred = model(input_ids=ids).logits.argmax(-1)  # (B, L)
            for b, (p, a) in enumerate(zip(prompts, answers)):
                got = pred[b, len(p) - 1 : len(p) - 1 + len(a)].tolist()
                correct += got == a
    model.train()
    return correct / len(facts)


def calibration_facts(seed: int = SEED) -> list:
    """Facts to decide when to stop pretraining: a fixed sample that shares nothing with task_eval."""
    held_out = set(toyworld.split_facts(seed)["task_eval"])
    facts = [f for f in toyworld.all_facts() if f not in held_out]
    return random.Random(seed + 3).sample(facts, N_CALIBRATION)


def pretrain(name: str, tok, corpus: list[str], eval_facts) -> dict:
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    model = build_model(name, tok)
    n_params = sum(p.numel() for p in model.parameters())
    # Every document ends with the end-of-turn token, so its embedding is trained (see pretraining_corpus).
    docs = [tok(d + IM_END, add_special_tokens=False)["input_ids"] for d in corpus]
    eot = tok.convert_tokens_to_ids(EOT)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    # Linear warm-up, then cosine down to 10% of the peak.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / WARMUP if s < WARMUP else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - WARMUP) / (MAX_STEPS - WARMUP)))
    )
    model.train()
    calib = calibration_facts()
    t0, it, loss_avg = time.time(), batches(docs, eot, rng), None
    for step in range(1, MAX_STEPS + 1):
        x = next(it)
        logits = model(input_ids=x[:, :-1]).logits  # (B, L, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % CHECK_EVERY == 0:
            acc = raw_accuracy(model, tok, calib)
            if step % 250 == 0 or acc >= TARGET_ACCURACY:
                print(f"  [{name}] step {step:5d}  loss {loss_avg:.3f}  calibration raw acc {acc:.3f}  "
                      f"{time.time() - t0:.0f}s", flush=True)
            if acc >= TARGET_ACCURACY:
                break
    seconds = time.time() - t0
    acc = raw_accuracy(model, tok, eval_facts, generate=True)
    return dict(model=model, params=n_params, seconds=seconds, steps=step, raw_accuracy=acc, final_loss=loss_avg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-pretrain", action="store_true", help="write data (+ tokenizer into existing model dirs)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(SEED)

    data_dir, model_root = ROOT / "data" / "toy", ROOT / "assets" / "models"
    counts = toyworld.write_datasets(data_dir, seed=SEED)
    (ROOT / "data" / "lm_eval" / "toy_arith" / "toy_arith.jsonl").write_text(toyworld.toy_arith_jsonl(seed=SEED))
    corpus = toyworld.pretraining_corpus(seed=SEED)
    texts = world_texts(data_dir, corpus)
    # The tokenizer learns its merges from the corpus alone, so editing a data file (its reply styles, its pairs)
    # leaves the tokenizer, and hence the pretrained checkpoints, unchanged; byte-level BPE encodes any text.
    tok = build_tokenizer(corpus)
    check_tokenizer(tok, texts)
    eval_facts = toyworld.split_facts(SEED)["task_eval"]

    report = []
    for name in args.models:
        out = model_root / name
        if args.skip_pretrain:
            if out.exists():
                tok.save_pretrained(out)
                check_reload(out, tok, texts)
            continue
        print(f"pretraining {name} ...", flush=True)
        r = pretrain(name, tok, corpus, eval_facts)
        out.mkdir(parents=True, exist_ok=True)
        r["model"].save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        check_reload(out, tok, texts)
        mb = (out / "model.safetensors").stat().st_size / 1e6
        report.append(f"  {name:13s} {r['params'] / 1e6:.3f}M params  {mb:.2f} MB  {r['steps']} steps {r['seconds']:.0f}s  "
                      f"loss {r['final_loss']:.3f}  raw-format accuracy (held-out, greedy) {r['raw_accuracy']:.3f}")

    print("\n== toy world ==")
    for f, n in counts.items():
        print(f"  data/toy/{f:20s} {n:5d} rows  {(data_dir / f).stat().st_size / 1e3:7.1f} kB")
    print(f"  tokenizer: vocab {len(tok)}, corpus {len(corpus)} documents, "
          f"{sum(len(tok(d, add_special_tokens=False)['input_ids']) for d in corpus)} tokens")
    print("\n".join(report))


if __name__ == "__main__":
    main()
