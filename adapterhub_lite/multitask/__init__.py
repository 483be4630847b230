"""Multi-task learning: joint training of task adapters (joint.py) with loss weighting (weighting.py)
and task sampling (sampling.py), the interference report (interference.py), and learned
composition of existing adapters for a new task (compose.py)."""
