"""The registered torch.library ops: schemas, fake implementations and autograd pass opcheck."""

import pytest
import torch
from oracle import DEVICE, INTERPRETED

import fastgpt


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_opcheck(backend, causal):
    if backend not in fastgpt.available_backends(DEVICE):
        pytest.skip(f"backend {backend} is not available on {DEVICE}")
    forward = getattr(torch.ops.fastgpt, f"{backend}_attention_forward")
    backward = getattr(torch.ops.fastgpt, f"{backend}_attention_backward")
    dtype = torch.float32 if INTERPRETED or DEVICE.type == "cpu" else torch.float16
    g = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    q, k, v = draw(2, 4, 19, 16), draw(2, 2, 23, 16), draw(2, 2, 23, 16)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    torch.library.opcheck(forward, (q, k, v, causal, 0.25))
    out, lse = forward(q, k, v, causal, 0.25)
    grad_out = draw(2, 4, 19, 16)
    args = (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, causal, 0.25)
    torch.library.opcheck(backward, args)


def test_profiler_shows_fastgpt_ops():
    backend = next(b for b in fastgpt.available_backends(DEVICE) if b != "reference")
    q = torch.randn(1, 2, 8, 16, device=DEVICE, requires_grad=True)
    with torch.profiler.profile() as prof:
        fastgpt.attention(q, q, q, backend=backend).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert f"fastgpt::{backend}_attention_forward" in names
    assert f"fastgpt::{backend}_attention_backward" in names
