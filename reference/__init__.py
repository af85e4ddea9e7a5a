"""Independent float64 reference implementations ("oracles") of the GRPO math.

Nothing in this package may import ``grpo_core``: the point of the oracle is
that it is written separately from the code it checks.
"""
