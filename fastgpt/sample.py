"""Sampling: `fastgpt sample --ckpt OUT [--prompt TEXT] [--tokens N] ...`.

from fastgpt.sample import sample
print(sample("out", prompt="mary had a", tokens=20, seed=0))
"""

import torch

from fastgpt.model import GPT


def generate_text(
    model: GPT,
    tok,
    prompt: str = "",
    tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> str:
    """The prompt continued by `tokens` sampled tokens, as text.

    An empty prompt starts at the beginning of a line. A prompt longer than the model's context
    is an error (ValueError): it is not cropped silently.
    """
    if tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {tokens}.")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"--top-k must be positive, got {top_k}.")
    ids = tok.encode(prompt, close_lines=False) if prompt else []
    block = model.config.block_size
    if len(ids) > block:
        raise ValueError(
            f"The prompt is {len(ids)} tokens long but the model's context is {block} tokens; "
            f"give a prompt of at most {block} tokens."
        )
    start = ids or [tok.start_id()]
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    idx = torch.tensor([start], dtype=torch.long, device=device)  # (1, T)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=generator)
    model.train(was_training)
    return tok.decode(out[0].tolist() if ids else out[0, 1:].tolist())


def sample(
    ckpt: str,
    prompt: str = "",
    tokens: int = 40,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    backend: str | None = None,
) -> str:
    """Load a checkpoint (a training output folder or a checkpoint folder) and sample from it."""
    from fastgpt.checkpoint import load_model
    from fastgpt.train import pick_device

    model, tok, _ = load_model(ckpt, pick_device(device), backend)
    return generate_text(model, tok, prompt, tokens, temperature, top_k, seed)
