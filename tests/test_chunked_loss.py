"""The chunked LM-head path (`losses.chunked_token_logprobs`, `logprobs.token_logps`) against today's full-logits path.

Each test computes the same objective twice on the same model and batch, once with the full (B, T, V) logits
(`chunk_size=None`: the model's logits, then `losses.token_logprobs`) and once chunked, and checks that values and
gradients agree within 1e-5 (fp32). Models are built here directly (transformers configs, the shipped tiny_qwen,
peft.get_peft_model), not through peftlab.models or the algorithms.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen2Config

from peftlab import losses
from peftlab.data.format import IGNORE, collate_lm, collate_packed
from peftlab.logprobs import enable_packed_sdpa, lm_logits, token_logps

from conftest import REPO

TINY_QWEN = REPO / "assets" / "models" / "tiny_qwen"
LARGE_VOCAB = 151_936  # Qwen2.5's vocabulary
TOL = {"atol": 1e-5, "rtol": 1e-5}


# ----------------------------------------------------------------------------------------------------------------------
# Models and batches
# ----------------------------------------------------------------------------------------------------------------------


def large_vocab_model(**config) -> torch.nn.Module:
    """A 2-layer Qwen2 with hidden 64 and Qwen2.5's vocabulary (tied embeddings), random weights."""
    torch.manual_seed(0)
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=LARGE_VOCAB, tie_word_embeddings=True,
                    max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(Qwen2Config(**{**settings, **config}))


def tiny_qwen(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(TINY_QWEN, dtype=torch.float32, **kwargs)


def with_lora(model, **lora) -> torch.nn.Module:
    """LoRA r8 on all linear layers, B initialised non-zero so that every adapter weight has a gradient."""
    torch.manual_seed(1)
    settings = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, LoraConfig(**{**settings, **lora}))


def vocab_of(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def sequences(vocab: int, shapes: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    """Examples as `encode_prompt_completion` makes them: (prompt length, completion length) → input_ids and
    labels (IGNORE on the prompt)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for prompt, completion in shapes:
        ids = torch.randint(1, vocab, (prompt + completion,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return examples


def left_padded_rollouts(vocab: int, prompt_lengths: list[int], completion_lengths: list[int], seed: int = 0):
    """A GRPO-style batch: left-padded prompts then right-padded completions, position ids counting real tokens."""
    generator = torch.Generator().manual_seed(seed)
    width_p, width_c = max(prompt_lengths), max(completion_lengths)
    ids = torch.randint(1, vocab, (len(prompt_lengths), width_p + width_c), generator=generator)
    mask = torch.zeros_like(ids)
    for row, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        mask[row, width_p - p: width_p + c] = 1
    ids = ids.masked_fill(mask == 0, 0)
    completion_mask = mask[:, width_p:].bool()  # (N, C)
    completion_ids = ids[:, width_p:]
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0)}
    labels = completion_ids.masked_fill(~completion_mask, IGNORE)  # (N, C)
    labels = torch.cat([torch.full_like(labels[:, :1], IGNORE), labels], dim=1)  # (N, C + 1): position P-1 first
    return batch, labels, width_c


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def value_and_grads(model, objective):
    """objective() → (scalar to differentiate, dict of tensors to compare); returns (those tensors, the gradients)."""
    model.zero_grad(set_to_none=True)
    scalar, values = objective()
    scalar.backward()
    grads = [p.grad.clone() for p in trainable(model)]
    return {k: v.detach() for k, v in values.items()}, grads


def assert_same(plain, chunked):
    plain_values, plain_grads = plain
    chunked_values, chunked_grads = chunked
    assert plain_values.keys() == chunked_values.keys()
    for key in plain_values:
        torch.testing.assert_close(chunked_values[key], plain_values[key], **TOL, msg=lambda m: f"{key}: {m}")
    assert len(plain_grads) == len(chunked_grads) > 0
    assert any(g.abs().max() > 0 for g in plain_grads), "a test whose gradients are all zero proves nothing"
    for index, (a, b) in enumerate(zip(plain_grads, chunked_grads)):
        torch.testing.assert_close(b, a, **TOL, msg=lambda m: f"gradient {index}: {m}")


def sft_objective(model, batch, chunk_size):
    def objective():
        logps, mask, _ = token_logps(model, batch, chunk_size=chunk_size)
        loss, num_tokens = losses.sft_loss_from_logps(logps, mask)
        return loss, {"loss": loss, "logps": logps, "mask": mask, "num_tokens": num_tokens}
    return objective


def compare_sft(model, batch, chunk_size):
    assert_same(value_and_grads(model, sft_objective(model, batch, None)),
                value_and_grads(model, sft_objective(model, batch, chunk_size)))


# ----------------------------------------------------------------------------------------------------------------------
# The pure function
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 23, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("head_trains", [True, False], ids=["trainable-head", "frozen-head"])
def test_chunked_token_logprobs_equals_token_logprobs_of_the_full_logits(chunk_size, temperature, head_trains):
    """Values, mask, entropy and the gradients w.r.t. the hidden states and (when it trains) the head's weight and
    bias, for chunk sizes that do and do not divide the 23 labelled positions, and with a temperature; both
    strategies (recomputed chunks for a trainable head, gradients taken in the forward for a frozen one)."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50).requires_grad_(head_trains)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = IGNORE  # prompt
    labels[1, 8:] = IGNORE  # padding
    labels[2, :2] = IGNORE
    upstream = torch.randn(3, 10)  # a different gradient for every token, as DPO and GRPO give them

    def run(chunked: bool):
        hidden.grad, head.weight.grad, head.bias.grad = None, None, None
        head_grads = (lambda: (head.weight.grad.clone(), head.bias.grad.clone())) if head_trains else tuple
        if chunked:
            logps, mask, entropy = losses.chunked_token_logprobs(hidden, head, labels, chunk_size=chunk_size,
                                                                 temperature=temperature, with_entropy=True)
        else:
            logits = head(hidden) / temperature
            logps, mask = losses.token_logprobs(logits, labels)
            entropy = losses.next_token_entropy(logits[:, :-1]).masked_fill(~mask, 0.0)
        (logps * upstream).sum().backward()
        return logps.detach(), mask, entropy, hidden.grad.clone(), *head_grads()

    plain, chunked = run(False), run(True)
    assert int(plain[1].sum()) == 23
    assert chunked[2].requires_grad is False
    for a, b in zip(plain, chunked):
        torch.testing.assert_close(b, a, **TOL)
    assert (chunked[0][~chunked[1]] == 0).all() and (chunked[2][~chunked[1]] == 0).all()


def test_chunked_token_logprobs_without_labels_still_backpropagates_zeros():
    """A micro-batch with no label (all prompt) gives zeros and a backward that reaches every parameter, as the
    plain path does; DDP needs every parameter's gradient hook to fire."""
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30)
    labels = torch.full((2, 5), IGNORE)
    logps, mask, entropy = losses.chunked_token_logprobs(hidden, head, labels, chunk_size=4, with_entropy=True)
    loss, num_tokens = losses.sft_loss_from_logps(logps, mask)
    loss.backward()
    assert int(num_tokens) == 0 and loss.item() == 0.0 and not mask.any() and (entropy == 0).all()
    assert head.weight.grad is not None and (head.weight.grad == 0).all() and (hidden.grad == 0).all()


def test_chunked_token_logprobs_under_no_grad_is_the_same():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 9, 8), torch.nn.Linear(8, 40)
    labels = torch.randint(0, 40, (2, 9))
    labels[:, :3] = IGNORE
    with torch.no_grad():
        chunked, mask, _ = losses.chunked_token_logprobs(hidden, head, labels, chunk_size=5)
        plain, _ = losses.token_logprobs(head(hidden), labels)
    torch.testing.assert_close(chunked, plain, **TOL)
    assert int(mask.sum()) == 12


def test_auto_chunk_size_rule():
    budget = 256 * 2**20
    # small vocabularies keep the plain path; exactly at the budget still fits
    assert losses.auto_chunk_size(1000, 8 * 512, budget) is None
    assert losses.auto_chunk_size(1024, budget // (4 * 1024), budget) is None
    # Qwen2.5 at 2 × 1,024 tokens: 1.2 GB of logits → balanced chunks within the budget
    chunk = losses.auto_chunk_size(LARGE_VOCAB, 2048, budget)
    assert chunk is not None and chunk * 4 * LARGE_VOCAB <= budget
    num_chunks = -(-2048 // chunk)
    assert num_chunks == -(-2048 // (budget // (4 * LARGE_VOCAB)))  # no more chunks than the budget forces
    assert (num_chunks - 1) * chunk < 2048  # the last chunk is not empty ...
    assert 2048 - (num_chunks - 1) * chunk >= chunk - num_chunks  # ... and about as large as the others
    # a budget below one row still gives chunks of one row
    assert losses.auto_chunk_size(LARGE_VOCAB, 10, budget_bytes=100) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Model level: SFT, DPO, GRPO on a large vocabulary and on the shipped tiny_qwen
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_lora():
    return with_lora(large_vocab_model())


def test_sft_cross_entropy_padded_batch_large_vocab(large_lora):
    """Completion-only labels and right padding, LoRA r8 all-linear on a 151,936-token vocabulary."""
    batch = collate_lm(sequences(LARGE_VOCAB, [(6, 20), (10, 9), (3, 30)]), pad_id=0)
    compare_sft(large_lora, batch, chunk_size=16)


def test_plain_path_of_token_logps_is_todays_path(large_lora):
    """chunk_size=None is exactly lm_logits → token_logprobs (what SFT and DPO compute now)."""
    for batch in (collate_lm(sequences(LARGE_VOCAB, [(4, 8), (2, 12)]), pad_id=0),
                  collate_packed(sequences(LARGE_VOCAB, [(4, 8), (2, 12)]))):
        with torch.no_grad():
            logps, mask, _ = token_logps(large_lora, batch, chunk_size=None)
            today, today_mask = losses.token_logprobs(lm_logits(large_lora, batch), batch["labels"])
        assert torch.equal(logps, today) and torch.equal(mask, today_mask)


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_packed"])
def test_dpo_sequence_logps_padded_and_packed(attention):
    """Summed completion log-probs of chosen/rejected pairs: padded (`sequence_logps`) and packed
    (`packed_sequence_logps`) from the full logits against the sums of the chunked per-token output, through a DPO
    loss (per-sequence gradients); packed and padded also agree with each other."""
    model = with_lora(large_vocab_model())
    if attention == "sdpa_packed":
        enable_packed_sdpa(model)
    pairs = sequences(LARGE_VOCAB, [(5, 11), (5, 7), (9, 14), (9, 4)])  # chosen, rejected, chosen, rejected
    padded, packed = collate_lm(pairs, pad_id=0), collate_packed(pairs)
    reference = torch.tensor([-11.0, -11.5, -12.0, -13.0]) * 8

    def dpo(sums):
        losses_per_pair, _, _ = losses.dpo_loss(sums[0::2], sums[1::2], reference[0::2], reference[1::2], beta=0.1)
        return losses_per_pair.mean()

    def padded_objective(chunk_size):
        def objective():
            if chunk_size is None:
                sums = losses.sequence_logps(lm_logits(model, padded), padded["labels"])
            else:
                logps, _, _ = token_logps(model, padded, chunk_size=chunk_size)
                sums = logps.sum(dim=-1)
            return dpo(sums), {"sums": sums}
        return objective

    def packed_objective(chunk_size):
        def objective():
            if chunk_size is None:
                sums = losses.packed_sequence_logps(lm_logits(model, packed), packed["labels"], packed["cu_seq_lens"])
            else:
                logps, _, _ = token_logps(model, packed, chunk_size=chunk_size)
                sums = losses.packed_sequence_sums(logps, packed["cu_seq_lens"])
            return dpo(sums), {"sums": sums}
        return objective

    padded_chunked = value_and_grads(model, padded_objective(5))
    packed_chunked = value_and_grads(model, packed_objective(9))
    assert_same(value_and_grads(model, padded_objective(None)), padded_chunked)
    assert_same(value_and_grads(model, packed_objective(None)), packed_chunked)
    torch.testing.assert_close(packed_chunked[0]["sums"], padded_chunked[0]["sums"], atol=1e-4, rtol=1e-5)


def test_grpo_left_padded_with_position_ids_temperature_and_entropy(large_lora):
    """GRPO's forward: left-padded prompts with position ids, only the last C + 1 positions kept, logits divided
    by a temperature ≠ 1; per-token log-probs, entropy and the gradient of the GRPO loss agree."""
    batch, labels, width_c = left_padded_rollouts(LARGE_VOCAB, [5, 9, 3, 7], [6, 2, 8, 8])
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.8])

    def objective_for(chunk_size):
        def objective():
            logps, mask, entropy = token_logps(large_lora, batch, labels, temperature=0.7, with_entropy=True,
                                               chunk_size=chunk_size, logits_to_keep=width_c + 1)
            loss, _ = losses.grpo_loss(logps, logps.detach(), advantages, mask, loss_type="grpo")
            return loss, {"logps": logps, "mask": mask, "entropy": entropy}
        return objective

    plain, chunked = value_and_grads(large_lora, objective_for(None)), value_and_grads(large_lora, objective_for(3))
    assert plain[0]["logps"].shape == (4, width_c) and int(plain[0]["mask"].sum()) == 24
    assert_same(plain, chunked)


def test_logits_to_keep_accepts_full_length_labels(large_lora):
    """With logits_to_keep = k, labels for the whole input give the same outputs as those of the last k."""
    batch, labels, width_c = left_padded_rollouts(LARGE_VOCAB, [4, 6], [5, 3], seed=3)
    full = torch.cat([torch.full((2, batch["input_ids"].shape[1] - labels.shape[1]), IGNORE), labels], dim=1)
    with torch.no_grad():
        short = token_logps(large_lora, batch, labels, chunk_size=4, logits_to_keep=width_c + 1)
        long = token_logps(large_lora, batch, full, chunk_size=4, logits_to_keep=width_c + 1)
    assert torch.equal(short[0], long[0]) and torch.equal(short[1], long[1])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_size", [1, 7, 13, 10_000])
def test_tiny_qwen_chunk_sizes_that_do_not_divide_the_positions(attention, chunk_size):
    model = with_lora(tiny_qwen(attn_implementation=attention))
    vocab = vocab_of(model)
    padded = collate_lm(sequences(vocab, [(7, 17), (3, 25), (12, 5)]), pad_id=0)  # 47 labelled positions
    assert int((padded["labels"][:, 1:] != IGNORE).sum()) == 47
    compare_sft(model, padded, chunk_size)
    compare_sft(model, collate_packed(sequences(vocab, [(7, 17), (3, 25), (12, 5)])), chunk_size)


def test_tied_embeddings_full_fine_tuning():
    """No adapter: every weight trains, and the head IS the input embedding (tied), so its gradient sums the
    embedding lookup's and the chunked head's."""
    model = large_vocab_model()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = collate_lm(sequences(LARGE_VOCAB, [(4, 10), (6, 6)]), pad_id=0)
    compare_sft(model, batch, chunk_size=5)


def test_untied_trainable_and_lora_wrapped_heads():
    """An untied head that trains (PEFT modules_to_save) and a head with its own LoRA adapter."""
    batch = collate_lm(sequences(LARGE_VOCAB, [(4, 10), (6, 6)]), pad_id=0)
    saved_head = with_lora(large_vocab_model(tie_word_embeddings=False), modules_to_save=["lm_head"])
    assert any("lm_head" in n and p.requires_grad for n, p in saved_head.named_parameters())
    compare_sft(saved_head, batch, chunk_size=6)
    lora_head = with_lora(large_vocab_model(tie_word_embeddings=False),
                          target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    assert any("lm_head.lora_A" in n for n, _ in lora_head.named_parameters())
    compare_sft(lora_head, batch, chunk_size=6)


def test_dora():
    model = with_lora(tiny_qwen(), use_dora=True)
    batch = collate_lm(sequences(vocab_of(model), [(5, 15), (8, 9)]), pad_id=0)
    compare_sft(model, batch, chunk_size=6)


def test_gradient_checkpointing():
    model = with_lora(large_vocab_model())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    batch = collate_lm(sequences(LARGE_VOCAB, [(4, 10), (6, 6)]), pad_id=0)
    compare_sft(model, batch, chunk_size=4)


def test_qlora_4bit():
    """A 4-bit NF4 base (bitsandbytes on CPU) with LoRA, prepared for k-bit training (fp32 norms, gradient
    checkpointing), the way QLoRA trains; the head stays unquantized."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = tiny_qwen(quantization_config=quant, device_map="cpu")
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:  # see PLATFORM.md: the avx512_bf16 inference repack has no backward
        layer.support_avx512bf16_for_cpu = False
    model = with_lora(prepare_model_for_kbit_training(base))
    batch = collate_lm(sequences(vocab_of(model), [(5, 15), (8, 9)]), pad_id=0)
    compare_sft(model, batch, chunk_size=6)


@pytest.mark.parametrize("head", ["frozen", "lora-on-head"])
def test_ddp_wrapper(tmp_path, head):
    """Through a (one-process, gloo) DistributedDataParallel wrapper: the forward goes through DDP's __call__, the
    head is found on `.module`, and two steps of backward run DDP's gradient reduction without complaint and give
    the bare model's plain-path gradients, for a frozen head and for an adapter on the head, with and without
    DDP's unused-parameter search."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    targets = "all-linear" if head == "frozen" else ["q_proj", "v_proj", "lm_head"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for find_unused in (False, True):
            inner = with_lora(large_vocab_model(tie_word_embeddings=False), target_modules=targets)
            wrapped = DistributedDataParallel(inner, find_unused_parameters=find_unused)
            for seed in (0, 1):
                batch = collate_lm(sequences(LARGE_VOCAB, [(4, 10), (6, 6)], seed=seed), pad_id=0)
                expected = value_and_grads(inner, sft_objective(inner, batch, None))  # the bare model, no DDP
                assert_same(expected, value_and_grads(inner, sft_objective(wrapped, batch, 5)))
    finally:
        dist.destroy_process_group()


def test_autocast_state_of_the_forward_reaches_the_chunks(large_lora):
    """Under bf16 autocast the model's head runs in bf16; the chunks must too (not silently in fp32)."""
    head = large_lora.get_output_embeddings()
    dtypes = []
    handle = head.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    batch = collate_lm(sequences(LARGE_VOCAB, [(4, 10), (6, 6)]), pad_id=0)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            plain, mask, _ = token_logps(large_lora, batch, chunk_size=None)
            chunked, _, _ = token_logps(large_lora, batch, chunk_size=8)
    finally:
        handle.remove()
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) > 2
    assert chunked.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(chunked[mask], plain[mask], atol=0.1, rtol=0.0)  # bf16 logits: ~0.05 apart


def test_an_adapter_on_a_zero3_partitioned_head_is_refused():
    """DeepSpeed 0.19 does not gather a frozen base weight while a checkpointed chunk is recomputed; a LoRA layer
    on lm_head whose parameters carry ZeRO-3's partition status gets a clear error instead of a CheckpointError in
    backward (the ds_status attribute stands in for ZeRO-3 here)."""
    model = with_lora(large_vocab_model(tie_word_embeddings=False), target_modules=["q_proj", "lm_head"])
    batch = collate_lm(sequences(LARGE_VOCAB, [(4, 10)]), pad_id=0)
    for p in model.get_output_embeddings().parameters():
        p.ds_status = "NOT_AVAILABLE"
    with pytest.raises(ValueError, match="ZeRO-3"):
        token_logps(model, batch, chunk_size=4)
    token_logps(model, batch, chunk_size=None)


def test_models_that_transform_their_logits_are_refused():
    model = large_vocab_model()
    model.config.final_logit_softcapping = 30.0
    batch = collate_lm(sequences(LARGE_VOCAB, [(4, 10)]), pad_id=0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        token_logps(model, batch, chunk_size=4)


# ----------------------------------------------------------------------------------------------------------------------
# Memory: the chunked path never allocates a (positions × V) tensor
# ----------------------------------------------------------------------------------------------------------------------


class MemoryWatch(TorchDispatchMode):
    """Every storage an op creates: the largest one, and the peak bytes of those alive at once (a storage counts
    from the op that made it until it is freed; views and in-place results reuse an input's storage and do not
    count again)."""

    def __init__(self):
        super().__init__()
        self.alive, self.alive_bytes = {}, 0
        self.peak_bytes, self.largest_bytes = 0, 0

    def _freed(self, key):
        self.alive_bytes -= self.alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in inputs or key in self.alive or size == 0:
                continue
            self.alive[key] = size
            self.alive_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.alive_bytes)
            self.largest_bytes = max(self.largest_bytes, size)
            weakref.finalize(storage, self._freed, key)
        return out


def test_chunked_path_never_holds_positions_by_vocab(large_lora):
    """One LoRA SFT step (frozen tied head), forward and backward: the plain path allocates the (B, T, V) logits
    and holds several copies at once; the chunked path's largest tensor is at most one (chunk_size, V) float32
    slab, and it never holds more than two at once: no chunk's logits outlive the chunk."""
    batch = collate_lm(sequences(LARGE_VOCAB, [(10, 50), (20, 40), (5, 60)]), pad_id=0)  # 3 × 65 positions
    full_logits_bytes = batch["input_ids"].numel() * 4 * LARGE_VOCAB
    chunk_size = 24
    watched = {}
    for name, size in (("plain", None), ("chunked", chunk_size)):
        large_lora.zero_grad(set_to_none=True)
        with MemoryWatch() as watch:
            logps, mask, _ = token_logps(large_lora, batch, chunk_size=size)
            loss, _ = losses.sft_loss_from_logps(logps, mask)
            loss.backward()
        watched[name] = watch
    assert watched["plain"].largest_bytes >= full_logits_bytes
    assert watched["plain"].peak_bytes >= 2 * full_logits_bytes
    slab_bytes = chunk_size * 4 * LARGE_VOCAB
    assert watched["chunked"].largest_bytes <= slab_bytes
    assert watched["chunked"].peak_bytes <= 2 * slab_bytes < full_logits_bytes


def test_trainable_head_strategy_keeps_no_chunk_for_backward():
    """The recompute strategy (trainable head): what it holds at once is a chunk's logits and their gradient
    (beside the head's own weight gradients), not every chunk's logits, as it would without the checkpoint."""
    torch.manual_seed(0)
    vocab, chunk_size = 20_000, 40
    hidden = torch.randn(1, 401, 8, requires_grad=True)
    head = torch.nn.Linear(8, vocab)
    labels = torch.randint(0, vocab, (1, 401))
    with MemoryWatch() as watch:
        logps, _, _ = losses.chunked_token_logprobs(hidden, head, labels, chunk_size=chunk_size)
        logps.sum().backward()
    slab_bytes = chunk_size * 4 * vocab
    weight_bytes = (head.weight.numel() + head.bias.numel()) * 4
    assert watch.largest_bytes <= slab_bytes
    assert watch.peak_bytes <= 3 * slab_bytes + 3 * weight_bytes < 400 * 4 * vocab
