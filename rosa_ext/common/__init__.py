"""Leaf layer: types, defaults and the Jacobian algebra shared by every other layer.

Nothing here imports anything else from ``rosa_ext``; every other layer may import it.
"""
