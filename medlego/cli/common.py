"""Flags shared by subcommands, so every command names a base the same way."""

from __future__ import annotations

import argparse


def add_base_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--model", required=required, metavar="NAME",
                   help="timm ViT/DeiT name, e.g. vit_base_patch16_224")
    g.add_argument("--weights", metavar="FILE",
                   help="local weights file (.safetensors, timm .pth/.bin, or JAX .npz)")
    g.add_argument("--pretrained", action="store_true",
                   help="let timm download pretrained weights instead (needs a reachable model hub)")


def load_base_from_args(args):
    from medlego.runtime.base import load_base

    return load_base(args.model, args.weights, pretrained=args.pretrained)
