"""One decoder layer's live set in a LoRA training step: what checkpointing holds for one layer at a time.

    python scripts/layer_live_set.py --model-dir /tmp/bench-arch/qwen2.5-0.5b --rows 2 --length 1024

Builds one decoder layer of the checkpoint's architecture (random weights, fp32, LoRA r16 on every linear, as
train.py wraps it: peft + peft.merged_matmul), runs it forward and backward on (rows, length) hidden states and
prints the process's resident high-water mark over what was resident before the forward (glibc returning freed
buffers of 128 KiB and more at once, as train.py's trainer.release_host_memory does). Linux only (VmHWM).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a checkpoint directory (its config.json is read)")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.adapters import ATTN, MLP, use_merged_matmul
    from peftlab.bench.harness import PeakMemory
    from peftlab.memory import release_host_memory

    release_host_memory()
    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(args.model_dir)
    config.num_hidden_layers = 1
    config._attn_implementation = "sdpa"
    decoder = AutoModelForCausalLM.from_config(config, dtype=torch.float32).model

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.rope = decoder.layers[0], decoder.rotary_emb

        def forward(self, hidden, positions):
            out = self.layer(hidden, position_embeddings=self.rope(hidden, positions), attention_mask=None,
                             position_ids=positions)
            return out[0] if isinstance(out, tuple) else out

    model = get_peft_model(OneLayer(), LoraConfig(r=16, lora_alpha=32, target_modules=ATTN + MLP))
    use_merged_matmul(model)
    memory = PeakMemory(torch.device("cpu"))
    hidden = torch.randn(args.rows, args.length, config.hidden_size, requires_grad=True)
    positions = torch.arange(args.length).expand(args.rows, -1)
    grad = torch.randn(args.rows, args.length, config.hidden_size)
    for attempt in ("warm-up", "measured"):
        before = memory.current_mb()
        memory.reset()
        model(hidden, positions).backward(grad)
        if attempt == "measured":
            print(f"{args.rows} x {args.length} tokens: one layer's live set {memory.peak_mb() - before:.0f} MB")


if __name__ == "__main__":
    main()
