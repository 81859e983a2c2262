"""Checkpoints that resume bit-identically on the CPU.

A checkpoint holds the model config, the model's state_dict (FAVOR+ projections,
step counters and stored feedback matrices are buffers; seeded feedback is fully
described by the config's seed), the optimizer state, the step, and the RNG
states (torch, Python's random). Loading into a model whose config differs
raises, naming the fields.
"""
from __future__ import annotations

import random

import torch

__all__ = ["save_checkpoint", "load_checkpoint"]

FORMAT = 1


def save_checkpoint(path, model, optimizer=None, *, step: int = 0, extra: dict | None = None) -> None:
    """Write model, optimizer, step, RNG states and `extra` (any picklable dict) to path."""
    torch.save({
        "format": FORMAT,
        "config": model.config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "extra": extra or {},
    }, path)


def load_checkpoint(path, model, optimizer=None, *, restore_rng: bool = True) -> dict:
    """Restore a checkpoint written by `save_checkpoint` into model (and optimizer).

    Returns {"step": int, "extra": dict}. Raises ValueError if the checkpoint's
    config differs from model.config (a different run, or a changed feedback seed).
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an okadfa checkpoint (format {state.get('format')!r})")
    mine = model.config.to_dict()
    diff = sorted(k for k in set(mine) | set(state["config"]) if mine.get(k) != state["config"].get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {state['config'].get(k)!r} vs model {mine.get(k)!r}" for k in diff)
        raise ValueError(f"{path}: config mismatch ({details})")
    model.load_state_dict(state["model"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"{path}: the checkpoint has no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if restore_rng:
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
    return {"step": state["step"], "extra": state["extra"]}
