"""Checkerboard check (issue 13): Nyquist energy ratio of models on the demo image, as shipped and
after a default fine-tune, against the input's.

For each model: the ratio (:func:`napari_mpt_deblur.evaluation.spectral.nyquist_energy_ratio`)
of the real defocused BBBC006 demo image, of the model's output on it (one whole-image tile,
``--orientations`` of it averaged: 1 by default, the network's own pattern; ``model`` for the
model's default, what a user gets, e.g. 4 for mpt-small-fluo), and
of the output after ``--steps`` steps of the napari fine-tune with its defaults (EFCRex on the
demo image itself, batch 4, patch 128, lr 5e-5, beta 0.1, Nyquist-coefficient loss weight 10),
with the seconds the fine-tune took.
"Within 2x" is the issue's acceptance: every ratio at most twice the input's.

    python benchmarks/bench_checkerboard.py --models h2t-unet-fluo mpt-small-fluo --steps 200 --markdown
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["h2t-unet-fluo", "mpt-small-fluo"])
    p.add_argument("--steps", type=int, default=200, help="default fine-tune steps (0: skip the fine-tune)")
    p.add_argument("--orientations", choices=["1", "4", "8", "model"], default="1",
                   help="orientations averaged per tile: 1 (default: the network's own pattern) or the model's default")
    p.add_argument("--shifts", choices=["1", "2", "model"], default="1",
                   help="one-pixel shifts averaged per orientation: 1 (default: the network's own pattern) or the model's default")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()

    import torch

    from napari_mpt_deblur.data.samples import defocused_bbbc006
    from napari_mpt_deblur.evaluation.spectral import nyquist_energy_ratio
    from napari_mpt_deblur.inference.engine import Deblurrer, InferenceSettings
    from napari_mpt_deblur.models.registry import LoadedModel, load_model
    from napari_mpt_deblur.training.finetune import FineTuner

    if args.threads:
        torch.set_num_threads(args.threads)
    image = defocused_bbbc006()
    base = nyquist_energy_ratio(image)
    whole = InferenceSettings(device="cpu", tile=1024,
                              orientations=None if args.orientations == "model" else int(args.orientations),
                              shifts=None if args.shifts == "model" else int(args.shifts))
    rows = []
    for name in args.models:
        loaded = load_model(name)
        shipped = nyquist_energy_ratio(Deblurrer(loaded, whole).deblur_plane(image))
        row = {"model": name, "upsample": loaded.record.architecture.upsample, "input": base, "shipped": shipped}
        if args.steps:
            torch.manual_seed(0)
            start = time.perf_counter()
            tuned = FineTuner(loaded, [image], steps=args.steps, device="cpu").run()
            row["finetune_seconds"] = time.perf_counter() - start
            engine = Deblurrer(LoadedModel(tuned.model.eval(), loaded.record, None), whole)
            row["finetuned"] = nyquist_energy_ratio(engine.deblur_plane(image))
        row["within_2x"] = all(row[k] <= 2 * base for k in ("shipped", "finetuned") if k in row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        print(f"\n| model | upsample | input | as shipped | after {args.steps} fine-tune steps | fine-tune s | within 2x |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            tuned = f"{r['finetuned']:.2f}" if "finetuned" in r else "-"
            secs = f"{r['finetune_seconds']:.0f}" if "finetune_seconds" in r else "-"
            print(f"| {r['model']} | {r['upsample']} | {r['input']:.2f} | {r['shipped']:.2f} | {tuned} | {secs} | "
                  f"{'yes' if r['within_2x'] else 'NO'} |")


if __name__ == "__main__":
    main()
