"""Tokenizer: a tiktoken `Encoding` built from local files (nothing is downloaded), plus ChatML.

A tokenizer is a directory holding
    tokenizer.tiktoken   one line per mergeable token: base64(token bytes) rank
    tokenizer.json       {"pat_str": ..., "special_tokens": {"<|endoftext|>": id, ...}, "eos": "<|endoftext|>",
                          "normalize": "NFC" or null (Unicode normalization applied before splitting, as Qwen2's)}
convert.py writes it from a Hugging Face vocab.json + merges.txt (Qwen2.5); the demo's lives in assets/tokenizer.
"""
import base64
import json
import os
import unicodedata

import tiktoken

# Qwen2.5's pre-tokenizer split pattern
QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


class Tokenizer:
    def __init__(self, path):
        ranks_file, meta_file = os.path.join(path, "tokenizer.tiktoken"), os.path.join(path, "tokenizer.json")
        for f in (ranks_file, meta_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"tokenizer file {f} is missing: a tokenizer directory holds tokenizer.tiktoken "
                                        f"and tokenizer.json (make one with `python convert.py tokenizer`)")
        with open(meta_file) as f:
            meta = json.load(f)
        self.special_tokens = meta["special_tokens"]
        self.enc = tiktoken.Encoding(os.path.basename(os.path.abspath(path)), pat_str=meta["pat_str"],
                                     mergeable_ranks=read_ranks(ranks_file), special_tokens=self.special_tokens)
        self.eos_id = self.special_tokens[meta.get("eos", "<|endoftext|>")]
        self.normalize = meta.get("normalize")
        self.n_vocab = self.enc.n_vocab

    def encode(self, text, specials=False):
        """Text -> ids. With specials=True, special-token strings in the text become their ids."""
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        return self.enc.encode(text, allowed_special="all" if specials else set(), disallowed_special=())

    def decode(self, ids):
        return self.enc.decode(ids)

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(ids)

    def encode_chat(self, messages, add_generation_prompt=False):
        """ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per message.

        Returns (ids, mask) where mask[i] is True for tokens an assistant wrote (content and its <|im_end|>),
        the only tokens SFT takes a loss on.
        """
        start, end = self.special_tokens["<|im_start|>"], self.special_tokens["<|im_end|>"]
        nl = self.encode("\n")
        ids, mask = [], []
        for m in messages:
            if set(m) - {"role", "content"} or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"chat message {m!r}: need {{'role': system|user|assistant, 'content': str}}")
            head = [start] + self.encode(m["role"]) + nl
            body = self.encode(m["content"]) + [end]
            ids += head + body + nl
            mask += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False] * len(nl)
        if add_generation_prompt:
            head = [start] + self.encode("assistant") + nl
            ids, mask = ids + head, mask + [False] * len(head)
        return ids, mask


def read_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}") from None
    return ranks


def save(path, ranks, special_tokens, pat_str=QWEN_PAT, eos="<|endoftext|>", normalize=None):
    """Write a tokenizer directory (files written to temp names, then renamed)."""
    os.makedirs(path, exist_ok=True)
    lines = b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))
    meta = json.dumps({"pat_str": pat_str, "special_tokens": special_tokens, "eos": eos, "normalize": normalize},
                      indent=1, ensure_ascii=False)
    for name, data in (("tokenizer.tiktoken", lines), ("tokenizer.json", meta.encode())):
        tmp = os.path.join(path, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(path, name))
