"""Integrations layer: ROSA on a live ``transformers`` / PEFT model.

- :mod:`.model_lookup`: find a model's lm_head, its weight, the decoder body, a PEFT LoRA
- :mod:`.head_hooks`: the lm_head hooks (rank-1 LoRA or hidden shift, per conversation)
- :mod:`.background`: running an update in the background (worker thread / side stream)
- :mod:`.session`: :func:`attach` and :class:`RosaSession`
- :mod:`.models`: offline test models (tiny random ones, the real SmolLM2-135M-Instruct)

Nothing here imports ``transformers`` at module import time.
"""
