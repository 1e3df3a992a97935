"""Regenerate the shipped SFT adapters: the default run (`python train.py model=<tiny>`) for each tiny checkpoint.

    python scripts/make_sft_adapters.py [tiny_qwen tiny_llama tiny_mistral]

Each adapter lands in assets/adapters/<model>_sft/ (PEFT format, with the tokenizer and the run's summary.json),
where `algo.start_from=sft` finds it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make(model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        subprocess.run([sys.executable, "train.py", f"model={model}", "logger=none", f"hydra.run.dir={run_dir}"],
                       cwd=REPO, check=True)
        target = REPO / "assets" / "adapters" / f"{model}_sft"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(run_dir / "adapter", target)
        # The base is named relative to the repo, not by this machine's absolute path.
        for name in ("adapter_config.json", "README.md"):
            text = (target / name).read_text().replace(str(REPO / "assets" / "models"), "assets/models")
            (target / name).write_text(text)
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["model_name_or_path"] = f"assets/models/{model}"
        (target / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


if __name__ == "__main__":
    for name in sys.argv[1:] or ["tiny_qwen", "tiny_llama", "tiny_mistral"]:
        s = make(name)
        print(f"{name}: base/accuracy={s.get('base/accuracy'):.3f} → eval/accuracy={s.get('eval/accuracy'):.3f}, "
              f"unsafe_rate {s.get('base/unsafe_rate'):.3f} → {s.get('eval/unsafe_rate'):.3f}, {s['runtime_s']:.0f} s")
