"""Tokenizer: a tiktoken `Encoding` built from local files (nothing is downloaded), plus ChatML.

A tokenizer is a directory holding
    tokenizer.tiktoken   one line per mergeable token: base64(token bytes) rank
    tokenizer.json       {"pat_str": ..., "special_tokens": {"<|endoftext|>": id, ...}, "eos": "<|endoftext|>",
                          "normalize": "NFC" or null (Unicode normalization applied before splitting, as Qwen2's)}
convert.py writes it from a Hugging Face vocab.json + merges.txt (Qwen2.5); the demo's lives in assets/tokenizer,
built by `data.build_tokenizer` (`python train.py tokenizer`): a byte-level BPE trained on Python's documentation.
"""
import base64
import hashlib
import json
import os
import shutil
import tempfile
import unicodedata
from collections import Counter, defaultdict
from functools import lru_cache

import regex
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


# ----------------------------------------------------------------------------- a vocabulary's identity

@lru_cache(maxsize=1)   # both splits check the run's tokenizer
def tokenizer_hash(tok):
    """Identity of a vocabulary (every token's bytes by id, and the specials): prepared data names its tokenizer."""
    h = hashlib.sha256(json.dumps(tok.special_tokens, sort_keys=True).encode())
    specials = set(tok.special_tokens.values())
    for i in range(tok.n_vocab):
        try:
            t = b"" if i in specials else tok.decode_bytes([i])
        except KeyError:   # an id between the last rank and the first special
            t = b""
        h.update(len(t).to_bytes(4, "little") + t)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- training a byte-level BPE

def train_bpe(texts, n_ranks, pat_str):
    """Byte-level BPE: the 256 bytes, then the most frequent adjacent pair merged until n_ranks tokens.

    Pre-tokenized words are counted once; a merge revisits only the words holding its pair. Ties go to the larger
    pair (bytes order), so the result is deterministic. A tiktoken Encoding with these ranks reproduces the merges.
    """
    words = Counter(w.encode() for t in texts for w in regex.findall(pat_str, t))
    seqs, freqs = [[bytes([b]) for b in w] for w in words], list(words.values())
    ranks = {bytes([b]): b for b in range(256)}
    pairs, where = Counter(), defaultdict(set)
    for i, (s, f) in enumerate(zip(seqs, freqs)):
        for p in zip(s, s[1:]):
            pairs[p] += f
            where[p].add(i)
    while len(ranks) < n_ranks and pairs:
        a, b = best = max(pairs, key=lambda p: (pairs[p], p))
        if a + b not in ranks:
            ranks[a + b] = len(ranks)
        for i in sorted(where.pop(best)):
            s, f = seqs[i], freqs[i]
            for p in zip(s, s[1:]):
                pairs[p] -= f
                if not pairs[p]:
                    del pairs[p]
            new, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and s[j] == a and s[j + 1] == b:
                    new.append(a + b)
                    j += 2
                else:
                    new.append(s[j])
                    j += 1
            seqs[i] = new
            for p in zip(new, new[1:]):
                pairs[p] += f
                where[p].add(i)
    return ranks


# ----------------------------------------------------------------------------- Hugging Face byte-level BPE -> ours

TOKENIZER_FILES = ("tokenizer.tiktoken", "tokenizer.json")   # ours, as Tokenizer reads them
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json")


def bytes_to_unicode():
    """The byte -> printable character map byte-level BPE files (GPT-2, Qwen) write tokens in: printable
    Latin-1 bytes stand for themselves, the other 68 bytes map to chr(256), chr(257), ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def has_tokenizer(path):
    """Are our tokenizer files (TOKENIZER_FILES) all in `path`?"""
    return all(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def copy_tokenizer(src, dst):
    """Our tokenizer files from directory src into directory dst."""
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(src, f), dst)


def has_hf_tokenizer(src):
    if all(os.path.isfile(os.path.join(src, f)) for f in ("vocab.json", "merges.txt")):
        return True
    tj = os.path.join(src, "tokenizer.json")   # ours has that name too; Hugging Face's holds a "model"
    return os.path.isfile(tj) and "model" in _json(tj)


def read_hf_tokenizer(src, optional=False):
    """A Hugging Face byte-level BPE tokenizer directory -> (ranks, specials, pat_str, eos, normalize), the
    arguments of `save` after the path; optional: None when src holds no Hugging Face tokenizer (as
    has_hf_tokenizer decides), instead of an error.

    Reads vocab.json + merges.txt (or the BPE model inside tokenizer.json), added tokens from tokenizer.json,
    tokenizer_config.json and added_tokens.json, and the pre-tokenizer and normalizer from tokenizer.json; without
    tokenizer.json the Qwen2 tokenizer's (QWEN_PAT, NFC) are assumed.
    """
    def opt(name):
        p = os.path.join(src, name)
        return _json(p) if os.path.isfile(p) else None
    tj, tc, at = opt("tokenizer.json"), opt("tokenizer_config.json") or {}, opt("added_tokens.json") or {}
    bpe_files = os.path.isfile(os.path.join(src, "vocab.json")) and os.path.isfile(os.path.join(src, "merges.txt"))
    if optional and not bpe_files and "model" not in (tj or {}):
        return None
    if bpe_files:
        vocab = _json(os.path.join(src, "vocab.json"))
        with open(os.path.join(src, "merges.txt"), encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    elif tj is not None and tj.get("model", {}).get("type") == "BPE":
        vocab = tj["model"]["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tj["model"]["merges"]]
    else:
        raise FileNotFoundError(f"{src} holds no Hugging Face BPE tokenizer: need vocab.json + merges.txt, or a "
                                f"tokenizer.json with a BPE model")
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{src}: merges must be pairs 'a b'; got {bad[:3]}")

    # pre-tokenizer (split pattern) and normalizer; without tokenizer.json, those of Qwen2Tokenizer
    pat_str, normalize = QWEN_PAT, "NFC"
    if tj is None and not tc.get("tokenizer_class", "Qwen2Tokenizer").startswith("Qwen2Tokenizer"):
        raise ValueError(f"{src}: tokenizer_class {tc['tokenizer_class']!r} without a tokenizer.json: its split "
                         f"pattern is unknown (Qwen2Tokenizer's is assumed only for Qwen2)")
    if tj is not None:
        pre, norm = tj.get("pre_tokenizer") or {}, tj.get("normalizer")
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        split = [s for s in steps if s.get("type") == "Split"]
        byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
        if len(split) != 1 or "Regex" not in split[0].get("pattern", {}) or split[0].get("behavior") != "Isolated" \
                or len(byte_level) != 1 or byte_level[0].get("use_regex") or byte_level[0].get("add_prefix_space"):
            raise ValueError(f"{src}/tokenizer.json: pre_tokenizer {pre} is not the Qwen2 form (Split by a regex, "
                             f"isolated, then ByteLevel without its own regex or prefix space)")
        pat_str = split[0]["pattern"]["Regex"]
        if norm is None:
            normalize = None
        elif norm.get("type") == "NFC":
            normalize = "NFC"
        else:
            raise ValueError(f"{src}/tokenizer.json: normalizer {norm} is not supported (NFC or none)")

    # mergeable tokens: vocab ids are the ranks
    b2u = bytes_to_unicode()
    u2b = {c: b for b, c in b2u.items()}
    ranks, problems = {}, []
    for s, i in vocab.items():
        try:
            ranks[bytes(u2b[ch] for ch in s)] = i
        except KeyError:
            problems.append(f"vocab entry {s!r} ({i}) is not in the byte-level alphabet")
    problems += [f"byte {b} ({c!r}) has no token" for b, c in b2u.items() if bytes([b]) not in ranks]
    if len(set(ranks.values())) != len(ranks):
        problems.append("two vocab entries share an id")
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; Hugging Face the pair listed first
    # in merges.txt. They agree when each merge's result outranks its parts and results rise in merges order.
    prev, made = -1, set()
    for n, (a, b) in enumerate(merges):
        try:
            ta, tb = bytes(u2b[ch] for ch in a), bytes(u2b[ch] for ch in b)
        except KeyError:
            problems.append(f"merge {n} ({a} {b}) is not in the byte-level alphabet")
            continue
        r = ranks.get(ta + tb)
        if ta not in ranks or tb not in ranks or r is None:
            problems.append(f"merge {n} ({a} {b}): a part or the result is not in vocab.json")
            continue
        if r <= prev or ranks[ta] >= r or ranks[tb] >= r:
            problems.append(f"merge {n} ({a} {b}) makes id {r}: ids must rise with merges order and exceed their "
                            f"parts' (previous merge made {prev}), else tiktoken would merge in another order")
        prev = r
        made.add(ta + tb)
    unmade = [t for t in ranks if len(t) > 1 and t not in made]
    problems += [f"token {t!r} ({ranks[t]}) is made by no merge" for t in unmade[:10]]
    if len(unmade) > 10:
        problems.append(f"... {len(unmade) - 10} more tokens made by no merge")

    # added tokens (special or not, Hugging Face matches them in text before BPE)
    specials = {}
    entries = [dict(a) for a in (tj or {}).get("added_tokens", [])]
    entries += [dict(v, id=int(k)) for k, v in tc.get("added_tokens_decoder", {}).items()]
    problems += [f"added token {a['content']!r} has {f}: true (tiktoken matches special tokens exactly)"
                 for a in entries for f in ("lstrip", "rstrip", "single_word") if a.get(f)]
    found = [(a["content"], a["id"]) for a in entries] + list(at.items())
    by_id = {i: t for t, i in ranks.items()}
    for content, i in found:
        if by_id.get(i) == content.encode():
            continue   # an ordinary vocab token listed again
        if i in by_id:
            problems.append(f"added token {content!r} has id {i}, which vocab.json gives to {by_id[i]!r}")
        elif specials.get(content, i) != i:
            problems.append(f"added token {content!r} has two ids: {specials[content]} and {i}")
        specials[content] = i
    if len(set(specials.values())) != len(specials):
        problems.append("two added tokens share an id")
    if problems:
        more = f"\n  ... {len(problems) - 30} more" if len(problems) > 30 else ""
        raise ValueError(f"{src}: cannot convert this tokenizer to tiktoken ranks ({len(problems)} problems):\n  "
                         + "\n  ".join(problems[:30]) + more)
    eos = tc.get("eos_token") or "<|endoftext|>"
    eos = eos["content"] if isinstance(eos, dict) else eos
    if eos not in specials:
        raise ValueError(f"{src}: eos token {eos!r} is not among the added tokens {sorted(specials)}")
    return ranks, specials, pat_str, eos, normalize


def write_tokenizer(src, path):
    """Our tokenizer files in `path` from the Hugging Face tokenizer in `src`."""
    save(path, *read_hf_tokenizer(src))


def open_tokenizer(path):
    """The tokenizer in a directory: our files, else Hugging Face ones converted on the fly; None if it holds neither."""
    if os.path.isfile(os.path.join(path, TOKENIZER_FILES[0])):
        return Tokenizer(path)
    if not has_hf_tokenizer(path):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(path, tmp)
        return Tokenizer(tmp)
