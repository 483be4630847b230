"""Operations on adapter folders: merge, export to vLLM / LoRAX, the interference report.

They read and write artifacts and run the model, nothing of training or serving; the server builds
merged recipes on request with merge.py, so this layer sits below serving and training.
"""
