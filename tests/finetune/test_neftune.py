"""NEFTune: no effect in eval mode, bounded uniform noise in training mode, drawn from torch's global RNG."""

from __future__ import annotations

import math

import pytest
import torch

from gradwise.errors import ConfigError
from gradwise.finetune import attach_neftune, neftune_noise_bound
from gradwise.models import MLP

IDS = torch.tensor([[101, 2054, 2003, 1037, 3899, 102], [101, 7592, 2088, 102, 0, 0]])


def test_bound_formula():
    assert neftune_noise_bound(5.0, 16, 384) == pytest.approx(5.0 / math.sqrt(16 * 384))


def test_eval_outputs_are_bit_identical(minilm):
    minilm.eval()
    with torch.no_grad():
        plain = minilm(IDS)
        handle = attach_neftune(minilm, 10.0)
        hooked = minilm(IDS)
    assert torch.equal(plain, hooked)
    handle.remove()


def test_training_noise_is_uniform_within_the_bound(minilm):
    embed = minilm.embeddings()
    embed.train()
    with torch.no_grad():
        clean = embed(IDS)
        handle = attach_neftune(minilm, 5.0)
        torch.manual_seed(0)
        noisy = embed(IDS)
    noise = noisy - clean
    bound = 5.0 / math.sqrt(IDS.shape[1] * 384)  # L = 6 tokens, d = 384
    assert noise.abs().max() <= bound * (1 + 1e-6)
    # 2·6·384 = 4,608 uniform draws: the largest comes close to the bound, the spread is bound/√3
    assert noise.abs().max() > 0.99 * bound
    assert noise.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert abs(noise.mean().item()) < 0.05 * bound
    handle.remove()
    with torch.no_grad():
        assert torch.equal(embed(IDS), clean)  # detached


def test_noise_follows_the_global_seed(minilm):
    minilm.train()
    attach_neftune(minilm, 5.0)
    embed = minilm.embeddings()
    with torch.no_grad():
        torch.manual_seed(3)
        first = embed(IDS)
        torch.manual_seed(3)
        again = embed(IDS)
        other = embed(IDS)
    assert torch.equal(first, again)  # restoring the RNG (as resume does) replays the noise
    assert not torch.equal(first, other)


def test_training_forward_and_backward_run_with_the_hook(tiny):
    attach_neftune(tiny, 5.0)
    tiny.train()
    torch.nn.functional.cross_entropy(tiny(IDS), torch.tensor([0, 1])).backward()
    assert tiny.body.embeddings.word_embeddings.weight.grad is not None


def test_refuses_non_transformers_and_negative_alpha(tiny):
    with pytest.raises(ConfigError, match="needs a transformer"):
        attach_neftune(MLP(4, [3], 2), 5.0)
    with pytest.raises(ConfigError, match="neftune_alpha"):
        attach_neftune(tiny, -1.0)
