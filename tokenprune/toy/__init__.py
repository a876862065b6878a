"""The shipped default model: a small LLaVA-1.5 trained on the generated ``shapes`` task.

Modules:

* :mod:`tokenprune.toy.task` -- scene generator, question families, answer normalisation.
* :mod:`tokenprune.toy.lm` -- fetch / verify / load the SmolLM2-135M-Instruct language model file.
* :mod:`tokenprune.toy.model` -- assemble the ``LlavaForConditionalGeneration`` from the committed
  assets (:func:`tokenprune.toy.model.load_default_model`).
* :mod:`tokenprune.toy.train` -- the training recipe (``main(argv)``).
"""

from __future__ import annotations
