"""What a run prints: its progress (a bar on a terminal, plain lines in a log), its errors (one line each), and not
the known-harmless noise of the libraries underneath.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_known_noise() -> None:
    """Hide the import-time lines that are harmless and would otherwise greet every run: bitsandbytes' missing
    optional CPU kernels, DeepSpeed's "Setting accelerator to CPU", transformers' deprecation FutureWarnings and
    its weight-loading bars. PEFTLAB_VERBOSE=1 shows them again."""
    if os.environ.get("PEFTLAB_VERBOSE"):
        return
    for name in ("bitsandbytes", "DeepSpeed", "deepspeed", "accelerate.utils.other", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate|torch)(\.|$)")
    warnings.filterwarnings("ignore", message=r".*gemv_4bit.*")  # the trap models.disable_cpu_4bit_repack disarms
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch

    if not torch.cuda.is_available():  # what DeepSpeed picks anyway, named so that it does not warn about it
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def error_line(err: BaseException) -> str:
    """A user mistake as the one line train.py prints (messages are written as one line; newlines are folded)."""
    return "error: " + " ".join(str(err).split())


class Progress:
    """The loop's progress: a tqdm bar on a terminal; in a log file (stderr not a terminal), one plain line per
    logged step instead of a bar's carriage returns."""

    def __init__(self, total: int, initial: int, enabled: bool, every: int):
        self.total, self.every, self.enabled = total, max(1, int(every)), enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        elif self.enabled and (step % self.every == 0 or step == self.total):
            print(f"step {step}/{self.total}  loss {loss:.4f}  tokens/s {tokens_per_s:,.0f}", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
