"""A CLIPTokenizer for the tiny world: every world word is one token, any other text still tokenizes.

The files follow the CLIP byte-level BPE format (``vocab.json`` + ``merges.txt``):

- the 256 byte symbols of the byte-to-unicode table, each also with the end-of-word suffix ``</w>``,
  so any text falls back to single characters;
- merges that assemble every world word into one ``word</w>`` token;
- the specials ``<|startoftext|>`` and ``<|endoftext|>`` (end of text doubles as padding, as in CLIP).

Merges are found by simulating BPE: for each word in turn, while the merges so far leave it in more
than one piece, a merge of the first two pieces is appended. Appending never changes how an earlier
word is split (BPE applies the lowest-ranked available pair; an earlier word already ends as one token
using only earlier merges), so every word ends up a single token.
"""

from __future__ import annotations

import json
from pathlib import Path

from rewards.tinyworld.world import words

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 16  # the longest caption is 13 tokens with the two specials


def byte_symbols() -> list[str]:
    """The byte-to-unicode table of byte-level BPE: byte ``b`` -> one printable character.

    Printable Latin-1 bytes stand for themselves; the rest are moved to code points 256 and up in order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    out, extra = {}, 0
    for b in range(256):
        if b in kept:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _symbols(word: str) -> list[str]:
    table = byte_symbols()
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] = chars[-1] + "</w>"
    return chars


def _apply(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the lowest-ranked adjacent pair."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        rank, _ = min(pairs)
        a, b = next((x, y) for (x, y) in zip(pieces, pieces[1:]) if ranks.get((x, y)) == rank)
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and pieces[i] == a and pieces[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def build_merges(vocab_words: list[str]) -> list[tuple[str, str]]:
    """Merges under which each word of ``vocab_words`` is a single token (see the module docstring)."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in vocab_words:
        if not word or word != word.lower() or any(ch.isspace() for ch in word):
            raise ValueError(f"word {word!r}; expected a non-empty lower-case word without spaces")
        pieces = _apply(_symbols(word), ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = _apply(pieces, ranks)
    return merges


def write_tokenizer_files(directory: str | Path, vocab_words: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for ``vocab_words`` (default: the world's words)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_words = words() if vocab_words is None else list(vocab_words)
    merges = build_merges(vocab_words)
    tokens = byte_symbols()
    tokens = tokens + [t + "</w>" for t in tokens] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def build_tokenizer(directory: str | Path, model_max_length: int = MODEL_MAX_LENGTH):
    """Write the tokenizer files into ``directory`` and return a ``CLIPTokenizer`` reading them."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(
        str(directory),
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
