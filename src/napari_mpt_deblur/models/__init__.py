"""Network architectures (MPT, head-to-tail U-Net), their typed configs and the model registry.

Import the submodules directly (``from napari_mpt_deblur.models.registry import load_model``);
this package's ``__init__`` stays free of torch so that ``import napari_mpt_deblur`` is fast.
"""

#: The shipped model offered first (demo, napari widgets): the one that measured best in
#: docs/models.md (the CPU-trained H2T U-Net beats the CPU-trained MPT there).
RECOMMENDED_MODEL = "h2t-unet-fluo"

#: The shipped colour (RGB, 3-channel) model: stained tissue / brightfield colour images
#: (docs/models.md, "The colour model"). The napari RGB sample names it.
RGB_MODEL = "h2t-unet-rgb"
