"""Language-model training data: sources, tokenisers, memory-mapped token arrays, batches.

Sources (`load_corpus(spec)`):

* ``"stdlib"`` (default): the running interpreter's standard-library ``*.py`` files
  (no tests, no site-/dist-packages), sorted by relative path and concatenated,
  capped at `max_bytes` (16 MiB by default). Exists on every machine; no download.
* ``"wikitext-2"`` / ``"wikitext-103"``, or a directory holding ``wiki.train.raw``
  and ``wiki.valid.raw``: the raw WikiText files with their own train/valid split.
* any other file or directory: its (non-hidden) files concatenated as bytes.

For the concatenated sources (stdlib, files) the last `val_fraction` of the tokens
is the validation split. Only regular files are read: a FIFO, socket or device given
as the source is refused (ValueError naming it and its kind), and one inside a source
directory (or a dangling symlink) is skipped with a UserWarning naming it, so nothing
can block the reader.

Tokens are written once to ``<cache>/<hash>.{train,val}.bin`` (+ ``<hash>.json``),
keyed by the source files' paths, sizes and mtimes and the settings: each file goes to
a temporary file, is fsync'ed, made read-only and renamed into place (the JSON last),
then the directory is fsync'ed; a published file is never opened for writing again.
A reader checks the JSON (format, settings, dtype, counts) and each file (a regular
file of exactly the recorded size; up to SNAPSHOT_MAX_BYTES also its SHA-256) before
mapping it; a damaged or foreign entry is rebuilt. Token files up to SNAPSHOT_MAX_BYTES
(256 MiB) are copied into sealed anonymous memory (memfd) and mapped from there, so
nothing done to the cache files afterwards (truncation included) can fault a running
reader; larger ones are memory-mapped from the cache file itself.

The "gpt2" tokenizer never uses the network: the encoding's two files (vocab.bpe,
encoder.json) are looked up in tiktoken's cache (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR
or its default <tmp>/data-gym-cache, under the SHA-1 of their URL) and in ours
(<OKADFA_CACHE_DIR>/tiktoken, under their own names), checked against their SHA-256,
and a RuntimeError says which file to put where when they are missing.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import math
import os
import stat
import sysconfig
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .files import fsync_directory

try:
    import fcntl as fcntl_mod
except ImportError:     # not POSIX: no file sealing
    fcntl_mod = None

__all__ = ["ngram_levels", "Tokenizer", "ByteTokenizer", "GPT2Tokenizer", "get_tokenizer", "Corpus", "load_corpus", "get_batch",
           "val_batches"]

FORMAT = 2                      # bump when the cache layout or tokenisation changes (2: SHA-256 in the metadata)
STDLIB_MAX_BYTES = 16 << 20     # default cap for the "stdlib" corpus
CHUNK = 1 << 20                 # bytes tokenised at a time (bounds RAM)
SNAPSHOT_MAX_BYTES = 256 << 20  # token files up to this size are checksummed and read into sealed memory
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


# GPT-2's encoding as tiktoken fetches it (tiktoken_ext.openai_public.gpt2): file -> (URL, SHA-256).
_GPT2_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
_GPT2_FILES = {
    "vocab.bpe": (_GPT2_BASE + "vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": (_GPT2_BASE + "encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
_GPT2_VOCAB = 50257
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _tiktoken_cache_dirs() -> list[tuple[Path, str]]:
    """(directory, how it was chosen) of every local cache the GPT-2 files may be in, tiktoken's first."""
    dirs = []
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            dirs.append((Path(os.environ[var]).expanduser(), f"${var}"))
    dirs.append((Path(tempfile.gettempdir()) / "data-gym-cache", "tiktoken's default cache"))
    dirs.append((_cache_root() / "tiktoken", "okadfa's cache"))
    seen, unique = set(), []
    for d, why in dirs:
        if str(d) not in seen:
            seen.add(str(d))
            unique.append((d, why))
    return unique


def _read_regular(path: Path, limit: int = 64 << 20) -> bytes | None:
    """The bytes of path if it is a regular file (never blocking on a FIFO), else None."""
    try:
        with _open_regular(path) as f:
            return f.read(limit)
    except (OSError, ValueError):
        return None


def _gpt2_files() -> dict[str, bytes]:
    """{file name: bytes} of GPT-2's vocab.bpe and encoder.json from the local caches (hash-checked);
    RuntimeError (one line) naming what is missing, where it was looked for and where to put it."""
    found, wrong = {}, []
    dirs = _tiktoken_cache_dirs()
    for name, (url, sha256) in _GPT2_FILES.items():
        cache_name = hashlib.sha1(url.encode()).hexdigest()
        for d, _ in dirs:
            for candidate in (d / cache_name, d / name):
                content = _read_regular(candidate)
                if content is None:
                    continue
                if hashlib.sha256(content).hexdigest() == sha256:
                    found[name] = content
                    break
                wrong.append(f"{candidate} is not {name} (its SHA-256 differs)")
            if name in found:
                break
    missing = [n for n in _GPT2_FILES if n not in found]
    if missing:
        target, how = dirs[0]
        wanted = "; ".join(f"{n} from {_GPT2_FILES[n][0]} (SHA-256 {_GPT2_FILES[n][1]}) saved as "
                           f"{target / hashlib.sha1(_GPT2_FILES[n][0].encode()).hexdigest()}" for n in missing)
        raise RuntimeError(
            f"the GPT-2 encoding is not in a local cache and okadfa never downloads at run time: missing {wanted} "
            f"({how}; a file under its own name in {_cache_root() / 'tiktoken'} also works). On a machine with "
            f"network, run TIKTOKEN_CACHE_DIR=DIR python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\", copy "
            f"DIR here and set TIKTOKEN_CACHE_DIR=DIR. "
            + (" ".join(w + "." for w in wrong) + " " if wrong else "")
            + "Looked in: " + ", ".join(f"{d} ({why})" for d, why in dirs) + ". Or use --tokenizer bytes.")
    return found


def _data_gym_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """GPT-2's BPE ranks from its data-gym files (what tiktoken.load.data_gym_to_mergeable_bpe_ranks does,
    reading bytes we hold instead of a URL)."""
    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    to_byte = {chr(b): b for b in order}
    for n, b in enumerate(b for b in range(256) if b not in to_byte.values()):
        order.append(b)
        to_byte[chr(256 + n)] = b

    def decode(text):
        return bytes(to_byte[c] for c in text)
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    for line in vocab_bpe.decode("utf-8").split("\n")[1:-1]:
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)
    encoder = {decode(k): v for k, v in json.loads(encoder_json).items()}
    encoder.pop(b"<|endoftext|>", None)
    encoder.pop(b"<|startoftext|>", None)
    if encoder != ranks:
        raise RuntimeError("GPT-2's encoder.json does not match its vocab.bpe")
    return ranks


def _load_gpt2_offline(tiktoken):
    """tiktoken's 'gpt2' Encoding from local files only (an encoding already loaded in this process is reused)."""
    registry = getattr(tiktoken, "registry", None)
    loaded = getattr(registry, "ENCODINGS", {}).get("gpt2") if registry is not None else None
    if loaded is not None:
        return loaded
    files = _gpt2_files()
    ranks = _data_gym_ranks(files["vocab.bpe"], files["encoder.json"])
    try:
        from tiktoken_ext.openai_public import r50k_pat_str as pattern
    except ImportError:
        pattern = _GPT2_PATTERN
    n_vocab = len(ranks) + 1
    if n_vocab != _GPT2_VOCAB:
        raise RuntimeError(f"the GPT-2 files give {n_vocab} tokens, not {_GPT2_VOCAB}")
    return tiktoken.Encoding("gpt2", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)}, explicit_n_vocab=n_vocab)


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE through `tiktoken` (vocab 50257), or any given `tiktoken.Encoding`.

    With no encoding given, GPT-2's files come from local caches only (never the network);
    RuntimeError saying which file to put where when they are missing."""

    def __init__(self, encoding=None):
        if encoding is None:
            try:
                import tiktoken
            except ImportError as e:
                raise RuntimeError("tiktoken is not installed: pip install tiktoken (or use tokenizer='bytes'); "
                                   "its GPT-2 files must then be in a local cache, see TIKTOKEN_CACHE_DIR") from e
            encoding = _load_gpt2_offline(tiktoken)
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
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py") and Path(dirpath, f).is_file()]
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


_KINDS = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"))


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _not_regular(path, mode: int) -> ValueError:
    return ValueError(f"{path} is a {_kind(mode)}, not a regular file: okadfa reads only regular files")


def _open_regular(path):
    """path opened for binary reading if it is a regular file (symlinks followed), else ValueError naming its
    kind. Never blocks: it is checked before it is opened, and opened non-blocking and checked again."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):              # replaced between the two looks
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _text_files(root: Path) -> list[Path]:
    """The non-hidden regular files under root (or root itself), sorted by relative path. A root that is neither
    a regular file nor a directory is refused (ValueError); other files inside it (FIFOs, sockets, devices,
    dangling symlinks) are skipped with a UserWarning naming each."""
    mode = root.stat().st_mode
    if stat.S_ISREG(mode):
        return [root]
    if not stat.S_ISDIR(mode):
        raise ValueError(f"data source {root} is a {_kind(mode)}, not a regular file or a directory: okadfa reads "
                         f"only regular files (a text file, or a directory of them)")
    found, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            try:
                mode = path.stat().st_mode
            except OSError:
                skipped.append(f"{path} (a dangling symbolic link)" if path.is_symlink() else f"{path} (unreadable)")
                continue
            if stat.S_ISREG(mode):
                found.append(path)
            else:
                skipped.append(f"{path} (a {_kind(mode)})")
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that "
                      f"{'is' if len(skipped) == 1 else 'are'} not regular files (only regular files are read): "
                      + ", ".join(sorted(skipped)), UserWarning, stacklevel=3)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_files(files: list[tuple[Path, int | None]], limit: int | None = None) -> Iterator[bytes]:
    """Stream the files' bytes (each up to its own cap) in blocks, stopping after `limit` bytes in all.
    Only regular files are opened (ValueError for anything else: nothing can block here)."""
    left = limit
    for path, cap in files:
        with _open_regular(path) as f:
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
    os.environ["HF_HUB_OFFLINE"] = "1"
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


def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _publish(tmp: str, final: str) -> None:
    """fsync a finished temporary file, make it read-only and rename it over `final` (atomic)."""
    fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o444)
    os.replace(tmp, final)


def _build(prefix: Path, meta: dict, tok: Tokenizer, dtype, *, concat: Callable | None = None,
           val_fraction: float = 0.05, train: Callable | None = None, val: Callable | None = None) -> dict:
    """Tokenise a source into <prefix>.train.bin / .val.bin / .json: temporary files, fsync'ed, made read-only and
    renamed into place (the JSON last, marking the entry complete), then the directory fsync'ed. A published file
    is never written again: a reader that maps one can never see it change.

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
            with open(tmp["train.bin"], "r+b") as src, open(tmp["val.bin"], "wb") as dst:   # still private
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
                    train_bytes=train_bytes, val_bytes=val_bytes, train_sha256=_sha256_of(tmp["train.bin"]),
                    val_sha256=_sha256_of(tmp["val.bin"]))
        Path(tmp["json"]).write_text(json.dumps(meta, indent=1))
        _publish(tmp["train.bin"], f"{prefix}.train.bin")
        _publish(tmp["val.bin"], f"{prefix}.val.bin")
        _publish(tmp["json"], f"{prefix}.json")     # last: marks the entry as complete
        fsync_directory(prefix.parent)
        return meta
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)


def _valid_meta(meta, expected: dict) -> bool:
    """Whether a cache entry's JSON is one this load would have written (settings, dtype, counts, digests)."""
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expected.items()):
        return False
    if meta.get("dtype") != np.dtype(_dtype_for(expected["vocab_size"])).name:
        return False
    for key in ("train_tokens", "val_tokens", "train_bytes", "val_bytes"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return False
    return all(isinstance(meta.get(f"{s}_sha256"), str) and len(meta[f"{s}_sha256"]) == 64 for s in ("train", "val"))


def _cached(prefix: Path, expected: dict) -> dict | None:
    """The entry's metadata if <prefix>.json is a regular file holding valid metadata for `expected`, else None."""
    content = _read_regular(Path(f"{prefix}.json"), limit=1 << 20)
    if content is None:
        return None
    try:
        meta = json.loads(content)
    except ValueError:
        return None
    return meta if _valid_meta(meta, expected) else None


def _snapshot(f, size: int, sha256: str):
    """A sealed anonymous-memory copy of the open file f (exactly `size` bytes with that SHA-256), or None."""
    if hasattr(os, "memfd_create"):
        flags = os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0)
        copy = os.fdopen(os.memfd_create("okadfa-tokens", flags), "w+b")
    else:
        copy = tempfile.TemporaryFile()
    try:
        h, n = hashlib.sha256(), 0
        while n <= size and (block := f.read(CHUNK)):
            h.update(block)
            copy.write(block)
            n += len(block)
        if n != size or h.hexdigest() != sha256:
            copy.close()
            return None
        copy.flush()
        seals = sum(getattr(fcntl_mod, name, 0) for name in ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE",
                                                                "F_SEAL_SEAL")) if fcntl_mod else 0
        if seals and hasattr(fcntl_mod, "F_ADD_SEALS"):
            with contextlib.suppress(OSError):
                fcntl_mod.fcntl(copy.fileno(), fcntl_mod.F_ADD_SEALS, seals)
        return copy
    except BaseException:
        copy.close()
        raise


def _map(path: str, dtype, count: int, sha256: str) -> np.memmap | None:
    """A read-only memmap of `count` tokens of `path`, or None if the file is missing, not a regular file, not
    exactly count tokens long or (up to SNAPSHOT_MAX_BYTES, read into sealed memory) not of that SHA-256. The
    size is checked on the same open file that is mapped, so mapping never reads past the file's end."""
    size = count * np.dtype(dtype).itemsize
    try:
        f = _open_regular(path)
    except (OSError, ValueError):
        return None
    with f:
        if os.fstat(f.fileno()).st_size != size:
            return None
        source = f
        if size <= SNAPSHOT_MAX_BYTES:
            source = _snapshot(f, size, sha256)
            if source is None:
                return None
        try:
            arr = np.memmap(source, dtype=dtype, mode="r", shape=(count,))
        finally:
            if source is not f:
                source.close()           # the mapping keeps the memory alive
        if source is f:
            arr.filename = os.path.abspath(path)      # (None for a snapshot: it lives in memory)
        return arr


def _refuse_non_files(prefix: Path) -> None:
    """A directory where a cache file belongs is refused (rename cannot replace it; we do not delete it)."""
    for suffix in (".train.bin", ".val.bin", ".json"):
        path = Path(f"{prefix}{suffix}")
        try:
            mode = path.lstat().st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"the token cache entry {path} is a directory, not a regular file: remove it "
                                    f"(or point OKADFA_CACHE_DIR elsewhere)")


def _cache_root(cache_dir=None) -> Path:
    """The token cache directory: cache_dir, else $OKADFA_CACHE_DIR, else ~/.cache/okadfa."""
    return Path(cache_dir if cache_dir is not None
                else os.environ.get("OKADFA_CACHE_DIR") or "~/.cache/okadfa").expanduser()


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
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1 \
            or not math.isfinite(val_fraction):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
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
                raise ValueError(f"{spec}: the directory has no (non-hidden) files that are regular files; put "
                                 f"text files in it")
            key = ["files", _stat_key(files)]
            split["concat"] = lambda: _read_files([(p, None) for p in files], max_bytes)
    key += [tok.name, tok.vocab_size, max_bytes, val_fraction, FORMAT]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    cache = _cache_root(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise type(exc)(f"cannot create the token cache directory {cache} (cache_dir / OKADFA_CACHE_DIR): "
                        f"{exc.strerror or exc}") from exc
    prefix = cache / digest
    expected = {"format": FORMAT, "source": spec, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
                "max_bytes": max_bytes, "val_fraction": val_fraction}
    dtype = _dtype_for(tok.vocab_size)

    def mapped(meta):
        if meta is None:
            return None
        train = _map(f"{prefix}.train.bin", dtype, meta["train_tokens"], meta["train_sha256"])
        val = _map(f"{prefix}.val.bin", dtype, meta["val_tokens"], meta["val_sha256"]) if train is not None else None
        return None if val is None else (train, val, meta)

    arrays = mapped(_cached(prefix, expected))
    if arrays is None:              # missing, incomplete or damaged: (re)build it
        _refuse_non_files(prefix)
        arrays = mapped(_build(prefix, dict(expected), tok, dtype, val_fraction=val_fraction, **split))
        if arrays is None:
            raise OSError(f"the token cache entry {prefix}.{{train,val}}.bin does not match the metadata written with "
                          f"it a moment ago: is something else writing to {cache}? (check the disk, or point "
                          f"OKADFA_CACHE_DIR elsewhere)")
    train, val, meta = arrays
    return Corpus(name=spec, tokenizer=tok, train=train, val=val, val_bytes=meta["val_bytes"])


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
