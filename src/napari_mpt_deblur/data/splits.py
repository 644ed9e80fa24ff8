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
