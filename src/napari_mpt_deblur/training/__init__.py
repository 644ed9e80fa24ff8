"""Training: typed config, the EFCR trainer (resumable, DDP) and EFCRex fine-tuning.

Import the submodules (``training.trainer``, ``training.finetune``, ``training.config``); they
load torch.
"""
