"""What a run's memory will be, decided before the weights load: gradient checkpointing from the architecture,
and how the host allocator hands freed buffers back (CPU runs)."""

from __future__ import annotations

import torch

CHECKPOINTING_FLOOR_BYTES = 2**30  # below this, activations are cheap whatever the model: recomputing costs time only
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter: the size from which malloc maps a buffer of its own
# glibc's own starting value, kept fixed: glibc would raise it, up to 32 MiB, each time a mapped buffer is freed
HOST_MMAP_THRESHOLD_BYTES = 128 * 2**10


def release_host_memory(threshold_bytes: int = HOST_MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc give host buffers of `threshold_bytes` and more back to the OS when they are freed
    (trainer.release_host_memory; the bench's --malloc-mmap-threshold).

    By default glibc raises its mmap threshold as large buffers come and go, and serves them from a heap it keeps:
    the process's resident memory then stays at its high-water mark of fragments, which on CPU is most of a step's
    peak. A threshold fixed at glibc's starting 128 KiB also maps the small per-layer buffers (LoRA's rank-r
    activations, attention statistics) that a checkpointed forward frees between long-lived ones, so they leave no
    holes in the heap either. Returns False where there is no glibc (macOS, musl): nothing changes there.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1


def activation_bytes(model_config, tokens: int, dtype: torch.dtype) -> int:
    """What the backward pass keeps of a decoder's activations for `tokens` tokens of one micro-batch, without
    checkpointing: per layer and token about 10 hidden-sized tensors (norms, q/k/v, attention output, residuals)
    and 4 intermediate-sized ones (gate, up, their product, down's input)."""
    config = model_config.get_text_config()
    per_token = 10 * config.hidden_size + 4 * config.intermediate_size
    return int(config.num_hidden_layers * tokens * per_token * torch.finfo(dtype).bits // 8)


def weight_bytes(model_config, dtype: torch.dtype) -> int:
    """The frozen full-precision base's size: its parameters at the weights' dtype."""
    config = model_config.get_text_config()
    layer = 4 * config.hidden_size ** 2 + 3 * config.hidden_size * config.intermediate_size
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return int((config.num_hidden_layers * layer + embeddings) * torch.finfo(dtype).bits // 8)


def use_checkpointing(setting, model_config, tokens: int, dtype: torch.dtype, quantized: bool) -> bool:
    """trainer.gradient_checkpointing: true/false as given; auto recomputes activations in backward when keeping
    them would take more than CHECKPOINTING_FLOOR_BYTES (the toy models never reach it: they stay fast) and, on a
    full-precision base, more than the base's weights (a 0.5B model at 2 × 1,024 tokens does). A quantized base
    (qlora) was chosen to save memory, so there the floor alone decides, as peft's prepare_model_for_kbit_training
    turns checkpointing on for every k-bit model (a 4-bit 7B's bf16 activations at 512 tokens stay below its
    weights, yet would nearly double the step's memory)."""
    if setting != "auto":
        return bool(setting)
    kept = activation_bytes(model_config, tokens, dtype)
    if quantized:
        return kept > CHECKPOINTING_FLOOR_BYTES
    return kept > max(weight_bytes(model_config, dtype), CHECKPOINTING_FLOOR_BYTES)