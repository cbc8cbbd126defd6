"""Tools beside the run path: the memory and time plan, synthetic checkpoints, outlier models, test helpers.
"""
