"""Corpora by name: `wikitext2:test`, `wikitext2:valid`, `ptb:test`, `c4:validation`, ... or a path.

A name resolves, in this order, to
1. a file under a data directory: each of $SASQ_DATA (one or more folders, separated by
   os.pathsep), $SASQ_CACHE/data (default ~/.cache/sasq/data), and, in a source checkout,
   ../shared/assets beside it;
   the file names each corpus expects are in LAYOUT (and docs/corpora.md);
2. the Hugging Face `datasets` cache, when that optional package is installed (the same
   load_dataset calls and joins as the QuaRot/GPTQ evaluation scripts; it downloads once when
   the split is not cached and the machine is online);
3. otherwise a FileNotFoundError that says where it looked and what to install or set.
Anything that is not a known `name:split` is read as a UTF-8 text file (sasq.data.read_text).

The text is exactly the string that gets tokenized as one stream (DESIGN section 3): WikiText-2
rows joined with "\\n\\n", PTB sentences joined with " ", the first C4_VALID_DOCS documents of the
first C4 validation shard joined with " " (QuaRot's c4 evaluation text). Every Corpus carries
the sha256 of that text, so results record what they were measured on.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from sasq.data import read_text

C4_VALID_DOCS = 1100  # QuaRot / GPTQ "c4_new": ' '.join(first 1100 validation documents)
C4_TRAIN_DOCS = 5000  # a training stream of a few million tokens, not a whole 300 MB shard
_C4_SHARD = {"train": "c4-train.00000-of-01024.json", "validation": "c4-validation.00000-of-00008.json"}

# split aliases -> canonical split
_SPLITS = {
    "wikitext2": {"train": "train", "valid": "valid", "validation": "valid", "test": "test"},
    "wikitext2-v1": {"train": "train", "valid": "valid", "validation": "valid", "test": "test"},
    "ptb": {"train": "train", "valid": "valid", "validation": "valid", "test": "test"},
    "c4": {"train": "train", "valid": "validation", "validation": "validation"},
}

# corpus -> relative file names tried under every data directory ({split} = canonical split)
LAYOUT = {
    "wikitext2": ["wikitext-2/raw-v1/{split}.joined.txt"],
    "wikitext2-v1": ["wikitext-2/tokens-v1/{split}.txt"],
    "ptb": ["ptb/{split}.joined.txt"],
    "c4": ["c4/{shard}.gz", "c4/{shard}", "c4/en/{shard}.gz", "c4/en/{shard}"],
}

# corpus -> (load_dataset path, config, field, joiner); split names as on the Hub
_HF = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", "\n\n"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence", " "),
    "c4": ("allenai/c4", None, "text", None),
}
_HF_SPLIT = {"valid": "validation"}

# sha256 of texts we know by content (a plain path to one of them is named in tables)
KNOWN_TEXTS = {
    "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83": "wikitext2:test",
    "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8": "wikitext2-v1:valid",
    "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0": "wikitext2-v1:test",
}


@dataclass(frozen=True)
class Corpus:
    spec: str     # what was asked for: "wikitext2:test" or a path
    name: str | None  # the corpus name ("wikitext2:test"), None for an unknown file
    text: str
    source: str   # the file read, or the datasets call
    sha256: str   # of the UTF-8 text

    @property
    def label(self) -> str:
        """What tables call it: the name, or the file name (with the name when known)."""
        if self.spec == self.name:
            return self.name
        base = Path(self.spec).name
        return f"{base} ({self.name})" if self.name else base

    @property
    def key(self) -> str:
        """The short key of an evaluation set in results (a name, or the file name)."""
        return self.name if self.spec == self.name else Path(self.spec).name


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_name(spec: str):
    """(corpus, canonical split) when spec is a known `name:split`, else None."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        return None
    corpus, split = (p.strip().lower() for p in spec.split(":"))
    if corpus not in _SPLITS:
        return None
    if split not in _SPLITS[corpus]:
        raise ValueError(f"corpus {corpus!r} has no split {split!r}; choose from "
                         f"{', '.join(sorted(set(_SPLITS[corpus])))}")
    return corpus, _SPLITS[corpus][split]


def is_named(spec) -> bool:
    return isinstance(spec, str) and not Path(spec).exists() and parse_name(spec) is not None


def data_dirs() -> list[Path]:
    """Folders searched for corpus files, in order."""
    dirs = [Path(p).expanduser() for p in os.environ.get("SASQ_DATA", "").split(os.pathsep) if p]
    cache = os.environ.get("SASQ_CACHE") or "~/.cache/sasq"  # benchmarks/assets.py's cache
    dirs.append(Path(cache).expanduser() / "data")
    sibling = Path(__file__).resolve().parents[2] / "shared" / "assets"  # a source checkout only
    if sibling.is_dir():
        dirs.append(sibling)
    return dirs


def _candidates(corpus, split):
    shard = _C4_SHARD.get(split, "")
    return [p.format(split=split, shard=shard) for p in LAYOUT[corpus]]


def _read_c4(path: Path, split: str) -> str:
    n = C4_VALID_DOCS if split == "validation" else C4_TRAIN_DOCS
    opener = gzip.open if path.suffix == ".gz" else open
    docs = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    docs.append(json.loads(line)["text"])
                if len(docs) >= n:
                    break
    except (OSError, json.JSONDecodeError, KeyError, EOFError) as e:
        raise ValueError(f"{path}: not a C4 JSON-lines shard ({type(e).__name__}: {e})") from None
    return (" " if split == "validation" else "\n\n").join(docs)


def _from_hf(corpus, split):
    """(text, source) from the datasets cache, or (None, why not)."""
    if corpus not in _HF:
        return None, f"{corpus} is not on the Hugging Face Hub in this form"
    try:
        import datasets
    except ImportError:
        return None, ("the Hugging Face cache was not tried: the optional 'datasets' package is "
                      "not installed (pip install datasets)")
    path, config, field, joiner = _HF[corpus]
    hf_split = _HF_SPLIT.get(split, split)
    try:
        if corpus == "c4":
            files = {hf_split: f"en/{_C4_SHARD[split]}.gz"}
            ds = datasets.load_dataset(path, data_files=files, split=hf_split)
            n = C4_VALID_DOCS if split == "validation" else C4_TRAIN_DOCS
            text = (" " if split == "validation" else "\n\n").join(ds[:n][field])
            return text, f"datasets.load_dataset({path!r}, data_files={files}) first {n} documents"
        ds = datasets.load_dataset(path, config, split=hf_split)
    except Exception as e:  # offline, not cached, a Hub error: say so in one line
        return None, f"datasets.load_dataset({path!r}, {config!r}, split={hf_split!r}) failed: " \
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return joiner.join(ds[field]), f"datasets.load_dataset({path!r}, {config!r}, split={hf_split!r})"


def _local(corpus, split, dirs):
    for d in dirs:
        for rel in _candidates(corpus, split):
            p = d / rel
            if p.is_file():
                return p
    return None


def resolve(spec: str) -> Corpus:
    """A Corpus for `spec` (a `name:split` or a text file path); see the module doc."""
    if not isinstance(spec, (str, os.PathLike)) or str(spec).strip() == "":
        raise ValueError(f"a corpus name or text file path is needed, got {spec!r}")
    spec = str(spec)
    parsed = None if Path(spec).exists() else parse_name(spec)
    if parsed is None:
        text = read_text(spec)
        sha = text_sha256(text)
        return Corpus(spec, KNOWN_TEXTS.get(sha), text, str(Path(spec)), sha)
    corpus, split = parsed
    name = f"{corpus}:{split}"
    dirs = data_dirs()
    p = _local(corpus, split, dirs)
    if p is not None:
        text = _read_c4(p, split) if corpus == "c4" else read_text(p)
        return Corpus(name, name, text, str(p), text_sha256(text))
    text, why = _from_hf(corpus, split)
    if text is not None:
        return Corpus(name, name, text, why, text_sha256(text))
    if corpus == "wikitext2":
        # The tokenized v1 release (rare words as <unk>) is what some machines hold for the
        # training splits; it is another text, so it gets its own name in every table.
        p = _local("wikitext2-v1", split, dirs)
        if p is not None:
            text = read_text(p)
            v1 = f"wikitext2-v1:{split}"
            return Corpus(v1, v1, text, str(p), text_sha256(text))
    looked = ", ".join(_candidates(corpus, split))
    where = ", ".join(str(d) for d in dirs) if dirs else "(none)"
    env = "" if os.environ.get("SASQ_DATA") else " ($SASQ_DATA is unset)"
    raise FileNotFoundError(
        f"corpus {name!r} not found: looked for {looked} under {where}{env}; {why}. "
        f"Put the file there or set SASQ_DATA to its folder (docs/corpora.md), or pass a text file path")


def load_text(spec: str) -> str:
    """The text of a corpus name or file (resolve(spec).text)."""
    return resolve(spec).text
