"""Network architectures (MPT, head-to-tail U-Net), their typed configs and the model registry.

Import the submodules directly (``from napari_mpt_deblur.models.registry import load_model``);
this package's ``__init__`` stays free of torch so that ``import napari_mpt_deblur`` is fast.
"""

#: The shipped model offered first (demo, napari widgets, calibrate): the one that measured best
#: over the whole defocus range in docs/models.md (the MPT trained on blur radii up to 26 px; the
#: other MPT, `mpt-tiny-fluo`, is slightly better up to ~15 um but falls behind beyond it).
RECOMMENDED_MODEL = "mpt-tiny-fluo-wide"

#: The shipped colour (RGB, 3-channel) model: stained tissue / brightfield colour images
#: (docs/models.md, "The colour model"). The napari RGB sample names it.
RGB_MODEL = "h2t-unet-rgb"
