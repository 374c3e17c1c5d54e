"""The ``attnres`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .models import AttnResConfig, AttnResForCausalLM

    torch.manual_seed(args.seed)
    ids = torch.randint(0, 8192, (1, 32))
    for residual in ("standard", "full", "block"):
        config = AttnResConfig(residual=residual)
        model = AttnResForCausalLM(config).eval()
        with torch.no_grad():
            scheme = model.model.residual
            # nudge the zero-init queries so the weights show input dependence
            if residual != "standard":
                scheme.pseudo_query.normal_(0, args.query_std)
            with torch.no_grad(), scheme.record() as reads:
                model(ids)
        n = sum(p.numel() for p in model.parameters())
        extra = sum(p.numel() for name, p in model.named_parameters() if "residual" in name)
        size = f"block size {config.attn_res_block_size} sublayers" if config.attn_res_block_size else ""
        print(f"\n{residual:8s} params {n:,} (AttnRes {extra:,}) {size}")
        for r in reads:
            if r.weights is not None:
                w = r.weights.mean(dim=(1, 2)).tolist()
                print(f"  read {r.read:2d}: " + " ".join(f"{x:.2f}" for x in w))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnres", description="Attention Residuals: models, training, benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build the three reference models and print their depth-attention weights")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--query-std", type=float, default=0.5,
                      help="std of the random pseudo-queries shown (0 gives the zero-init uniform mean)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
