"""peftlab: parameter-efficient fine-tuning and alignment of causal LMs, composed by Hydra.

Importing the package registers the config resolvers: `${repo:...}` names shipped files (tiny checkpoints, toy
data) relative to the repository root wherever `train.py` is started from; `${toy_data:PATH}` is true when PATH is a
file of the toy world (data/toy/), and `${toy_only:PATH,VALUE}` is VALUE then and null otherwise, so the toy
world's held-out files and tasks follow the data: `data.path=<your file>` drops them.
"""

import os
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(os.environ.get("PEFTLAB_ROOT", Path(__file__).resolve().parents[2]))

TOY_DATA = REPO_ROOT / "data" / "toy"


def is_toy_data(path) -> bool:
    return Path(str(path)).expanduser().resolve().parent == TOY_DATA.resolve()


OmegaConf.register_new_resolver("repo", lambda rel: str(REPO_ROOT / rel), replace=True)
OmegaConf.register_new_resolver("toy_data", is_toy_data, replace=True)
OmegaConf.register_new_resolver("toy_only", lambda path, value: value if is_toy_data(path) else None, replace=True)
