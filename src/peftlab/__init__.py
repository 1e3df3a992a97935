"""peftlab: parameter-efficient fine-tuning and alignment of causal LMs, composed by Hydra.

Importing the package registers the `${repo:...}` config resolver, so configs can name shipped files
(tiny checkpoints, toy data) relative to the repository root wherever `train.py` is started from.
"""

import os
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(os.environ.get("PEFTLAB_ROOT", Path(__file__).resolve().parents[2]))

OmegaConf.register_new_resolver("repo", lambda rel: str(REPO_ROOT / rel), replace=True)
