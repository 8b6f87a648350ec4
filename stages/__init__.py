"""Stages: one file each. A stage knows nothing of Ray, run paths or the other stages."""
