"""Building blocks of tools/preprocess_data.py: reading loose JSON with line-accurate errors,
sentence splitting, the per-worker document encoder, the ordered encoding pipeline, input
partitions and the rejects file. The indexed-dataset writer itself lives in
``megatron.core.datasets.indexed_dataset``.

Nothing here imports torch, so the tool starts fast.
"""
