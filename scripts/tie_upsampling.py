"""Write a copy of a model whose upsamplers are resize-convolutions with its phase-averaged weights.

    python scripts/tie_upsampling.py h2t-unet-fluo runs/tied/h2t-unet-fluo [--validate CONFIG.yaml]

The new model computes what the old one computes after averaging each upsampler's four output
phases (napari_mpt_deblur.models.phase_tying), so it cannot add a checkerboard; its record keeps
the old record's training history under ``training.tied_from``. ``--validate`` scores both on the
validation set of a training config (the numbers a shipped model is judged by) and prints them.
"""

from __future__ import annotations

import argparse
import json

import torch

from napari_mpt_deblur.models.phase_tying import phase_imbalance, tie_upsampling_phases
from napari_mpt_deblur.models.registry import load_model, save_model


def validation_pairs(config_path: str):
    """The fixed validation pairs of a training config (synthetic blur and noise seeded by it)."""
    from napari_mpt_deblur.data.builders import build_validation_pairs
    from napari_mpt_deblur.training.config import load_config

    config = load_config(config_path)
    return build_validation_pairs(config.validation.data, config.validation.crop, config.seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model name or path (phase-split upsampling)")
    p.add_argument("out", help="output path stem (.safetensors + .json)")
    p.add_argument("--name", default=None, help="name in the new record (default: the old name)")
    p.add_argument("--validate", default=None, metavar="CONFIG", help="training config whose validation set scores both")
    args = p.parse_args()

    old = load_model(args.model)
    tied = tie_upsampling_phases(old.model)
    history = {"name": old.record.name, "path": str(old.path), "weights_sha256": old.record.weights_sha256,
               "phase_imbalance": phase_imbalance(old.model), "training": old.record.training}
    scores = {}
    if args.validate:
        from napari_mpt_deblur.training.network import evaluate_pairs

        pairs = validation_pairs(args.validate)  # made once: both models see the same pairs
        scores = {label: evaluate_pairs(net, pairs, torch.device("cpu"), None, old.record.normalisation)
                  for label, net in (("before", old.model), ("after", tied))}
        history["validation"] = scores
    out = save_model(tied, args.out, name=args.name or old.record.name,
                     description=f"{old.record.description} Upsamplers tied to resize-convolutions (phase-averaged weights).".strip(),
                     normalisation=old.record.normalisation,
                     training={"weights_from": {"init": "tied", "tied_from": history}})
    print(json.dumps({"written": str(out), "phase_imbalance": history["phase_imbalance"], **scores}, indent=1))


if __name__ == "__main__":
    main()
