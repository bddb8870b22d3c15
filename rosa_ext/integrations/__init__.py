"""Integrations layer: ROSA on a live ``transformers`` / PEFT model, and serving it.

- :mod:`.model_lookup`: find a model's lm_head, its weight, the decoder body, a PEFT LoRA
- :mod:`.head_hooks`: the lm_head hooks (rank-1 LoRA or hidden shift, per conversation)
- :mod:`.lora_params`: the LoRA a session moves -- PEFT's modules or its own, one interface
- :mod:`.recording`: the lm_head inputs a generation computed, kept for the update
- :mod:`.background`: running an update in the background (worker thread / side stream)
- :mod:`.session`: :func:`attach` and :class:`RosaSession` (one conversation)
- :mod:`.store`: :class:`StateStore`, the one per-user store (typed states, validated string ids,
  per-user atomic updates, SQLite persistence) that everything below shares
- :mod:`.users`: :class:`RosaUsers`, many users on one model (batched generate, one batched step)
- :mod:`.serving`: ROSA inside a serving engine, engine-free (per-request states, recorded rows, feedback)
- :mod:`.vllm_plugin`, :mod:`.vllm_routes`, :mod:`.vllm_serve`: the vLLM plugin (the logits layer, the
  request tracker, the ``/rosa`` HTTP routes) and its server command
- :mod:`.export`: a LoRA state as a PEFT adapter directory (other engines' per-request LoRA)
- :mod:`.vllm_processor`: a vLLM logits processor adding a hidden shift sent with the request as W delta
- :mod:`.models`, :mod:`.hf_folder`: offline models (tiny random ones, SmolLM2-135M-Instruct,
  Qwen2.5-Coder-0.5B-Instruct) and SmolLM2 as a transformers folder
- :mod:`.sharded_head`: the hooks on a vocabulary-parallel (ColwiseParallel) head

Nothing here imports ``transformers`` or ``vllm`` at module import time.
"""
