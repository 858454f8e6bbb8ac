"""What a DP step releases never depends on memory it did not write.

Freed CPU memory comes back unzeroed (``keep_freed_cpu_memory`` keeps large buffers in the
heap, and torch never clears them), so a buffer that is allocated with ``torch.empty`` and
only partly written would carry an earlier step's per-sample gradients into the released
model: a leak to the server, or to whoever gets the weights, that no accountant covers.

torch's ``fill_uninitialized_memory`` (on under deterministic algorithms) fills every
uninitialised allocation with NaN. A step that reads any element it did not write then
releases NaN, or at least different weights; one that reads none releases bitwise the same
weights with and without the fill. (Checked to fail when the noise buffer's last slice is
left unwritten.)
"""

from __future__ import annotations

import pytest
import torch

from privseg.architectures import build
from privseg.bench import _FixedBatch, grad_sample_mode, split_mode
from privseg.config import parse_config
from privseg.training.setup import place_model, seed_everything
from privseg.training.step import prepare_training, train_step

CPU = torch.device("cpu")


def _released_weights(mode: str) -> torch.Tensor:
    """The model's weights after three DP steps (σ = 1, noise seeded) in ``mode``."""
    base, sampler = split_mode(mode)
    privacy = {"enabled": True, "target_epsilon": None, "noise_multiplier": 1.0,
               "noise_seed": 0, "grad_sample_mode": grad_sample_mode(mode), "delta": 1e-5}
    if sampler:
        privacy["conv_grad_sampler"] = sampler
    cfg = parse_config({
        "training": {"expected_batch_size": 6, "physical_batch_size": 3, "device": "cpu",
                     "crops_per_subject": 1},
        "dataset": {"dims": 2}, "privacy": privacy, "tracking": {"wandb": "off"}})
    seed_everything(0)
    model = place_model(build("unet", 2, 1, 3, base_channels=8, depth=3), cfg, CPU)
    data = _FixedBatch(6, (24, 24), 3)
    state = prepare_training(cfg, model, data, CPU)
    for _ in range(3):
        train_step(state, data.x, data.y, cfg, CPU)
    return torch.cat([p.detach().flatten() for p in state.model.parameters()])


@pytest.fixture
def nan_filled_allocations():
    """Switch torch's NaN fill of uninitialised memory on for the test, then restore."""
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)

    def enable():
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
    yield enable
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    torch.utils.deterministic.fill_uninitialized_memory = was[2]


# "hooks" is hooks with the default (book-keeping) conv sampler
@pytest.mark.parametrize("mode", ["hooks", "hooks+grouped", "hooks+opacus", "functorch", "ghost"])
def test_released_weights_do_not_read_unwritten_memory(mode, nan_filled_allocations):
    plain = _released_weights(mode)
    nan_filled_allocations()
    filled = _released_weights(mode)
    assert torch.isfinite(filled).all(), "the step read memory it never wrote"
    assert torch.equal(plain, filled)
