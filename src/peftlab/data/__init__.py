"""Data: load (hub id or local file) → canonical columns → chat template → token batches.

`load_splits(data_cfg, kind)` returns train and eval rows (and where the eval rows came from) in the canonical
columns of `kind`
(see `peftlab.data.schemas`); `peftlab.data.format` turns rows into token ids with the tokenizer's chat template.
"""

from peftlab.data.load import load_splits

__all__ = ["load_splits"]
