"""Training state on disk, safetensors only: model weights, optimizer moments, and a JSON of the rest.

``save_training_state`` writes into a temporary folder and renames it over the old one,
so a run killed mid-save still resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into flat tensors (``"<param>.<key>"``) and JSON-able groups."""
    state = optimizer.state_dict()
    tensors = {}
    for param_id, slots in state["state"].items():
        for key, value in slots.items():
            tensors[f"{param_id}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        step: int, extra: dict | None = None) -> Path:
    directory = Path(directory)
    staging = directory.with_name(directory.name + ".saving")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(staging / MODEL_FILE))
    tensors, meta = optimizer_tensors(optimizer)
    save_file(tensors, str(staging / OPTIMIZER_FILE))
    (staging / STATE_FILE).write_text(json.dumps({"step": step, "optimizer": meta, **(extra or {})}, indent=1))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def has_training_state(directory: str | Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def load_training_state(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer in place; return the saved JSON (``step`` and any extras)."""
    directory = Path(directory)
    saved = json.loads((directory / STATE_FILE).read_text())
    model.load_state_dict(load_file(str(directory / MODEL_FILE)))
    optimizer.load_state_dict(optimizer_state_from_tensors(load_file(str(directory / OPTIMIZER_FILE)), saved["optimizer"]))
    return saved
