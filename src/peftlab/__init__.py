"""peftlab: parameter-efficient fine-tuning and alignment of causal LMs, composed by Hydra.

Importing the package registers the config resolvers: `${repo:...}` names shipped files (tiny checkpoints, toy
data) relative to the repository root wherever `train.py` is started from; `${toy_data:PATH}` is true when PATH is a
file of the toy world (data/toy/), and `${toy_only:PATH,VALUE}` is VALUE then and null otherwise, so the toy
world's held-out files and tasks follow the data: `data.path=<your file>` drops them. `${model_family:DIR}` and
`${context_length:DIR,CAP}` read a local checkpoint's config.json (model=local): its architecture family and its
context length, capped.
"""

import os
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(os.environ.get("PEFTLAB_ROOT", Path(__file__).resolve().parents[2]))

TOY_DATA = REPO_ROOT / "data" / "toy"


def is_toy_data(path) -> bool:
    return Path(str(path)).expanduser().resolve().parent == TOY_DATA.resolve()


FAMILIES = {"qwen2": "qwen2", "llama": "llama", "mistral": "mistral"}  # config.json model_type → peft.targets presets


def _checkpoint_config(path) -> dict:
    import json

    file = Path(str(path)).expanduser() / "config.json"
    return json.loads(file.read_text()) if file.exists() else {}


def model_family(path) -> str | None:
    """The family of a local checkpoint (null when there is no config.json: validation names the directory)."""
    model_type = _checkpoint_config(path).get("model_type")
    return FAMILIES.get(model_type, model_type)


def context_length(path, cap: int) -> int:
    """The checkpoint's context length (max_position_embeddings), at most `cap`."""
    return min(int(_checkpoint_config(path).get("max_position_embeddings") or cap), int(cap))


OmegaConf.register_new_resolver("repo", lambda rel: str(REPO_ROOT / rel), replace=True)
OmegaConf.register_new_resolver("model_family", model_family, replace=True)
OmegaConf.register_new_resolver("context_length", context_length, replace=True)
OmegaConf.register_new_resolver("toy_data", is_toy_data, replace=True)
OmegaConf.register_new_resolver("toy_only", lambda path, value: value if is_toy_data(path) else None, replace=True)
