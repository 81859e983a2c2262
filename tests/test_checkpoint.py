"""Checkpoints (okadfa/training/checkpoint.py): loading never runs code from the file, saving is
atomic (a kill or a full disk loses nothing), and a corrupted, truncated, empty or foreign file
gives a clear CheckpointError. Bit-identical resume: tests/test_models.py, tests/test_train.py."""
import errno
import os
import sys

import pytest
import torch

from okadfa.models import OKADFAConfig, OKADFAModel
from okadfa.training import checkpoint as ck
from okadfa.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = OKADFAConfig.preset("tiny", d_model=32, n_heads=2, n_layers=2, max_seq_len=32, nb_features=8, **overrides)
    return OKADFAModel(cfg)


def _saved(tmp_path, name="ck.safetensors", seed=0):
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))).loss.backward()
    opt.step()
    path = tmp_path / name
    save_checkpoint(path, model, opt, step=7, extra={"tokens": 3, "note": [1.5, None]})
    return path, model


def test_round_trip_restores_everything(tmp_path):
    path, model = _saved(tmp_path)
    fresh = _model(seed=1)
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    info = load_checkpoint(path, fresh, opt)
    assert info == {"step": 7, "precision": "fp32", "extra": {"tokens": 3, "note": [1.5, None]}}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and len(opt.state) == len(list(fresh.parameters()))


def test_precision_is_recorded_and_checked(tmp_path):
    """The precision is part of the checked document; a run in another precision is refused before anything is
    loaded; a checkpoint written before the field existed (format 2 without it) reads as fp32."""
    from safetensors.torch import save
    model = _model()
    save_checkpoint(tmp_path / "bf16.safetensors", model, step=3, precision="bf16")
    assert load_checkpoint(tmp_path / "bf16.safetensors", _model(), precision="bf16")["precision"] == "bf16"
    fresh = _model(seed=1)
    with pytest.raises(CheckpointError, match="precision mismatch: the checkpoint was trained in bf16, this run "
                                              "uses fp32"):
        load_checkpoint(tmp_path / "bf16.safetensors", fresh, precision="fp32")
    assert not torch.equal(fresh.tok_emb.weight, model.tok_emb.weight)          # nothing loaded
    document, tensors = ck._read(tmp_path / "bf16.safetensors")
    del document["precision"]
    document["sha256"] = ck._digest(document, tensors)
    (tmp_path / "old.safetensors").write_bytes(save(tensors, metadata={ck._KEY: ck._json(document, "")}))
    assert load_checkpoint(tmp_path / "old.safetensors", _model(), precision="fp32")["precision"] == "fp32"
    with pytest.raises(CheckpointError, match="trained in fp32, this run uses bf16"):
        load_checkpoint(tmp_path / "old.safetensors", _model(), precision="bf16")


def test_loading_a_pickle_never_runs_it(tmp_path):
    """A torch.save file whose unpickling would create a marker file: refused, nothing runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name, obj in (("zip.pt", {"format": 2, "x": Payload()}),):
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(CheckpointError, match="pickle"):
            load_checkpoint(path, _model())
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": Payload()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(legacy, _model())
    assert not marker.exists()


@pytest.mark.parametrize("where", ["tensor bytes", "metadata", "header length"])
def test_corruption_is_detected(tmp_path, where):
    path, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    if where == "tensor bytes":                     # two flipped bytes in the middle of the tensor records
        at = 8 + header_len + (len(data) - 8 - header_len) // 2
        data[at] ^= 0x40
        data[at + 1] ^= 0x01
    elif where == "metadata":                       # a digit of the saved step inside the JSON metadata
        at = data.index(b'\\"step\\": 7')
        data[at + 10] = ord("8")
    else:
        data[0] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum|not a readable"):
        load_checkpoint(path, _model())


@pytest.mark.parametrize("content,match", [
    (b"", "too short"),
    (b"step=7\nweights=...\n", "not a readable safetensors"),
    (None, "not an okadfa checkpoint"),             # a safetensors file of someone else
])
def test_foreign_files_give_a_clear_error(tmp_path, content, match):
    path = tmp_path / "other.safetensors"
    if content is None:
        from safetensors.torch import save_file
        save_file({"weight": torch.ones(3)}, str(path))
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, _model())


def test_truncated_file(tmp_path):
    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(path, _model())


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path, model = _saved(tmp_path)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ck.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*No space left.*unchanged"):
        save_checkpoint(path, model, step=8)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]     # no temporary file left behind
    monkeypatch.undo()
    assert load_checkpoint(path, _model(), restore_rng=False)["step"] == 7


def test_extra_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="extra must hold JSON values"):
        save_checkpoint(tmp_path / "x.safetensors", _model(), extra={"t": torch.ones(2)})
    assert not list(tmp_path.iterdir())


class _Interrupt(BaseException):
    """What a signal arriving at a given line of save_checkpoint would raise."""


def _interrupt_at(n):
    """A trace function raising _Interrupt at the n-th line executed in save_checkpoint."""
    seen = [0]

    def local(frame, event, arg):
        if event == "line":
            seen[0] += 1
            if seen[0] == n:
                raise _Interrupt
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is save_checkpoint.__code__ else None
    return tracer, seen


def test_an_interruption_at_any_line_of_a_save_leaves_a_loadable_checkpoint(tmp_path):
    """Interrupt a save at each of its lines in turn (as a signal or kill would): the file at
    the path is every time an intact checkpoint, the old one or the new one."""
    path, model = _saved(tmp_path)
    n, completed = 1, False
    while not completed:
        tracer, seen = _interrupt_at(n)
        sys.settrace(tracer)
        try:
            save_checkpoint(path, model, step=100 + n)
            completed = True
        except _Interrupt:
            pass
        finally:
            sys.settrace(None)
        step = load_checkpoint(path, _model(), restore_rng=False)["step"]
        assert step in (7, 100 + n) if not completed else step == 100 + n, (n, step)
        if step == 100 + n and not completed:
            _saved(tmp_path)                      # back to the old one for the next line
        n += 1
    assert n > 10 and seen[0] < n                 # every line of the save was a place to interrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]   # no temporary file left behind
