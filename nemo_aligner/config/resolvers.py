"""OmegaConf resolvers every config may use, registered on import of `nemo_aligner.config`.

- NeMo's arithmetic resolvers, so NeMo-Aligner's own config files load: `${multiply:a, b}`,
  `${int_div:a, b}`, `${subtract:a, b}`, `${sum:a, b, ...}`, `${divide_ceil:a, b}`, `${divide_floor:a, b}`.
- `${demo_asset:data/dpo_train.jsonl}`: a file of the bundled demo (nemo_aligner/demo/), found wherever the
  package is installed, so the demo presets run from any directory.

Nothing here imports torch.
"""

import math
from pathlib import Path

from omegaconf import OmegaConf

DEMO_ASSETS = Path(__file__).resolve().parents[1] / "demo"


def demo_asset(relative: str) -> str:
    path = DEMO_ASSETS / relative
    if not path.exists():
        raise ValueError(f"${{demo_asset:{relative}}}: no such bundled demo file ({path})")
    return str(path)


RESOLVERS = {
    "multiply": lambda a, b: a * b,
    "int_div": lambda a, b: a // b,
    "divide_floor": lambda a, b: a // b,
    "divide_ceil": lambda a, b: math.ceil(a / b),
    "subtract": lambda a, b: a - b,
    "sum": lambda *values: sum(values),
    "demo_asset": demo_asset,
}

for _name, _fn in RESOLVERS.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
