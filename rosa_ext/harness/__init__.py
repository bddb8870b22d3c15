"""Harness layer: the demo and the multi-turn experiment (needs the ``demo`` extra).

- :mod:`.problems`: the :class:`~rosa_ext.harness.problems.Problem` type and the generated
  arithmetic problems (development / held-out splits)
- :mod:`.rewards`: rule-based, dense and judge rewards
- :mod:`.metrics`: Acc@K, Correction Uplift, bootstrap CIs
- :mod:`.conversation`: the multi-turn feedback loop for one problem (:func:`interact`)
- :mod:`.pg_baseline`: the single-sample policy-gradient baseline
- :mod:`.experiment`: the batched experiment's command line (``python -m rosa_ext.harness.experiment``),
  re-exporting its parts: :mod:`.methods` (the methods and controls), :mod:`.generation` (batched,
  cache-continued generation), :mod:`.runner` (the K-turn loop and the per-turn update),
  :mod:`.summary` (tables and plot), :mod:`.resumable` (runs written as they go, resumable)
- :mod:`.cli`: ``python -m rosa_ext demo``
"""
