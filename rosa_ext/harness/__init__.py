"""Harness layer: the demo and the multi-turn experiment (needs the ``demo`` extra).

- :mod:`.problems`: the :class:`~rosa_ext.harness.problems.Problem` type and the generated
  arithmetic problems (development / held-out splits)
- :mod:`.rewards`: rule-based, dense and judge rewards
- :mod:`.metrics`: Acc@K, Correction Uplift, bootstrap CIs
- :mod:`.conversation`: the multi-turn feedback loop for one problem (:func:`interact`)
- :mod:`.pg_baseline`: the single-sample policy-gradient baseline
- :mod:`.experiment`: the batched experiment runner (``python -m rosa_ext.harness.experiment``)
- :mod:`.cli`: ``python -m rosa_ext demo``
"""
