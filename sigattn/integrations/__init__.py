"""Integrations with other libraries. Each submodule imports its library only when used, so that
``sigattn`` itself needs neither:

* ``sigattn.integrations.transformers``: the ``"sigmoid"`` attention implementation for Hugging Face
  transformers (``register()``), with its mask function.
* ``sigattn.integrations.convert``: switch a pretrained softmax model to sigmoid attention, with a bias
  calibrated so that each query's attention mass starts where softmax's is (``sigattn convert``).
* ``sigattn.integrations.timm``: ``SigmoidAttention``, a drop-in for timm's ViT ``Attention``.

See README.md in this folder for how masks, caches, GQA and packed batches map onto sigattn's functions.
"""
