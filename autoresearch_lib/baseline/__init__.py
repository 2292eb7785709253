"""The baseline experiment: train.py (the agent's file) and program.md (the human's file).

`render_train_py(preset)` writes a preset's starting hyperparameters into train.py's UPPERCASE
block, so the agent always sees plain numbers it can edit.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from ..config import get_preset

HERE = Path(__file__).parent
TRAIN_PY = HERE / "train.py"
PROGRAM_MD = HERE / "program.md"


def set_constant(source: str, name: str, value) -> str:
    """Return `source` with the top-level line `NAME = ...` set to `repr(value)` (comment kept)."""
    pattern = re.compile(rf"^({name} = )(.*?)(\s*#.*)?$", re.MULTILINE)
    if not pattern.search(source):
        raise KeyError(f"train.py has no top-level constant {name}")
    return pattern.sub(lambda m: f"{m[1]}{value!r}{m[3] or ''}", source, count=1)


def render_train_py(preset: str = "auto") -> str:
    """The baseline train.py with the starting hyperparameters of `preset`."""
    source = TRAIN_PY.read_text()
    for name, value in get_preset(preset).hparams.items():
        source = set_constant(source, name, value)
    return source


def as_module(source: str, name: str = "experiment") -> types.ModuleType:
    """A train.py's source as a module, not run as __main__: it defines the model, trains nothing."""
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(source, "train.py", "exec"), module.__dict__)
    return module


def default_program() -> str:
    """The default program.md: the human's instructions to the agent."""
    return PROGRAM_MD.read_text()
