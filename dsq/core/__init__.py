"""dsq's ground floor: errors, checkpoint reading, atomic outputs and manifests, text data and tokens.

Nothing here imports a stage (quantize, finetune, export, eval), the orchestration (dsq.run) or the tools.
"""
