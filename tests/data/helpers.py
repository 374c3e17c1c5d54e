"""Small text fixtures for the data tests."""

import random
from pathlib import Path

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their king queen lord sword crown night"
).split()


def doc_text(i: int, n_words: int = 120) -> str:
    rng = random.Random(i)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(n_words // 12)]
    return "\n".join(lines) + f"\nThis is document {i}.\n"


def write_corpus(directory: Path, n_docs: int = 20, text=doc_text) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (directory / f"doc{i:02d}.txt").write_text(text(i), encoding="utf-8")
    return directory
