"""Activation store: any hook point's activations over a dataset, one row per token with what the token is
(modality, example, image, patch row/col, position, token id, diffusion step, timestep and guidance branch).
Every family: contrastive towers, VLM LMs and vision towers (Qwen2-VL's merge-window patch order included),
diffusion denoisers per step and branch, and diffusion text encoders over the prompts.

    store = write_activations(lens, images, "vision.blocks.2.resid_post", "acts/", dtype="float16")
    for x in store.batches("vision.blocks.2.resid_post", 4096, seed=0, where={"modality": "image"}): ...
    for acts, meta in stream_activations(lens, data, names="lm.blocks.4.resid_post", batch_size=8): ...

Sharded safetensors written atomically, resumable after a kill, one slice per rank under torchrun (writer.py);
read shuffled at disk speed through a seeded shuffle buffer, filtered and stratified by metadata (reader.py,
shuffle.py).
"""

from .reader import ActivationStore
from .schema import BRANCHES, COLUMNS, MODALITIES
from .writer import stream_activations, write_activations

__all__ = ["ActivationStore", "BRANCHES", "COLUMNS", "MODALITIES", "stream_activations", "write_activations"]
