"""toolkit.validation.validation_loss, the one validation loss of the trainer (`valid/loss`) and
of `python -m toolkit.evaluate` (their agreement on a real run: tests/test_datasets.py)."""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model_config
from toolkit.data import SequenceSampler
from toolkit.model import HybridLM
from toolkit.validation import validation_loss


@pytest.mark.parametrize("training", [True, False])
def test_validation_loss_is_the_mean_over_the_first_micro_batches(training):
    model = HybridLM(tiny_model_config(), vocab_size=100).train(training)
    tokens = np.random.default_rng(0).integers(0, 100, 64 * 9 + 1)
    samples = SequenceSampler(tokens, 64, seed=3)

    def loss_fn(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    loss = validation_loss(
        model, samples, loss_fn, batches=3, micro_batch_size=2, autocast=contextlib.nullcontext
    )
    assert model.training == training  # the caller's mode, whichever it was
    model.eval()
    with torch.no_grad():
        expected = [
            loss_fn(model(x), y).item() for x, y in (samples.batch(2 * i, 2) for i in range(3))
        ]
    assert loss == pytest.approx(sum(expected) / 3, rel=1e-6)
