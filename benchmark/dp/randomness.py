"""The random streams a DP mechanism draws from: secret unless a run opts into reproducibility.

DP's guarantee assumes the noise and the sample are unknown to the adversary. Seeding them from
the run config (as privseg once did) lets whoever holds the config — in a federation, the
server that hands it out — regenerate the noise and subtract it. So every DP stream (DP-SGD's
Gaussian noise, Poisson subject sampling, the server's DP-FedAvg noise and site sampling,
SecAgg+'s rounding) starts from the operating system's entropy (``secrets``; never stored,
logged or sent), and from enough of it that no seed can be searched for: torch's CPU generator
keeps only the low 32 bits of a ``manual_seed`` (2^32 candidates: a day of one core to try
them all against a released update), so a secret CPU generator gets its whole Mersenne-Twister
state (624 words) from the OS instead (:func:`dp_generator`); NumPy streams take 128 bits.
``privacy.noise_seed`` opts into streams derived from the config instead, for benchmark runs
that must reproduce bit for bit; their record says that the noise is replayable.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch

from privseg.config import RunConfig

#: where torch's CPU generator state (``get_state()``, 5056 bytes) keeps its 624 MT19937
#: words, each in a little-endian uint64 slot: after the initial seed (8 bytes), ``left`` and
#: ``seeded`` (4 + 4) and ``next`` (8); checked against ``manual_seed`` by the tests
_MT_OFFSET, _MT_WORDS = 24, 624

#: what the record says about the noise of a run that opted into reproducible streams
REPRODUCIBLE_NOTE = ("noise reproducible from the config (privacy.noise_seed): a benchmark run, "
                     "not a private release")
SECRET_NOTE = ("noise and sampling drawn from secret generators, their whole state taken from "
               "operating-system entropy for every run (never recorded or sent)")


def dp_seed(noise_seed: int | None, stream: str, *context: object) -> int:
    """The seed of one NumPy DP random stream (``stream`` names it: ``"site-sampling"``...).

    ``noise_seed`` None: a fresh secret 128-bit seed from the OS's entropy on every call.
    Otherwise a 63-bit hash of ``(noise_seed, stream, *context)``, so streams of different
    purposes, sites or run seeds never coincide while each is reproducible.
    """
    if noise_seed is None:
        return secrets.randbits(128)
    text = ":".join(str(x) for x in (noise_seed, stream, *context))
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) >> 1


def secret_cpu_generator() -> torch.Generator:
    """A torch CPU generator whose whole MT19937 state (624 × 32 bits) is OS entropy."""
    g = torch.Generator()
    g.manual_seed(0)  # valid bookkeeping fields: left = 1 regenerates from the words next
    state = g.get_state().numpy().copy()
    words = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype=np.uint32)
    words = words.astype(np.uint64) | (np.arange(_MT_WORDS, dtype=np.uint64) == 0)  # never 0
    state[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS] = words.view(np.uint8)
    state[:8] = 0  # the reported "initial seed": nothing to reveal
    g.set_state(torch.from_numpy(state))
    return g


def dp_generator(noise_seed: int | None, stream: str, *context: object,
                 device: torch.device | str = "cpu") -> torch.Generator:
    """The torch generator of one DP stream on ``device``: secret (all of its state from the
    OS) unless ``noise_seed`` opts in, then seeded from :func:`dp_seed`'s hash."""
    device = torch.device(device)
    if noise_seed is not None:
        return torch.Generator(device=device).manual_seed(dp_seed(noise_seed, stream, *context))
    if device.type == "cpu":
        return secret_cpu_generator()
    # CUDA's Philox generator takes all 64 bits of its seed
    return torch.Generator(device=device).manual_seed(secrets.randbits(64))


def np_legacy_state(noise_seed: int | None, stream: str, *context: object) -> tuple:
    """A NumPy ``RandomState`` state for a DP stream drawn from the global generator (Flower's
    helpers draw there): the full MT state from OS entropy unless ``noise_seed`` opts in."""
    if noise_seed is None:
        return np.random.RandomState().get_state()
    return np.random.RandomState(dp_seed(noise_seed, stream, *context) % 2**32).get_state()


def noise_note(noise_seed: int | None) -> str:
    """How a run's DP randomness was drawn, in words for its record."""
    return SECRET_NOTE if noise_seed is None else REPRODUCIBLE_NOTE


def refuse_replayable_noise(cfg: RunConfig, who: str) -> None:
    """Raise ValueError if ``cfg`` is a DP run whose noise is replayable from the
    config (``privacy.noise_seed``): a deployed party must draw its noise in secret."""
    if cfg.privacy.enabled and cfg.privacy.noise_seed is not None:
        raise ValueError(f"{who}: refusing a config with privacy.noise_seed: its DP noise "
                         "would be replayable by whoever holds the config; remove the key")
