"""The project's one fixed split of the shared U2OS nuclei images (``../shared/data/u2os_nuclei``).

Drawn once with ``numpy.random.default_rng(2026).permutation`` over the 60 sorted names and
frozen here, so every script agrees on which images a number was measured on:

* ``U2OS_TEST`` (20): never trained on, by the shipped StarDist model or the shipped deblur
  models; all benchmark tables are measured on these. The bundled U2OS sample is one of them.
* ``U2OS_STARDIST_VAL`` (8) and ``U2OS_TRAIN`` (32): StarDist trains on TRAIN and validates on
  VAL (20% of its 40 images); the deblur models may use both as sharp training images.
"""

from __future__ import annotations

U2OS_TEST = (
    "150b0ffa318c", "1b518cd2ea84", "1f6b7cead153", "2c83c86dd4e5", "2cfa61bef654",
    "3ebd2ab34ba8", "45c3bdef1819", "49edc2f77151", "4d2cff9a0c8d", "61dc249314d7",
    "76faaed50ed6", "8055957570d7", "8cdbdda8b3a6", "98a463483fe3", "aaa52100fafa",
    "b1f23c4d27af", "b24ea5c26846", "bde3727f3a9e", "dd54adb80393", "e52960d31f8b",
)
U2OS_STARDIST_VAL = (
    "0b0d577159f0", "3477024fd843", "4dbbb275960a", "6fe2df6de1d9",
    "8efed2e62c91", "bb8ebf465c96", "e5a6c5e01e6a", "fc22db33a249",
)
U2OS_TRAIN = (
    "07fb37aafa66", "10ba6cbee487", "193ffaa5272d", "212b858a66f0", "2dec81a678dd",
    "3f9fc8e63f87", "449a9c32e53a", "449f41710769", "4ee5850b6354", "53ad09e43487",
    "5afb7932e9c7", "5bb8508ff8ec", "602f267432e7", "6b61ab2e3ff0", "6b6d4e6ff52d",
    "6f8197baf738", "79dfcbc9361e", "866a8cba7bfe", "8c3ef7aa7ed2", "958114e5f37d",
    "a02ec007ae8f", "a65bbfc5673e", "a7a581e6760d", "a90cad45551d", "b76ff33ae9da",
    "c15c652c0815", "cc8862734430", "d52958107d0b", "da5f98f2b8a6", "ecb36c90cdd2",
    "f01a9742c43a", "fe80a2cf3c93",
)

#: The bundled defocused demo image; keep it out of any training set so the demo is honest.
DEMO_BBBC006_DEFOCUSED = "h01_s2_w1"

#: Held-out 10% of ``../shared/data/dsb2018_extra/fluorescence`` (other cell types and
#: microscopes): drawn once with ``numpy.random.default_rng(2026).permutation`` over the 451
#: sorted names and frozen. Never trained on; the second benchmark table is measured on these.
DSB_FLUO_TEST = (
    "0402a81e7526", "0bf4b1441676", "0e5edb072788", "12f89395ad5d", "139946af9e2c", "1a75de9e1130",
    "1c681dfa5cf7", "1e8408fbb161", "20468e8779c4", "243443ae303c", "2817299fd3b8", "2dd9d8c797fc",
    "33d0a9b24c25", "3852c7e45bd8", "3874755f6222", "483b89aa6835", "4bf6a5ec4203", "538b7673d507",
    "55ff2b0ec48b", "5ba4facefc94", "62570c4ff1c5", "63d981a10709", "75120baa6abc", "785555c0cbb4",
    "7c318172e976", "84eeec681987", "94a5a37c3b11", "9cbc07003173", "a22b7882fa85", "af8621ef0db8",
    "b2c23ddb0453", "b67a6e5da8b1", "ba3997edd3fc", "c35e6e3ea39a", "cb4df20a83b2", "cdab367b30db",
    "d6a880b1f605", "d8607b21411c", "dabfee30b46d", "ddf1bf458312", "e2d22d3d2839", "e856511ac1c3",
    "edd36ed822e7", "f43169e3d8b4", "ff3e512b5fb8",
)
#: Held-out 10% of ``dsb2018_extra/histology_rgb`` (107 names, the same procedure).
DSB_RGB_TEST = (
    "15039b3acccc", "1d02c4b5921e", "24a20f2a529c", "2dd3356f2dcf", "4590d7d47f52", "7773ac91af61",
    "7798ca1ddb31", "815524d88283", "a5fe0b7412dd", "a7f6194ddbea", "ed5be4b63e95",
)

#: Named splits a training config may use as ``names:``; a ``*_train`` split is every image of the
#: folder except the matching test split.
HELD_OUT = {"dsb_fluo": DSB_FLUO_TEST, "dsb_rgb": DSB_RGB_TEST}


def split_names(split: str, available: list[str] | tuple[str, ...]) -> list[str]:
    """The names of a named split among the ``available`` file stems of its folder.

    ``u2os_train``, ``u2os_train_and_val``, ``u2os_test``, ``dsb_fluo_train``, ``dsb_fluo_test``,
    ``dsb_rgb_train``, ``dsb_rgb_test``. Raises ValueError for another name."""
    fixed = {"u2os_train": U2OS_TRAIN, "u2os_train_and_val": U2OS_TRAIN + U2OS_STARDIST_VAL, "u2os_test": U2OS_TEST}
    if split in fixed:
        return list(fixed[split])
    base, _, part = split.rpartition("_")
    if base in HELD_OUT and part in ("train", "test"):
        test = set(HELD_OUT[base])
        return sorted(n for n in available if (n in test) == (part == "test"))
    raise ValueError(f"unknown split {split!r}; known: {sorted(fixed) + [f'{b}_{p}' for b in HELD_OUT for p in ('train', 'test')]}")
