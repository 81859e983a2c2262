"""okadfa.training.data: corpora, tokenisers, the memory-mapped token cache and batching."""
import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from okadfa.training import data
from okadfa.training.data import ByteTokenizer, GPT2Tokenizer, get_batch, get_tokenizer, load_corpus, val_batches

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

WIKI = {
    "wiki.train.raw": " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles ( "
                      "Japanese : 戦場のヴァルキュリア3 ) is a tactical role @-@ playing video game . \n \n = = "
                      "Gameplay = = \n"
                      " The game 's battle system , the BliTZ system , is carried over directly . \n",
    "wiki.valid.raw": " \n = Homarus gammarus = \n \n Homarus gammarus , known as the European lobster , is a species "
                      "of clawed lobster — found in Zürich ? No . \n",
    "wiki.test.raw": " \n = Robert Boulter = \n \n Robert Boulter is an English film actor . \n",
}


def tiny_encoding(name="tiny"):
    """A byte-level BPE with the GPT-2 pre-tokeniser and a handful of merges (vocab > 256)."""
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is not installed (pip install tiktoken)")
    ranks = {bytes([i]): i for i in range(256)}
    for merge in [b"th", b"the", b" the", b"in", b"ing", b" \n", b"\n\n", b" =", b"\xc3\xa9", b"er", b" s"]:
        ranks[merge] = len(ranks)
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})


def make_wikitext(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name, text in WIKI.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def text_of(tokens, tok=None):
    return (tok or ByteTokenizer()).decode(np.asarray(tokens))


# ---------------------------------------------------------------------------------------------------------------
# Tokenisers

def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("bytes")
    assert (tok.name, tok.vocab_size) == ("bytes", 256)
    for text in ["hello, world\n", "Zürich — 東京 🙂", ""]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.encode(bytes(range(256))) == list(range(256))
    assert tok.decode([0x66, 0xFF, 0x6F]) == "f\ufffdo"  # invalid UTF-8 is replaced, not an error
    with pytest.raises(ValueError):
        tok.decode([256])


def test_tiny_tiktoken_round_trip():
    tok = GPT2Tokenizer(tiny_encoding())
    assert tok.vocab_size == 256 + 11 and tok.name == "tiktoken:tiny"
    text = "the thing  is seen\n\n = é in Zürich = \n"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) and max(ids) >= 256  # merges were used
    assert tok.decode(ids) == text and tok.encode(text.encode()) == ids


def test_real_gpt2_encoding():
    try:
        tok = GPT2Tokenizer()
    except RuntimeError as e:
        pytest.skip(f"the GPT-2 encoding cannot be loaded locally (no network, no TIKTOKEN_CACHE_DIR): {str(e)[:120]}")
    assert tok.name == "gpt2" and tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode(tok.encode("Zürich — 東京\n")) == "Zürich — 東京\n"


def test_gpt2_unavailable_raises_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails
    with pytest.raises(RuntimeError, match="tiktoken is not installed"):
        get_tokenizer("gpt2")
    with pytest.raises(ValueError, match="'bytes' or 'gpt2'"):
        get_tokenizer("sentencepiece")


# ---------------------------------------------------------------------------------------------------------------
# Sources and the cache

def test_stdlib_corpus(tmp_path, monkeypatch):
    corpus = load_corpus("stdlib", max_bytes=200_000, cache_dir=tmp_path)
    assert corpus.name == "stdlib" and corpus.vocab_size == 256
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint8 and corpus.val.dtype == np.uint8
    assert len(corpus.train) + len(corpus.val) == 200_000 and len(corpus.val) == 10_000
    assert corpus.val_bytes == len(corpus.val)

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = sorted((p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    first = files[0].read_bytes()[:200_000]
    assert bytes(corpus.train[:len(first)]) == first
    assert "def " in text_of(corpus.train) and "def " in text_of(corpus.val)
    used = [p for p, _ in data._stdlib_files(1 << 40)]
    assert used == [p for p in files if p.stat().st_size]  # same order; no tests, no site-packages

    # Second load: same arrays straight from the cache (no re-tokenising, files untouched).
    meta = next(tmp_path.glob("*.json"))
    mtime = meta.stat().st_mtime_ns
    monkeypatch.setattr(data, "_build", lambda *a, **k: pytest.fail("the cache was not reused"))
    again = load_corpus("stdlib", max_bytes=200_000, cache_dir=tmp_path)
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)
    assert meta.stat().st_mtime_ns == mtime
    assert sorted(p.name[len(meta.stem):] for p in tmp_path.iterdir()) == [".json", ".train.bin", ".val.bin"]
    info = json.loads(meta.read_text())
    assert (info["source"], info["tokenizer"], info["dtype"]) == ("stdlib", "bytes", "uint8")
    assert (info["train_tokens"], info["val_tokens"], info["val_bytes"]) == (190_000, 10_000, 10_000)


def test_wikitext_directory(tmp_path):
    d = make_wikitext(tmp_path / "some" / "wikitext-2-raw")
    corpus = load_corpus(str(d), cache_dir=tmp_path / "cache")
    assert corpus.name == str(d)
    assert text_of(corpus.train) == WIKI["wiki.train.raw"]
    assert text_of(corpus.val) == WIKI["wiki.valid.raw"]
    assert corpus.val_bytes == len(WIKI["wiki.valid.raw"].encode("utf-8")) == len(corpus.val)
    # max_bytes caps the training text only; validation stays whole.
    capped = load_corpus(str(d), cache_dir=tmp_path / "cache", max_bytes=20)
    assert bytes(capped.train) == WIKI["wiki.train.raw"].encode()[:20]
    assert np.array_equal(capped.val, corpus.val)


def test_wikitext_by_name_via_data_dir(tmp_path, monkeypatch):
    make_wikitext(tmp_path / "data" / "wikitext-2-raw-v1")
    monkeypatch.setenv("OKADFA_DATA_DIR", str(tmp_path / "data"))
    corpus = load_corpus("wikitext-2", cache_dir=tmp_path / "cache")
    assert corpus.name == "wikitext-2"
    assert text_of(corpus.train) == WIKI["wiki.train.raw"] and text_of(corpus.val) == WIKI["wiki.valid.raw"]


def test_wikitext_missing_names_tried_paths(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("OKADFA_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as err:
        load_corpus("wikitext-103", cache_dir=tmp_path / "cache")
    msg = str(err.value)
    for sub in ("wikitext-103-raw", "wikitext-103-raw-v1", "wikitext-103"):
        assert str(tmp_path / "data" / sub) in msg
    assert str(tmp_path / "hf") in msg and "--data" in msg and "OKADFA_DATA_DIR" in msg
    monkeypatch.delenv("OKADFA_DATA_DIR")
    with pytest.raises(FileNotFoundError, match="OKADFA_DATA_DIR is not set"):
        load_corpus("wikitext-2", cache_dir=tmp_path / "cache")


def test_wikitext_from_hf_cache(tmp_path, monkeypatch):
    """With `datasets` importable, the HF cache is loaded offline and its text column joined."""
    calls = []
    cache_file = tmp_path / "hf.arrow"
    cache_file.write_bytes(b"x")

    class Split:
        def __init__(self, text):
            self.lines = text.splitlines(keepends=True)
            self.cache_files = [{"filename": str(cache_file)}]

        def iter(self, batch_size):
            for i in range(0, len(self.lines), batch_size):
                yield {"text": self.lines[i:i + batch_size]}

    def load_dataset(path, name):
        calls.append((path, name, os.environ.get("HF_DATASETS_OFFLINE")))
        return {"train": Split(WIKI["wiki.train.raw"]), "validation": Split(WIKI["wiki.valid.raw"])}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.delenv("OKADFA_DATA_DIR", raising=False)
    corpus = load_corpus("wikitext-2", cache_dir=tmp_path / "cache")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "1")]
    assert text_of(corpus.train) == WIKI["wiki.train.raw"] and text_of(corpus.val) == WIKI["wiki.valid.raw"]


def test_text_file_split(tmp_path):
    text = "".join(f"line {i}: Zürich ☃\n" for i in range(100)).encode()
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    corpus = load_corpus(str(path), cache_dir=tmp_path / "cache", val_fraction=0.1)
    n_val = int(len(text) * 0.1)
    assert (len(corpus.train), len(corpus.val)) == (len(text) - n_val, n_val)
    assert bytes(corpus.train) + bytes(corpus.val) == text and corpus.val_bytes == n_val
    assert bytes(load_corpus(str(path), cache_dir=tmp_path / "cache", max_bytes=50).train) == text[:48]
    # Changing the file invalidates the cache.
    path.write_bytes(text + b"more\n")
    changed = load_corpus(str(path), cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert bytes(changed.train) + bytes(changed.val) == text + b"more\n"


def test_text_folder(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("second file\n")
    (root / "a.txt").write_text("first file\n")
    (root / "sub" / "c.txt").write_text("third, nested — file\n")
    (root / ".hidden").write_text("SECRET\n")
    (root / ".git" / "config").write_text("SECRET\n")
    corpus = load_corpus(str(root), cache_dir=tmp_path / "cache", val_fraction=0.25)
    whole = "first file\nsecond file\nthird, nested — file\n".encode()
    assert bytes(corpus.train) + bytes(corpus.val) == whole
    assert len(corpus.val) == int(len(whole) * 0.25)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".only-hidden").write_text("x")
    with pytest.raises(ValueError, match="no \\(non-hidden\\) files"):
        load_corpus(str(empty), cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(str(root), cache_dir=tmp_path / "cache", val_fraction=1.0)


def test_bpe_corpus_uint16_and_chunking_is_exact(tmp_path, monkeypatch):
    """A >256 vocab is stored as uint16, and tokenising in small chunks gives the whole-text tokens."""
    enc = tiny_encoding("tiny-chunks")
    tok = GPT2Tokenizer(enc)
    text = WIKI["wiki.train.raw"] * 4 + " the thing = \n\n théâtre \n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(data, "CHUNK", 64)
    corpus = load_corpus(str(tmp_path / "t.txt"), tokenizer=tok, cache_dir=tmp_path / "cache")
    assert corpus.vocab_size == 267 and corpus.train.dtype == np.uint16 and isinstance(corpus.val, np.memmap)
    assert np.concatenate([corpus.train, corpus.val]).tolist() == enc.encode_ordinary(text)
    assert tok.decode(corpus.train) + tok.decode(corpus.val) == text
    assert corpus.val_bytes == sum(len(enc.decode_single_token_bytes(int(t))) for t in corpus.val)
    assert len(corpus.val) == int((len(corpus.train) + len(corpus.val)) * 0.05)


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("abc " * 1000)

    def crash(self, chunk):
        raise KeyboardInterrupt
    monkeypatch.setattr(ByteTokenizer, "_encode_chunk", crash)
    with pytest.raises(KeyboardInterrupt):
        load_corpus(str(path), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert len(load_corpus(str(path), cache_dir=tmp_path / "cache").train) == 3800


# ---------------------------------------------------------------------------------------------------------------
# Batches

TOKENS = np.arange(5000, dtype=np.uint16)


def test_get_batch_shapes_and_shift():
    x, y = get_batch(TOKENS, step=0, batch_size=4, seq_len=16)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one token (TOKENS is consecutive)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # each row is one contiguous window
    assert int(x.min()) >= 0 and int(y.max()) <= 4999


def test_get_batch_deterministic_and_rank_slices():
    x1, y1 = get_batch(TOKENS, step=7, batch_size=4, seq_len=16, seed=3)
    x2, y2 = get_batch(TOKENS, step=7, batch_size=4, seq_len=16, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, get_batch(TOKENS, step=8, batch_size=4, seq_len=16, seed=3)[0])
    assert not torch.equal(x1, get_batch(TOKENS, step=7, batch_size=4, seq_len=16, seed=4)[0])
    parts = [get_batch(TOKENS, step=7, batch_size=4, seq_len=16, seed=3, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x1) and torch.equal(torch.cat([p[1] for p in parts]), y1)
    assert parts[0][0].shape == (2, 16)


def test_get_batch_errors():
    with pytest.raises(ValueError, match="divisible"):
        get_batch(TOKENS, step=0, batch_size=5, seq_len=8, world_size=2)
    with pytest.raises(ValueError, match="needs at least 17"):
        get_batch(TOKENS[:16], step=0, batch_size=1, seq_len=16)
    x, y = get_batch(TOKENS[:17], step=0, batch_size=2, seq_len=16)  # exactly one window fits
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[1], torch.arange(1, 17))


def test_val_batches():
    tokens = np.arange(103, dtype=np.uint8)
    batches = list(val_batches(tokens, batch_size=4, seq_len=10))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 10), (4, 10), (2, 10)]
    assert torch.equal(torch.cat([x for x, _ in batches]).flatten(), torch.arange(100))
    assert torch.equal(torch.cat([y for _, y in batches]).flatten(), torch.arange(1, 101))
    assert all(x.dtype == torch.int64 for x, _ in batches)
    assert len(list(val_batches(tokens, batch_size=4, seq_len=10, max_batches=2))) == 2
    with pytest.raises(ValueError):
        val_batches(tokens[:10], batch_size=4, seq_len=10)


# ---------------------------------------------------------------------------------------------------------------
# Hardening (issue 15): offline GPT-2, special files, a cache that cannot kill its readers

class Stuck(Exception):
    """Raised by `deadline` (not an OSError, so that no `except OSError` swallows it)."""


@contextlib.contextmanager
def deadline(seconds=20):
    """Fail (instead of hanging forever) when the block takes longer than `seconds`."""
    def expire(signum, frame):
        raise Stuck(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection and name lookup raises; returns the list of attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network access attempted in an offline test")
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture
def empty_tiktoken_caches(tmp_path, monkeypatch):
    """tiktoken's caches (TIKTOKEN_CACHE_DIR, its default under the temp dir) and ours, all empty."""
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is not installed (pip install tiktoken)")
    import tiktoken.registry
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    dirs = {name: tmp_path / name for name in ("tiktoken-cache", "tmp", "okadfa-cache")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(dirs["tiktoken-cache"]))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(dirs["tmp"]))
    monkeypatch.setenv("OKADFA_CACHE_DIR", str(dirs["okadfa-cache"]))
    return dirs


def test_gpt2_without_a_cached_encoding_never_touches_the_network(empty_tiktoken_caches, no_network):
    """Offline means offline: with every cache empty, loading 'gpt2' attempts no connection and
    fails in one line naming the two files, their source and where to put them."""
    with pytest.raises(RuntimeError) as err:
        get_tokenizer("gpt2")
    msg = str(err.value)
    assert no_network == [], f"a connection was attempted: {no_network}"
    assert "\n" not in msg
    cache = str(empty_tiktoken_caches["tiktoken-cache"])
    for part in ("vocab.bpe", "encoder.json", "TIKTOKEN_CACHE_DIR", cache, "openaipublic.blob.core.windows.net",
                 hashlib.sha1(data._GPT2_FILES["vocab.bpe"][0].encode()).hexdigest()):
        assert part in msg, part


def test_gpt2_never_touches_the_network_through_okadfa_train(empty_tiktoken_caches, no_network, tmp_path):
    import okadfa.training.train as train_mod
    (tmp_path / "t.txt").write_text("some text\n" * 50)
    with pytest.raises(SystemExit, match="vocab.bpe") as err:
        train_mod.main(["--tokenizer", "gpt2", "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"),
                        "--steps", "1"])
    assert no_network == [] and "\n" not in str(err.value.code)


def _data_gym_files(merges):
    """vocab.bpe and encoder.json (GPT-2's data-gym format) of a tiny byte-level BPE."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    order, char = list(printable), {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in printable):
        order.append(b)
        char[b] = chr(256 + n)
    encoder = {char[b]: i for i, b in enumerate(order)}
    lines = ["#version: 0.2"]
    for first, second in merges:
        lines.append("".join(char[b] for b in first) + " " + "".join(char[b] for b in second))
        encoder["".join(char[b] for b in first + second)] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    return ("\n".join(lines) + "\n").encode(), json.dumps(encoder).encode()


def test_gpt2_loads_from_local_cache_files_only(empty_tiktoken_caches, no_network, monkeypatch):
    """The encoding is read from tiktoken's cache (files named by the SHA-1 of their URL) or from
    ours (plain names), checked against the expected SHA-256, with no connection."""
    bpe, enc = _data_gym_files([(b"t", b"h"), (b"th", b"e")])
    files = {"vocab.bpe": ("https://example.invalid/gpt2/vocab.bpe", hashlib.sha256(bpe).hexdigest()),
             "encoder.json": ("https://example.invalid/gpt2/encoder.json", hashlib.sha256(enc).hexdigest())}
    monkeypatch.setattr(data, "_GPT2_FILES", files)
    monkeypatch.setattr(data, "_GPT2_VOCAB", 256 + 2 + 1)
    tik = empty_tiktoken_caches["tiktoken-cache"]
    (tik / hashlib.sha1(files["vocab.bpe"][0].encode()).hexdigest()).write_bytes(bpe)
    ours = empty_tiktoken_caches["okadfa-cache"] / "tiktoken"
    ours.mkdir()
    (ours / "encoder.json").write_bytes(enc)
    tok = get_tokenizer("gpt2")
    assert tok.name == "gpt2" and tok.vocab_size == 259
    ids = tok.encode("the theme")
    assert 257 in ids and tok.decode(ids) == "the theme"
    assert no_network == []
    (ours / "encoder.json").write_bytes(enc.replace(b'"<|endoftext|>"', b'"<|endoftext|>" '))   # another hash
    with pytest.raises(RuntimeError, match="encoder.json.*SHA-256") as err:
        get_tokenizer("gpt2")
    assert str(ours / "encoder.json") in str(err.value)
    assert no_network == []


def _mkfifo(path):
    os.mkfifo(path)
    return path


def test_special_files_in_a_data_dir_are_skipped_with_a_warning(tmp_path):
    """A FIFO (which used to block the reader forever), a symlink to one and a dangling symlink
    inside --data DIR are skipped, each named in a warning; the regular files are read."""
    root = tmp_path / "texts"
    root.mkdir()
    (root / "a.txt").write_text("first file\n")
    (root / "c.txt").write_text("third file\n")
    _mkfifo(root / "b.fifo")
    (root / "d-link").symlink_to(root / "b.fifo")
    (root / "e-dangling").symlink_to(tmp_path / "nowhere")
    with deadline(), pytest.warns(UserWarning) as caught:
        corpus = load_corpus(str(root), cache_dir=tmp_path / "cache", val_fraction=0.25)
    assert bytes(corpus.train) + bytes(corpus.val) == b"first file\nthird file\n"
    msg = " ".join(str(w.message) for w in caught)
    for name in ("b.fifo", "d-link", "e-dangling"):
        assert name in msg, msg
    assert "FIFO" in msg


@pytest.mark.parametrize("kind", ["fifo", "chardev", "socket"])
def test_a_special_file_given_as_data_is_refused_clearly(tmp_path, kind):
    if kind == "fifo":
        path = _mkfifo(tmp_path / "pipe")
    elif kind == "chardev":
        path = Path("/dev/null")
    else:
        path = tmp_path / "sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
    with deadline(), pytest.raises(ValueError) as err:
        load_corpus(str(path), cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert str(path) in msg and "not a regular file" in msg and "directory has no" not in msg
    assert {"fifo": "FIFO", "chardev": "character device", "socket": "socket"}[kind] in msg


def test_a_special_file_that_appears_at_read_time_is_refused(tmp_path, monkeypatch):
    """A file swapped for a FIFO between listing and reading is refused when opened, not read."""
    root = tmp_path / "texts"
    root.mkdir()
    (root / "a.txt").write_text("hello\n" * 10)
    real = data._text_files

    def swap(path):
        files = real(path)
        os.remove(root / "a.txt")
        os.mkfifo(root / "a.txt")
        return files
    monkeypatch.setattr(data, "_text_files", swap)
    with deadline(), pytest.raises(ValueError, match="a.txt.*not a regular file"):
        load_corpus(str(root), cache_dir=tmp_path / "cache")


def _cache_files(cache):
    meta = next(Path(cache).glob("*.json"))
    prefix = str(meta)[:-len(".json")]
    return meta, Path(prefix + ".train.bin"), Path(prefix + ".val.bin")


def test_cache_files_are_written_once_atomically_and_read_only(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("abc " * 1000)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    load_corpus(str(path), cache_dir=tmp_path / "cache")
    files = _cache_files(tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(p.name for p in files)  # no temp left
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o222 == 0, f"{p.name} is writable"
    if all(isinstance(s, str) for s in synced):
        assert str(tmp_path / "cache") in synced                             # the directory, after the renames
        assert sum(".tmp" in s for s in synced) >= 3                          # each file before its rename


def _damage(kind, meta, train, val):
    for p in (meta, train, val):
        os.chmod(p, 0o644)
    if kind == "truncated":
        os.truncate(train, train.stat().st_size // 2)
    elif kind == "extended":
        with open(val, "ab") as f:
            f.write(b"garbage")
    elif kind == "flipped":
        raw = bytearray(train.read_bytes())
        raw[len(raw) // 2] ^= 0x55
        train.write_bytes(bytes(raw))
    elif kind == "empty":
        train.write_bytes(b"")
    elif kind == "bad-json":
        meta.write_text("{not json")
    elif kind == "bad-types":
        info = json.loads(meta.read_text())
        meta.write_text(json.dumps(dict(info, train_tokens="many", val_tokens=-3)))
    elif kind == "other-dtype":      # sizes consistent with float32, which token ids cannot be
        info = json.loads(meta.read_text())
        meta.write_text(json.dumps(dict(info, dtype="float32", train_tokens=info["train_tokens"] // 4,
                                        val_tokens=info["val_tokens"] // 4)))
        os.truncate(train, info["train_tokens"] // 4 * 4)
        os.truncate(val, info["val_tokens"] // 4 * 4)
    elif kind == "fifo-json":
        meta.unlink()
        os.mkfifo(meta)
    elif kind == "fifo-bin":
        val.unlink()
        os.mkfifo(val)


def _reload_after_damage(tmp_path, kind, first_check=lambda corpus: None):
    """Load a small corpus into a cache, damage the cache (`_damage`), load it again (under a
    deadline) and check that the tokens are those of the first load."""
    (tmp_path / "t.txt").write_bytes("".join(f"line {i}\n" for i in range(400)).encode())
    first = load_corpus(str(tmp_path / "t.txt"), cache_dir=tmp_path / "cache")
    first_check(first)
    train, val = bytes(first.train), bytes(first.val)
    del first
    _damage(kind, *_cache_files(tmp_path / "cache"))
    with deadline():
        again = load_corpus(str(tmp_path / "t.txt"), cache_dir=tmp_path / "cache")
    assert again.train.dtype == np.uint8 and bytes(again.train) == train and bytes(again.val) == val
    return train


@pytest.mark.parametrize("kind", ["truncated", "extended", "flipped", "empty", "bad-json", "bad-types",
                                  "other-dtype", "fifo-json", "fifo-bin"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, kind):
    train = _reload_after_damage(tmp_path, kind)
    meta, *_ = _cache_files(tmp_path / "cache")
    assert json.loads(meta.read_text())["train_tokens"] == len(train)


@pytest.mark.parametrize("kind", ["truncated", "extended", "empty", "other-dtype", "fifo-bin"])
def test_large_token_files_are_mapped_directly_after_a_size_check(tmp_path, monkeypatch, kind):
    """Above SNAPSHOT_MAX_BYTES a token file is mapped from the cache itself (no copy, no checksum),
    still only after checking, on the open file it maps, that it is regular and of the recorded size."""
    monkeypatch.setattr(data, "SNAPSHOT_MAX_BYTES", 0)

    def mapped_from_the_cache(corpus):
        assert corpus.train.filename is not None and Path(corpus.train.filename).parent == tmp_path / "cache"
    _reload_after_damage(tmp_path, kind, mapped_from_the_cache)


def test_a_cache_entry_that_is_a_directory_is_refused_clearly(tmp_path):
    (tmp_path / "t.txt").write_text("hello world\n" * 100)
    load_corpus(str(tmp_path / "t.txt"), cache_dir=tmp_path / "cache")
    meta, train, val = _cache_files(tmp_path / "cache")
    train.unlink()
    train.mkdir()
    with pytest.raises(OSError, match=f"{train.name}.*not a regular file"):
        load_corpus(str(tmp_path / "t.txt"), cache_dir=tmp_path / "cache")


_READER = r"""
import sys
from okadfa.training.data import get_batch, load_corpus, val_batches
corpus = load_corpus(sys.argv[1], cache_dir=sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
total = int(corpus.train.sum()) + int(corpus.val.sum())
total += sum(int(x.sum()) for x, _ in val_batches(corpus.val, 4, 16))
total += int(get_batch(corpus.train, 3, 4, 16)[0].sum())
print("ok", total, flush=True)
"""


def test_a_running_reader_survives_its_cache_files_being_truncated(tmp_path):
    """Truncating the cache files under a process that is using them (it used to die of SIGBUS
    on its next access) leaves that process unharmed."""
    (tmp_path / "t.txt").write_bytes(bytes(range(32, 127)) * 2000)
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(tmp_path / "t.txt"), str(tmp_path / "cache")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "ready", reader.stderr.read()
        _, train, val = _cache_files(tmp_path / "cache")
        for p in (train, val):
            os.chmod(p, 0o644)
            os.truncate(p, 0)
        out, err = reader.communicate("go\n", timeout=120)
    finally:
        reader.kill()
    assert reader.returncode == 0, f"reader died ({reader.returncode}): {err}"
    assert out.startswith("ok")
