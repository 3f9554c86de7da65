"""Training data: documents -> token shards on disk (`prepare`, the command `python train.py prepare`) -> rows of
packed documents (`Packed`), in a shuffle fixed per epoch (`train_rows`).

A prepared directory holds, per split (train, val), shards NNNNN of whole documents:
    {split}-NNNNN.bin    uint32 tokens, the documents back to back, each ending with <|endoftext|>
    {split}-NNNNN.idx    int64 document starts within the shard, then the shard's length: [0, s1, ..., n_tokens]
    {split}-NNNNN.mask   uint8 loss mask, only when the data holds chats: 1 on what an assistant wrote (content and
                         <|im_end|>) and on every token of plain-text documents, 0 elsewhere
    meta.json            {"tokenizer": tokenizer_hash, "chat": bool, "inputs": [...], "splits": {split: {"shards",
                          "tokens", "docs"}}, "hash": of the rest, the data's identity in checkpoints}
Every round(1/val_fraction)-th document goes to val. The directory is written under a temp name and renamed when
complete; the same inputs and tokenizer give the same bytes.

Rows: row r of a split holds tokens [r*T, r*T + T] of one shard (a row never spans shards), so documents are packed
back to back and cut at row edges. Document ids go with every row: positions restart, softmax attention stays
inside a document and the GLA state resets at each document start; no target crosses a document boundary.
"""
import glob
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from convert import atomic_dir
from tokenizer import CHAT_SPECIALS, QWEN_PAT, Tokenizer, tokenizer_hash, train_bpe
from tokenizer import save as save_tokenizer


# ----------------------------------------------------------------------------- reading inputs

def utf8(data, where):
    """Text of a file's bytes; a binary or non-UTF-8 input is an error that names the file (and line)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start} is {data[e.start]:#04x}): convert it to UTF-8 "
                         f"or leave it out of the inputs") from None
    if "\0" in text:
        raise ValueError(f"{where}: holds NUL bytes, a binary file rather than text: leave it out of the inputs")
    return text


def jsonl_documents(path):
    """(document, its line's size in bytes) per line of a .jsonl file: the text, the chat messages, or None for a
    blank line; anything else is an error that names the line."""
    with open(path, "rb") as f:   # bytes: a decoding error can then name its line
        for n, raw in enumerate(f, 1):
            line = utf8(raw, f"{path}:{n}")
            if not line.strip():
                yield None, len(raw)
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e}): .json and .jsonl inputs hold one JSON object per "
                                 f"line") from None
            if isinstance(d, dict) and isinstance(d.get("text"), str):
                yield d["text"], len(raw)
            elif isinstance(d, dict) and isinstance(d.get("messages"), list):
                yield d["messages"], len(raw)
            else:
                raise ValueError(f"{path}:{n}: need {{'text': str}} or {{'messages': [{{'role', 'content'}}, ...]}}")



def stdlib_files():
    """The standard library's Python sources, [(path, size in bytes)] in a fixed order: every .py file under sysconfig's
    stdlib directory except in site-packages (installed packages live there in many installations) and __pycache__,
    that is UTF-8 text; the few test modules written in other encodings on purpose (4 in Python 3.11's test/) are
    left out."""
    import sysconfig

    root, files = sysconfig.get_paths()["stdlib"], []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
        for f in sorted(n for n in names if n.endswith(".py")):
            with open(os.path.join(d, f), "rb") as fh:
                data = fh.read()
            try:
                if "\0" not in data.decode("utf-8-sig"):
                    files.append((os.path.join(d, f), len(data)))
            except UnicodeDecodeError:
                pass
    return files


def list_inputs(inputs):
    """[(file or 'pydoc', size in bytes)] in a fixed order; a clear error for a path that is not there."""
    files = []
    for i in inputs:
        if i == "pydoc":
            import pydoc_data.topics
            files.append(("pydoc", sum(len(t) for t in pydoc_data.topics.topics.values())))
        elif i == "stdlib":
            files += stdlib_files()
        elif os.path.isdir(i):
            found = sorted(f for f in glob.glob(os.path.join(i, "**", "*"), recursive=True) if os.path.isfile(f))
            files += [(f, os.path.getsize(f)) for f in found]
        elif os.path.isfile(i):
            files.append((i, os.path.getsize(i)))
        else:
            raise FileNotFoundError(f"input {i!r} is neither a file, a directory, 'pydoc' nor 'stdlib'")
    return files


def document_batches(files, bar, size=256):
    """Documents (a str, or a list of chat messages) in input order, in lists of `size`."""
    batch = []
    for f, nbytes in files:
        if f == "pydoc":
            import pydoc_data.topics
            docs = ((t, len(t)) for t in pydoc_data.topics.topics.values())
        elif f.endswith((".jsonl", ".json")):
            docs = jsonl_documents(f)
        else:
            with open(f, "rb") as fh:
                docs = [(utf8(fh.read(), f), nbytes)]
        for doc, n in docs:
            bar.update(n)
            if doc:
                batch.append(doc)
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch



# ----------------------------------------------------------------------------- writing shards

class ShardWriter:
    """Documents of one split -> shard files of at most `shard_tokens` tokens."""

    def __init__(self, dir, split, shard_tokens):
        self.dir, self.split, self.limit = dir, split, shard_tokens
        self.shards, self.n_tokens, self.n_docs, self.chat = [], 0, 0, False
        self.buf, self.masks, self.n_buf = [], [], 0

    def add(self, ids, mask):
        if self.buf and self.n_buf + len(ids) > self.limit:
            self.flush(self.chat)
        self.buf.append(np.asarray(ids, dtype=np.uint32))   # 4 bytes a token while buffered, not a Python int
        self.masks.append(None if mask is None else np.asarray(mask, dtype=np.uint8))
        self.chat |= mask is not None
        self.n_buf += len(ids)
        self.n_tokens += len(ids)
        self.n_docs += 1

    def flush(self, chat):
        if not self.buf:
            return
        name = f"{self.split}-{len(self.shards):05d}"
        np.concatenate(self.buf).tofile(self.dir / f"{name}.bin")
        np.cumsum([0] + [len(b) for b in self.buf], dtype=np.int64).tofile(self.dir / f"{name}.idx")
        if chat:   # text documents in chat data: loss everywhere
            np.concatenate([np.ones(len(b), np.uint8) if m is None else m
                            for b, m in zip(self.buf, self.masks)]).tofile(self.dir / f"{name}.mask")
        self.shards.append(name)
        self.buf, self.masks, self.n_buf = [], [], 0

    def close(self, chat):
        self.flush(chat)
        # chat data found after the first shards were written: give the earlier ones all-ones masks
        for name in self.shards if chat else []:
            if not (self.dir / f"{name}.mask").exists():
                n = os.path.getsize(self.dir / f"{name}.bin") // 4
                np.ones(n, np.uint8).tofile(self.dir / f"{name}.mask")
        return {"shards": self.shards, "tokens": self.n_tokens, "docs": self.n_docs}



def prepare(*, inputs: list[str], out: Path, tokenizer_dir: Path = Path("assets/tokenizer"),
            val_fraction: float = 0.01, shard_tokens: int = 1 << 28, threads: int = 8) -> None:
    """Tokenize documents into memory-mapped uint32 shards with a document index and a validation split.

    Args:
        inputs: text files (one document each), .jsonl files (one document per line: {"text": str} or a chat
            {"messages": [{"role": ..., "content": ...}, ...]}), directories (their files, sorted, recursively), or
            `pydoc` (the documentation topics that ship with Python, one document per topic: the offline demo corpus),
            or `stdlib` (the standard library's .py sources, one document per file: `stdlib_files`).
        out: directory to write: {train,val}-NNNNN.bin (uint32 tokens), .idx (int64 document starts + end),
            .mask (uint8, 1 = take a loss: chat data only) and meta.json. Written under a temp name, then renamed.
        tokenizer_dir: the tokenizer of the model to train (a different one makes training refuse the data).
        val_fraction: every round(1/val_fraction)-th document goes to validation (there must be one).
        shard_tokens: tokens per shard file at most (documents never span shards).
        threads: encoding threads (the tokenizer releases the GIL).
    Every document ends with <|endoftext|>; chat documents are ChatML, loss on assistant tokens only. The same inputs
    and tokenizer give the same bytes.
    """
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction}: training needs a validation split, use a value in (0, 0.5]")
    tok = Tokenizer(tokenizer_dir)
    files = list_inputs(inputs)
    every = round(1 / val_fraction)
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        writers = {s: ShardWriter(tmp, s, shard_tokens) for s in ("train", "val")}
        n_doc = 0
        chat = False
        # tiktoken releases the GIL while it encodes; the bar closes before an input error is printed
        with ThreadPoolExecutor(threads) as pool, tqdm(total=sum(size for _, size in files), unit="B",
                                                       unit_scale=True, desc="tokenizing") as bar:
            for batch in document_batches(files, bar):
                encoded = pool.map(tok.encode, [d for d in batch if isinstance(d, str)])
                for d in batch:
                    if isinstance(d, str):
                        ids, mask = next(encoded), None
                    else:
                        ids, mask = tok.encode_chat(d)
                        chat = True
                    split = "val" if n_doc % every == every - 1 else "train"
                    writers[split].add(ids + [tok.eos_id], None if mask is None else mask + [False])
                    n_doc += 1
        if n_doc == 0:
            raise ValueError(f"no documents in {inputs}: text files must be non-empty, jsonl lines need a 'text' or "
                             f"'messages' field")
        if not writers["val"].n_docs:
            raise ValueError(f"{n_doc} documents are too few for val_fraction={val_fraction} (every {every}th "
                             f"document validates): add documents or raise val_fraction")
        splits = {s: w.close(chat) for s, w in writers.items()}
        meta = {"tokenizer": tokenizer_hash(tok), "chat": chat, "inputs": [str(i) for i in inputs], "splits": splits}
        meta["hash"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"{out}: " + ", ".join(f"{s} {v['docs']} documents {v['tokens']} tokens" for s, v in splits.items()))



# ----------------------------------------------------------------------------- packed rows

class Packed:
    """One split of a prepared directory as fixed-length rows: row r holds tokens [r*T, r*T + T] of a shard.

    batch(rows) -> x [B, T] inputs, y [B, T] targets (-100: across a document boundary or not an assistant token
    in chat data), doc [B, T] document index within the row (non-decreasing), or None without doc_mask.
    """

    def __init__(self, path, split, seq_len, tokenizer=None, doc_mask=True):
        meta_file = Path(path) / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} is not a prepared data directory (no meta.json): make it with "
                                    f"`python train.py prepare --inputs FILES --out {path}` or set data.inputs")
        meta = json.loads(meta_file.read_text())
        if tokenizer is not None and meta["tokenizer"] != tokenizer_hash(tokenizer):
            raise ValueError(f"{path} was tokenized with another tokenizer ({meta['tokenizer']}): prepare it again "
                             f"with this run's tokenizer")
        shards = meta["splits"][split]["shards"]
        self.T, self.doc_mask = seq_len, doc_mask
        self.tokens = [np.memmap(Path(path) / f"{s}.bin", dtype=np.uint32, mode="r") for s in shards]
        self.docs = [np.fromfile(Path(path) / f"{s}.idx", dtype=np.int64) for s in shards]
        self.masks = [np.memmap(Path(path) / f"{s}.mask", dtype=np.uint8, mode="r") if meta["chat"] else None
                      for s in shards]
        self.starts = np.cumsum([0] + [max(0, (len(t) - 1) // seq_len) for t in self.tokens])
        n_tok = meta["splits"][split]["tokens"]
        if self.starts[-1] == 0:
            raise ValueError(f"the {split} split of {path} has {n_tok} tokens, not one row of seq_len+1 = "
                             f"{seq_len + 1}: add data or lower train.seq_len")
        self.fingerprint = f"{meta['hash']}/{split}/{seq_len}"

    def __len__(self):
        return int(self.starts[-1])

    def row(self, r):
        s = int(np.searchsorted(self.starts, r, side="right")) - 1
        a = (r - int(self.starts[s])) * self.T
        tok = self.tokens[s][a:a + self.T + 1].astype(np.int64)
        doc = np.searchsorted(self.docs[s], np.arange(a, a + self.T + 1), side="right") - 1
        x, y = tok[:-1], tok[1:].copy()
        y[doc[1:] != doc[:-1]] = -100   # the next document's first token is not predictable from this one
        if self.masks[s] is not None:
            y[self.masks[s][a + 1:a + self.T + 1] == 0] = -100
        return x, y, doc[:-1] - doc[0]

    def batch(self, rows, device):
        x, y, doc = (torch.from_numpy(np.stack(a)) for a in zip(*(self.row(r) for r in rows)))
        if device.type == "cuda":
            x, y, doc = (t.pin_memory().to(device, non_blocking=True) for t in (x, y, doc))
        else:
            x, y, doc = x.to(device), y.to(device), doc.to(device)
        return x, y, doc if self.doc_mask else None


@lru_cache(maxsize=2)
def epoch_order(n_rows, epoch, seed):
    """The rows of one epoch in the order they are trained: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def train_rows(n_rows, iter_num, rank, world, micro_batch_size, seed=0):
    """Rows of micro-batch `iter_num` on `rank`: a fixed shuffle per epoch, so the position is just iter_num."""
    first = (iter_num * world + rank) * micro_batch_size
    return [int(epoch_order(n_rows, s // n_rows, seed)[s % n_rows]) for s in range(first, first + micro_batch_size)]


# ----------------------------------------------------------------------------- the demo tokenizer, from the demo corpus

def build_tokenizer(*, out: Path = Path("assets/tokenizer"), vocab_size: int = 2048,
                    inputs: list[str] = ["pydoc"]) -> None:
    """Train a byte-level BPE (Qwen's pre-tokenizer, vocab_size - 3 ranks + the ChatML specials) and write it to out.

    Args:
        out: directory to write tokenizer.tiktoken and tokenizer.json to.
        vocab_size: tokens in all, the 3 ChatML specials included.
        inputs: training text, as for `train.py prepare` (default: the documentation that ships with Python).
    """
    files = list_inputs(inputs)
    with tqdm(total=sum(s for _, s in files), unit="B", unit_scale=True, desc="reading") as bar:
        texts = [d for b in document_batches(files, bar) for d in b if isinstance(d, str)]
    n_ranks = vocab_size - len(CHAT_SPECIALS)
    ranks = train_bpe(texts, n_ranks, QWEN_PAT)
    save_tokenizer(str(out), ranks, {s: n_ranks + i for i, s in enumerate(CHAT_SPECIALS)})
    print(f"{out}: {len(ranks)} ranks + {len(CHAT_SPECIALS)} special tokens")
