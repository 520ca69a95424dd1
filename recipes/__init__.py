"""Data plane: the training recipe that runs on the GPU node (needs the `train` extra)."""
