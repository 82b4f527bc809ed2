"""Where models come from, for the reward side and the training side alike: hub ids and dtype names.

Lives in `rewards/`, the bottom of the import order (eval -> train -> rewards), so both sides share one copy.
"""

from __future__ import annotations

import re

import torch

# Config names of the dtypes a model can be loaded in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A hub id is "name" or "owner/name", each part starting with a letter, digit or underscore; anything else
# (absolute, ./, ~, deeper paths) can only be a local directory.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9_][\w.-]*/)?[A-Za-z0-9_][\w.-]*$")


def is_hub_id(name: str, require_owner: bool = False) -> bool:
    """Whether `name` can be a hub id; `require_owner` for kinds that always have one (community datasets)."""
    return bool(_HUB_ID.match(name)) and (not require_owner or "/" in name)
