"""Is the prompt-dependent part of PEDRO used? Per layer, how much the vectors vary across
prompts against the size of their static part (b_up, an IA3 vector)."""
from typing import Dict, Optional

import torch


@torch.no_grad()
def vector_spread(pedro_model, batch: Dict[str, torch.Tensor],
                  adapter_name: Optional[str] = None) -> dict:
    """Per layer: spread_rms, the RMS over the batch's prompts and vector entries of
    (vector - the batch's mean vector), and static_rms, the RMS of the adapter's b_up; plus their
    means over layers. A spread far below the static part means the generator barely depends on
    the prompt. `batch` holds input_ids and optionally attention_mask and prompt_lengths or
    prompt_mask (as pedro_ext.train.collate makes it); the model runs in eval mode (no dropout)
    and is put back in its mode. One adapter (default: the active one) serves every row."""
    name = adapter_name or pedro_model.active_adapter
    if name is None:
        raise ValueError("vector_spread: the model has no active adapter; pass adapter_name")
    ids = batch["input_ids"]
    if ids.shape[0] < 2:
        raise ValueError("vector_spread needs at least 2 prompts to measure a spread")
    was_training = pedro_model.training
    pedro_model.eval()
    try:
        vectors = pedro_model.prompt_vectors(
            ids, attention_mask=batch.get("attention_mask"), adapter_names=[name] * ids.shape[0],
            prompt_mask=batch.get("prompt_mask"), prompt_lengths=batch.get("prompt_lengths"))
    finally:
        pedro_model.train(was_training)
    layers, spread, static = [], [], []
    for idx, v in sorted(vectors.items()):
        b_up = pedro_model.banks[idx].adapters[name].b_up.float()
        layers.append(idx)
        spread.append(float((v - v.mean(0)).pow(2).mean().sqrt()))
        static.append(float(b_up.pow(2).mean().sqrt()))
    return {"adapter": name, "prompts": int(ids.shape[0]), "layers": layers,
            "spread_rms": spread, "static_rms": static,
            "mean_spread_rms": sum(spread) / len(spread), "mean_static_rms": sum(static) / len(static)}
