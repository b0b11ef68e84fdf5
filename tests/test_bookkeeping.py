"""Book-keeping clipping against per-example gradients computed one example at a time."""

import pytest
import torch
from torch import nn

from fedpriv.client.bookkeeping import BookKeeping, BookKeepingError


class Tagger(nn.Module):
    """Every layer kind book-keeping clips: embeddings (one with padding), LayerNorm, 3-D and 2-D Linear."""

    def __init__(self, width=8):
        super().__init__()
        self.words = nn.Embedding(50, width, padding_idx=0)
        self.positions = nn.Embedding(64, width)
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, 5, bias=False)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).expand_as(ids)  # batch-sized, as book-keeping needs
        hidden = torch.tanh(self.mix(self.norm(self.words(ids) + self.positions(positions))))
        return self.out(hidden.mean(1))


def clipped_sum_one_by_one(module, ids, targets, clip):
    params = [p for p in module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(ids)):
        loss = nn.functional.cross_entropy(module(ids[i : i + 1]), targets[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        for t, g in zip(total, grads, strict=True):
            t += min(1.0, clip / (norm + 1e-6)) * g
    return total


# 1 and 3 tokens: the ghost norm (T x T Gram matrices); 40: the per-example gradient is smaller.
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_one_backward_pass_gives_the_sum_of_clipped_per_example_gradients(tokens):
    torch.manual_seed(tokens)
    module = Tagger()
    module.mix.bias.requires_grad_(False)  # a frozen weight stays out of norms and sums
    ids = torch.randint(0, 50, (7, tokens))
    ids[0, -1] = 0  # padding
    targets = torch.randint(0, 5, (7,))
    params = [p for p in module.parameters() if p.requires_grad]
    # A clip between the smallest and largest norm: some examples are clipped, some not.
    norms = []
    for i in range(len(ids)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(module(ids[i : i + 1]), targets[i : i + 1]), params)
        norms.append(float(torch.sqrt(sum((g**2).sum() for g in grads))))
    clip = sorted(norms)[3]
    expected = clipped_sum_one_by_one(module, ids, targets, clip)

    engine = BookKeeping(module, clip)
    engine.criterion(module(ids), targets).backward()
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-4)
    assert module.mix.bias.grad is None and not module.mix.bias.requires_grad
    engine.remove()
    assert all(p.requires_grad for p in params)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())  # a plain module again


def test_a_layer_it_cannot_clip_is_refused_by_name():
    module = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 3))
    with pytest.raises(BookKeepingError, match=r"1 \(Conv1d\) has trainable weights"):
        BookKeeping(module, 1.0)
    module[1].requires_grad_(False)  # frozen: nothing to clip
    BookKeeping(module, 1.0).remove()


def test_a_layer_used_twice_and_a_broadcast_input_are_refused():
    shared = nn.Linear(4, 4)
    engine = BookKeeping(nn.Sequential(shared, shared), 1.0)
    with pytest.raises(BookKeepingError, match="used twice"):
        engine.module(torch.randn(3, 4))
    engine.remove()

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.positions = nn.Embedding(8, 4)

        def forward(self, x):
            return (x + self.positions(torch.arange(x.shape[1]).unsqueeze(0))).sum((1, 2))

    module = Broadcast()
    engine = BookKeeping(module, 1.0)
    losses = module(torch.randn(3, 5, 4))
    with pytest.raises(BookKeepingError, match="positions saw a batch of 1 rows, not 3"):
        engine.backward(losses)
    assert all(p.requires_grad for p in module.parameters())  # restored even so
