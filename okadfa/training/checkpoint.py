"""Checkpoints that resume bit-identically on the CPU, load without running code, and are
written atomically.

A checkpoint is one safetensors file (https://github.com/huggingface/safetensors): the tensors
are the model's state_dict (FAVOR+ projections, step counters and stored feedback matrices are
buffers; seeded feedback is fully described by the config's seed), the optimizer's tensor state
and torch's RNG state; everything else is JSON in the file's metadata: the model config, the
step, the precision the run trains in ("fp32", "bf16", "fp16"; okadfa.training.precision),
the optimizer's hyper-parameters and scalar state, Python's RNG state, the caller's `extra`
(JSON values only) and a SHA-256 over all of it, checked on load. Reading parses the
safetensors header and copies raw tensor bytes: no pickle, nothing in the file is executed.

Writing goes to a temporary file in the same directory, is fsync'ed, then renamed over the old
checkpoint (and the directory fsync'ed): a crash or a full disk at any point leaves either the
old checkpoint or the new one, never a partial file.

Loading into a model whose config differs raises, naming the fields; so does loading for a
run in another precision (a checkpoint without the field predates it and is "fp32").
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import struct

import torch

from .files import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

FORMAT = 2
_KEY = "okadfa"          # the metadata entry holding the JSON document


class CheckpointError(ValueError):
    """The file is not a readable okadfa checkpoint (foreign, truncated, corrupted, or a config mismatch)."""


def _digest(document: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the JSON document (without its checksum) and every tensor's name, dtype,
    shape and bytes, in name order."""
    h = hashlib.sha256(json.dumps({k: v for k, v in document.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _optimizer_parts(optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """An optimizer state_dict split into JSON (param_groups, scalar state) and tensors."""
    sd = optimizer.state_dict()
    scalars, tensors = {}, {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def _optimizer_state(part: dict, tensors: dict[str, torch.Tensor], optimizer) -> dict:
    """The optimizer state_dict back from _optimizer_parts' output (tuples restored where the
    optimizer's own groups hold tuples, such as AdamW's betas)."""
    state: dict[int, dict] = {}
    for index, entries in part["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    groups = []
    for saved, current in zip(part["param_groups"], optimizer.param_groups):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def _json(value, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must hold JSON values only (str, number, bool, None, list, dict): {exc}") from None


def save_checkpoint(path, model, optimizer=None, *, step: int = 0, precision: str = "fp32",
                    extra: dict | None = None) -> None:
    """Write model, optimizer, step, precision, RNG states and `extra` (a dict of JSON values)
    to path, atomically. Raises OSError naming the path if it cannot be written (e.g. a full disk);
    an existing checkpoint at path is then left as it was."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    optim = None
    if optimizer is not None:
        optim, optim_tensors = _optimizer_parts(optimizer)
        tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    version, internal, gauss = random.getstate()
    document = {"format": FORMAT, "config": model.config.to_dict(), "step": int(step), "precision": str(precision),
                "optimizer": optim, "rng_python": [version, list(internal), gauss], "extra": extra or {}}
    _json(document["extra"], "extra")
    document["sha256"] = _digest(json.loads(_json(document, "the checkpoint")), tensors)
    # safetensors refuses tensors that share memory: give every tensor its own storage.
    data = save({k: v.clone().contiguous() for k, v in tensors.items()}, metadata={_KEY: _json(document, "")})
    try:
        with atomic_path(os.fspath(path)) as tmp, open(tmp, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise OSError(exc.errno, f"could not write the checkpoint {path} ({exc.strerror}); "
                                 f"the previous checkpoint there, if any, is unchanged") from exc


def _read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(document, tensors) of a checkpoint file, checked: a clear CheckpointError for anything
    that is not an intact okadfa checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    with open(path, "rb") as f:
        data = f.read()        # read, not mapped: a file truncated under us cannot fault the process
    if len(data) < 8:
        raise CheckpointError(f"{path}: not an okadfa checkpoint ({len(data)} bytes, too short for safetensors)")
    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        if header_len > len(data) - 8:
            raise ValueError(f"the header claims {header_len} bytes of a {len(data)}-byte file")
        header = json.loads(data[8:8 + header_len])
        tensors = load(data)
    except (ValueError, UnicodeDecodeError, SafetensorError) as exc:
        # torch.save's zip container, or its legacy format (a pickle protocol 2+ opcode)
        if data[:4] == b"PK\x03\x04" or (data[0] == 0x80 and 2 <= data[1] <= 5):
            raise CheckpointError(f"{path}: a pickle checkpoint (torch.save); okadfa does not load pickles, "
                                  f"which can run code. Re-create it with this version of okadfa.") from None
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    meta = header.get("__metadata__") or {}
    if _KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file, but not an okadfa checkpoint (no '{_KEY}' metadata)")
    try:
        document = json.loads(meta[_KEY])
    except ValueError as exc:
        raise CheckpointError(f"{path}: corrupted checkpoint metadata ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else None
        raise CheckpointError(f"{path}: okadfa checkpoint format {found!r}, this version reads format {FORMAT}")
    if document.get("sha256") != _digest(document, tensors):
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupted (its bytes changed after saving)")
    return document, tensors


def load_checkpoint(path, model, optimizer=None, *, precision: str | None = None, restore_rng: bool = True) -> dict:
    """Restore a checkpoint written by `save_checkpoint` into model (and optimizer).

    Returns {"step": int, "precision": str, "extra": dict}. Raises CheckpointError (a ValueError)
    for a file that is not an intact okadfa checkpoint, whose config differs from model.config (a
    different run, or a changed feedback seed), or, when `precision` is given, that was trained in
    another precision, naming what is wrong; nothing is loaded then, and nothing in the file is
    executed. A run resumes in its own precision because its optimizer state and loss scale were
    shaped by it, and a resumed run is meant to equal the uninterrupted one bit for bit.
    """
    document, tensors = _read(path)
    saved = document.get("precision", "fp32")           # format-2 files from before --precision: float32
    if precision is not None and saved != precision:
        raise CheckpointError(f"{path}: precision mismatch: the checkpoint was trained in {saved}, this run uses "
                              f"{precision} (resume with --precision {saved}, or start a new run)")
    mine, theirs = model.config.to_dict(), document["config"]
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs model {mine.get(k)!r}" for k in diff)
        raise CheckpointError(f"{path}: config mismatch ({details})")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None:
        if document["optimizer"] is None:
            raise CheckpointError(f"{path}: the checkpoint has no optimizer state")
        optimizer.load_state_dict(_optimizer_state(document["optimizer"], tensors, optimizer))
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        version, internal, gauss = document["rng_python"]
        random.setstate((version, tuple(internal), gauss))
    return {"step": document["step"], "precision": saved, "extra": document["extra"]}
