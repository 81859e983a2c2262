"""Language-model training data: sources, tokenisers, memory-mapped token arrays, batches.

Sources (`load_corpus(spec)`):

* ``"stdlib"`` (default): the running interpreter's standard-library ``*.py`` files
  (no tests, no site-/dist-packages), sorted by relative path and concatenated,
  capped at `max_bytes` (16 MiB by default). Exists on every machine; no download.
* ``"wikitext-2"`` / ``"wikitext-103"``, or a directory holding ``wiki.train.raw``
  and ``wiki.valid.raw``: the raw WikiText files with their own train/valid split.
* any other file or directory: its (non-hidden) files concatenated as bytes.

For the concatenated sources (stdlib, files) the last `val_fraction` of the tokens
is the validation split. Tokens are written once to ``<cache>/<hash>.{train,val}.bin``
(+ ``<hash>.json``), keyed by the source files' paths, sizes and mtimes and the
settings, and memory-mapped read-only afterwards.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

__all__ = ["ngram_levels", "Tokenizer", "ByteTokenizer", "GPT2Tokenizer", "get_tokenizer", "Corpus", "load_corpus", "get_batch",
           "val_batches"]

FORMAT = 1                      # bump when the cache layout or tokenisation changes
STDLIB_MAX_BYTES = 16 << 20     # default cap for the "stdlib" corpus
CHUNK = 1 << 20                 # bytes tokenised at a time (bounds RAM)
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_WIKI_DIRS = {"wikitext-2": ("wikitext-2-raw", "wikitext-2-raw-v1", "wikitext-2"),
              "wikitext-103": ("wikitext-103-raw", "wikitext-103-raw-v1", "wikitext-103")}


# ----------------------------------------------------------------------------------------------------------------
# Tokenisers

class Tokenizer(abc.ABC):
    """Interface: `name`, `vocab_size`, `encode(str | bytes) -> list[int]`, `decode(ids) -> str`."""
    name: str
    vocab_size: int

    @abc.abstractmethod
    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of `text`."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of token `ids` (invalid UTF-8 replaced)."""

    def _encode_chunk(self, data: bytes) -> np.ndarray:
        """Token ids of a chunk of UTF-8 bytes (chunks are cut where this equals whole-text tokenisation)."""
        return np.asarray(self.encode(data), dtype=np.int64)

    @abc.abstractmethod
    def _token_lengths(self) -> np.ndarray:
        """Number of UTF-8 bytes each token id stands for (to count the bytes behind a token array)."""


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte: vocab_size 256."""
    name = "bytes"
    vocab_size = 256

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError("ByteTokenizer.decode: ids must lie in [0, 255]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def _encode_chunk(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def _token_lengths(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)


_TIKTOKEN_HELP = ("The 'gpt2' tokenizer needs the `tiktoken` package (pip install tiktoken) and its cached gpt2 "
                  "encoding files (vocab.bpe and encoder.json, fetched once from openaipublic.blob.core.windows.net): "
                  "on a machine with network run `python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` with "
                  "TIKTOKEN_CACHE_DIR set to a directory, copy that directory here and set TIKTOKEN_CACHE_DIR to it "
                  "(no network is used at run time). Or use tokenizer='bytes'.")


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE through `tiktoken` (vocab 50257), or any given `tiktoken.Encoding`."""

    def __init__(self, encoding=None):
        if encoding is None:
            try:
                import tiktoken
            except ImportError as e:
                raise RuntimeError(f"tiktoken is not installed. {_TIKTOKEN_HELP}") from e
            try:
                encoding = tiktoken.get_encoding("gpt2")
            except Exception as e:  # network / cache errors come in many types
                raise RuntimeError(f"could not load tiktoken's 'gpt2' encoding locally "
                                   f"({type(e).__name__}: {e}). {_TIKTOKEN_HELP}") from e
        self.encoding = encoding
        self.name = "gpt2" if encoding.name == "gpt2" else f"tiktoken:{encoding.name}"
        self.vocab_size = encoding.n_vocab
        self._lengths = None

    def encode(self, text: str | bytes) -> list[int]:
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", errors="replace")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in np.asarray(ids).reshape(-1)], errors="replace")

    def _token_lengths(self) -> np.ndarray:
        if self._lengths is None:
            lengths = np.zeros(self.vocab_size, dtype=np.int64)
            for i in range(self.vocab_size):
                try:
                    lengths[i] = len(self.encoding.decode_single_token_bytes(i))
                except KeyError:  # an unused id
                    pass
            self._lengths = lengths
        return self._lengths


def get_tokenizer(name: str) -> Tokenizer:
    """"bytes" (256 ids) or "gpt2" (tiktoken GPT-2 BPE, 50257 ids; RuntimeError if it cannot be loaded)."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: use 'bytes' or 'gpt2'")


# ----------------------------------------------------------------------------------------------------------------
# Sources: each is a list of byte-chunk streams plus a cache key

def _stdlib_files(max_bytes: int) -> list[tuple[Path, int]]:
    """(path, bytes to read) for the sorted stdlib *.py files, up to max_bytes in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} does not exist: pass a text file or "
                                f"directory as the data source instead of 'stdlib'")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_STDLIB_DIRS]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    chosen, total = [], 0
    for path in found:
        if total >= max_bytes:
            break
        take = min(path.stat().st_size, max_bytes - total)
        if take > 0:
            chosen.append((path, take))
            total += take
    return chosen


def _text_files(root: Path) -> list[Path]:
    """Non-hidden files under root (or root itself), sorted by relative path."""
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_files(files: list[tuple[Path, int | None]], limit: int | None = None) -> Iterator[bytes]:
    """Stream the files' bytes (each up to its own cap) in blocks, stopping after `limit` bytes in all."""
    left = limit
    for path, cap in files:
        with open(path, "rb") as f:
            remaining = cap
            while left is None or left > 0:
                n = CHUNK if remaining is None else min(CHUNK, remaining)
                if left is not None:
                    n = min(n, left)
                block = f.read(n) if n > 0 else b""
                if not block:
                    break
                if remaining is not None:
                    remaining -= len(block)
                if left is not None:
                    left -= len(block)
                yield block


def _stat_key(paths: Iterable[Path]) -> list:
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def _is_wikitext_dir(path: Path) -> bool:
    return (path / "wiki.train.raw").is_file() and (path / "wiki.valid.raw").is_file()


def _wikitext_files(d: Path, max_bytes: int | None):
    """(train stream, val stream, key) for a raw WikiText directory; max_bytes caps the train split only."""
    train, val = d / "wiki.train.raw", d / "wiki.valid.raw"
    return (lambda: _read_files([(train, None)], max_bytes), lambda: _read_files([(val, None)]),
            ["wikitext-dir", _stat_key([train, val])])


def _wikitext_hf(name: str, max_bytes: int | None):
    """The same from a local Hugging Face datasets cache (offline); raises with a reason if unavailable."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets  # ImportError is reported by the caller
    if hasattr(datasets, "config") and hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
        datasets.config.HF_DATASETS_OFFLINE = True
    ds = datasets.load_dataset("wikitext", f"{name}-raw-v1")

    def stream(split, limit=None):
        left = limit
        for batch in ds[split].iter(batch_size=1000):
            block = "".join(batch["text"]).encode("utf-8")
            if left is not None:
                block, left = block[:left], left - min(left, len(block))
            if block:
                yield block
            if left == 0:
                return
    files = [(f["filename"], os.path.getsize(f["filename"]), os.stat(f["filename"]).st_mtime_ns)
             for split in ("train", "validation") for f in ds[split].cache_files]
    return (lambda: stream("train", max_bytes), lambda: stream("validation"), ["wikitext-hf", name, files])


def _find_wikitext(name: str, max_bytes: int | None):
    tried = []
    base = os.environ.get("OKADFA_DATA_DIR")
    if base:
        for sub in _WIKI_DIRS[name]:
            d = Path(base).expanduser() / sub
            if _is_wikitext_dir(d):
                return _wikitext_files(d, max_bytes)
            tried.append(f"{d} (no wiki.train.raw + wiki.valid.raw)")
    else:
        tried.append("$OKADFA_DATA_DIR/{" + ",".join(_WIKI_DIRS[name]) + "} (OKADFA_DATA_DIR is not set)")
    hf_cache = os.environ.get("HF_DATASETS_CACHE") or str(Path("~/.cache/huggingface/datasets").expanduser())
    try:
        return _wikitext_hf(name, max_bytes)
    except ImportError:
        tried.append(f"Hugging Face datasets cache {hf_cache} (the `datasets` package is not installed)")
    except Exception as e:
        tried.append(f"Hugging Face datasets cache {hf_cache} (offline load_dataset('wikitext', '{name}-raw-v1') "
                     f"failed: {type(e).__name__}: {str(e)[:200]})")
    raise FileNotFoundError(
        f"{name} not found. Tried: " + "; ".join(tried) + f". Download the raw zip ({name}-raw-v1.zip, holding "
        f"wiki.train.raw, wiki.valid.raw, wiki.test.raw), unzip it and pass the directory (--data DIR), or put it "
        f"at $OKADFA_DATA_DIR/{_WIKI_DIRS[name][0]} and set OKADFA_DATA_DIR.")


# ----------------------------------------------------------------------------------------------------------------
# Tokenising into the cache

def _safe_cut(buf: bytes, limit: int) -> int:
    """A cut point ≤ limit where GPT-2's pre-tokeniser splits anyway: after "\\n" followed by " " + ASCII
    non-space, or between two ASCII non-spaces around "\\n" (real text has one in every chunk). Falls back to
    the last newline, then to a UTF-8 character boundary (deterministic, but may tokenise differently there)."""
    i = buf.rfind(b"\n", 0, limit - 2)
    while i > 0:
        a, b, c = buf[i - 1], buf[i + 1], buf[i + 2]
        if (b == 0x20 and 0x20 < c < 0x7F) or (0x20 < a < 0x7F and 0x20 < b < 0x7F):
            return i + 1
        i = buf.rfind(b"\n", 0, i)
    i = buf.rfind(b"\n", 0, limit)
    if i >= 0:
        return i + 1
    cut = limit
    while cut > 0 and buf[cut] & 0xC0 == 0x80:  # never split a multi-byte character
        cut -= 1
    return cut or limit


def _pieces(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Re-cut a byte stream into pieces of at most CHUNK bytes at safe points."""
    buf = b""
    for block in blocks:
        buf += block
        while len(buf) > CHUNK:
            cut = _safe_cut(buf, CHUNK)
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _dtype_for(vocab_size: int):
    return np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _tokenize_to(path: str, blocks: Iterable[bytes], tok: Tokenizer, dtype) -> int:
    """Write the stream's token ids to path; returns their number."""
    n_tok = 0
    with open(path, "wb") as f:
        for piece in _pieces(blocks):
            ids = tok._encode_chunk(piece)
            f.write(ids.astype(dtype, copy=False).tobytes())
            n_tok += len(ids)
    return n_tok


def _count_bytes(path: str, dtype, start: int, stop: int, tok: Tokenizer) -> int:
    """UTF-8 bytes behind tokens [start, stop) of a token file."""
    if stop <= start:
        return 0
    lengths, arr, total = tok._token_lengths(), np.memmap(path, dtype=dtype, mode="r"), 0
    for s in range(start, stop, CHUNK):
        total += int(lengths[np.asarray(arr[s:min(stop, s + CHUNK)])].sum())
    del arr
    return total


def _build(prefix: Path, meta: dict, tok: Tokenizer, dtype, *, concat: Callable | None = None,
           val_fraction: float = 0.05, train: Callable | None = None, val: Callable | None = None) -> dict:
    """Tokenise a source into <prefix>.train.bin / .val.bin / .json via temp files and os.replace.

    Either `concat` (one stream; its last val_fraction of tokens is validation) or `train` + `val` streams."""
    tag = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp = {s: f"{prefix}.{s}{tag}" for s in ("train.bin", "val.bin", "json")}
    itemsize = np.dtype(dtype).itemsize
    try:
        if concat is not None:
            n = _tokenize_to(tmp["train.bin"], concat(), tok, dtype)
            if n < 2:
                raise ValueError(f"{meta['source']}: {n} token(s); need at least 2 to split into train and validation")
            n_val = min(n - 1, max(1, int(n * val_fraction)))
            n_train = n - n_val
            train_bytes = _count_bytes(tmp["train.bin"], dtype, 0, n_train, tok)
            val_bytes = _count_bytes(tmp["train.bin"], dtype, n_train, n, tok)
            with open(tmp["train.bin"], "r+b") as src, open(tmp["val.bin"], "wb") as dst:
                src.seek(n_train * itemsize)
                while block := src.read(CHUNK):
                    dst.write(block)
                src.truncate(n_train * itemsize)
        else:
            n_train = _tokenize_to(tmp["train.bin"], train(), tok, dtype)
            n_val = _tokenize_to(tmp["val.bin"], val(), tok, dtype)
            train_bytes = _count_bytes(tmp["train.bin"], dtype, 0, n_train, tok)
            val_bytes = _count_bytes(tmp["val.bin"], dtype, 0, n_val, tok)
        for split, count in (("train", n_train), ("validation", n_val)):
            if count == 0:
                raise ValueError(f"{meta['source']}: the {split} split is empty; provide non-empty text")
        meta = dict(meta, dtype=np.dtype(dtype).name, train_tokens=n_train, val_tokens=n_val,
                    train_bytes=train_bytes, val_bytes=val_bytes)
        Path(tmp["json"]).write_text(json.dumps(meta, indent=1))
        os.replace(tmp["train.bin"], f"{prefix}.train.bin")
        os.replace(tmp["val.bin"], f"{prefix}.val.bin")
        os.replace(tmp["json"], f"{prefix}.json")  # written last: marks the pair as complete
        return meta
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)


def _cached(prefix: Path) -> dict | None:
    """The metadata if <prefix>.{json,train.bin,val.bin} are complete, else None."""
    try:
        meta = json.loads(Path(f"{prefix}.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        ok = (os.path.getsize(f"{prefix}.train.bin") == meta["train_tokens"] * itemsize
              and os.path.getsize(f"{prefix}.val.bin") == meta["val_tokens"] * itemsize)
        return meta if ok else None
    except (OSError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Public API

@dataclass
class Corpus:
    """Token ids of a training and a validation split (1-D read-only memmaps)."""
    name: str
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    val_bytes: int  # UTF-8 bytes behind `val`: bits/byte = loss_nats * len(val) / val_bytes / ln 2

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def load_corpus(spec: str = "stdlib", *, tokenizer: str | Tokenizer = "bytes", cache_dir=None,
                val_fraction: float = 0.05, max_bytes: int | None = None) -> Corpus:
    """Load (tokenising once into the cache) "stdlib", "wikitext-2", "wikitext-103", a WikiText directory,
    a text file or a directory of text files. `max_bytes` caps the text read (stdlib: 16 MiB by default;
    WikiText: the train split only); `tokenizer` is "bytes", "gpt2" or a Tokenizer."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    spec = str(spec)
    split = {}
    if spec == "stdlib":
        max_bytes = STDLIB_MAX_BYTES if max_bytes is None else max_bytes
        files = _stdlib_files(max_bytes)
        key = ["stdlib", [k + (take,) for k, (_, take) in zip(_stat_key(p for p, _ in files), files)]]
        split["concat"] = lambda: _read_files(files)
    elif spec in _WIKI_DIRS:
        train, val, key = _find_wikitext(spec, max_bytes)
        split.update(train=train, val=val)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data source {spec!r} does not exist: give 'stdlib', 'wikitext-2', "
                                    f"'wikitext-103', a WikiText directory (wiki.train.raw, wiki.valid.raw), a text "
                                    f"file or a directory of text files")
        if path.is_dir() and _is_wikitext_dir(path):
            train, val, key = _wikitext_files(path, max_bytes)
            split.update(train=train, val=val)
        else:
            files = _text_files(path)
            if not files:
                raise ValueError(f"{spec}: the directory has no (non-hidden) files; put text files in it")
            key = ["files", _stat_key(files)]
            split["concat"] = lambda: _read_files([(p, None) for p in files], max_bytes)
    key += [tok.name, tok.vocab_size, max_bytes, val_fraction, FORMAT]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    cache = Path(cache_dir if cache_dir is not None
                 else os.environ.get("OKADFA_CACHE_DIR") or "~/.cache/okadfa").expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    prefix = cache / digest
    meta = _cached(prefix)
    if meta is None:
        dtype = _dtype_for(tok.vocab_size)
        meta = _build(prefix, {"format": FORMAT, "source": spec, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
                               "max_bytes": max_bytes, "val_fraction": val_fraction}, tok, dtype,
                      val_fraction=val_fraction, **split)
    dtype = np.dtype(meta["dtype"])
    return Corpus(name=spec, tokenizer=tok,
                  train=np.memmap(f"{prefix}.train.bin", dtype=dtype, mode="r", shape=(meta["train_tokens"],)),
                  val=np.memmap(f"{prefix}.val.bin", dtype=dtype, mode="r", shape=(meta["val_tokens"],)),
                  val_bytes=meta["val_bytes"])


def _check_lengths(tokens: np.ndarray, batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the token array has {len(tokens)} tokens; seq_len={seq_len} needs at least "
                         f"{seq_len + 1}: use a shorter seq_len or more data")


def _to_xy(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def get_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, *, seed: int = 0,
              rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch at `step`: (x, y) int64 of shape (batch_size // world_size, seq_len).

    The global batch is `batch_size` random windows of seq_len + 1 tokens whose starts depend on (seed, step)
    only, so resuming at any step, or on another number of ranks, sees the same data. Rank r gets rows
    [r*b, (r+1)*b) with b = batch_size // world_size; y is x shifted by one token."""
    _check_lengths(tokens, batch_size, seq_len)
    if world_size < 1 or batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} must be divisible by world_size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, {world_size})")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be non-negative, got step={step}, seed={seed}")
    rng = np.random.Generator(np.random.PCG64([seed, step]))
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    b = batch_size // world_size
    return _to_xy(np.stack([tokens[s:s + seq_len + 1] for s in starts[rank * b:(rank + 1) * b]]))


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start of `tokens`, batch_size per batch (the last may be
    smaller), at most max_batches batches. Yields (x, y) int64 of shape (≤ batch_size, seq_len)."""
    _check_lengths(tokens, batch_size, seq_len)
    n_windows = (len(tokens) - 1) // seq_len
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)

    def batches():
        for i in range(n_batches):
            first, k = i * batch_size, min(batch_size, n_windows - i * batch_size)
            span = np.asarray(tokens[first * seq_len:(first + k) * seq_len + 1])
            yield _to_xy(np.stack([span[j * seq_len:(j + 1) * seq_len + 1] for j in range(k)]))
    return batches()


def ngram_levels(train: np.ndarray, val: np.ndarray, seq_len: int, windows: int, *, mu: float = 1.0) -> dict:
    """Reference levels for a language model's validation loss: the cross-entropy (nats/token) of a
    unigram and of a bigram model, estimated on `train`, on exactly the targets that `val_batches`
    yields for `windows` windows of `seq_len` (what `okadfa train` evaluates).

    Unigram: add-one counts. Bigram: p(b | a) = (c(a, b) + mu·p_unigram(b)) / (c(a) + mu). A model
    above the unigram level has learned no more than token frequencies; below the bigram level it
    uses more than the previous token.
    """
    n = min(windows, (len(val) - 1) // seq_len) * seq_len
    if n < 1:
        raise ValueError(f"val has {len(val)} tokens: no window of {seq_len + 1}")
    train = np.asarray(train, dtype=np.int64)
    prev, nxt = np.asarray(val[:n], dtype=np.int64), np.asarray(val[1:n + 1], dtype=np.int64)
    vocab = int(max(train.max(), prev.max(), nxt.max())) + 1
    uni_counts = np.bincount(train, minlength=vocab).astype(np.float64)
    p_uni = (uni_counts + 1) / (uni_counts.sum() + vocab)
    pairs, counts = np.unique(train[:-1] * vocab + train[1:], return_counts=True)
    wanted = prev * vocab + nxt
    at = np.clip(np.searchsorted(pairs, wanted), 0, len(pairs) - 1)
    c_ab = np.where(pairs[at] == wanted, counts[at], 0)
    c_a = np.bincount(train[:-1], minlength=vocab)[prev]
    p_bi = (c_ab + mu * p_uni[nxt]) / (c_a + mu)
    return {"unigram": float(-np.log(p_uni[nxt]).mean()), "bigram": float(-np.log(p_bi).mean()), "tokens": int(n)}
