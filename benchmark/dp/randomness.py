"""The random streams a DP mechanism draws from: secret unless a run opts into reproducibility.

DP's guarantee assumes the noise and the sample are unknown to the adversary. Seeding them from
the run config (as privseg once did) lets whoever holds the config — in a federation, the
server that hands it out — regenerate the noise and subtract it. So every DP stream (DP-SGD's
Gaussian noise, Poisson subject sampling, the server's DP-FedAvg noise and site sampling) gets
its own seed from the operating system's entropy (``secrets``, 63 bits, never stored, logged or
sent). ``privacy.noise_seed`` opts into streams derived from the config instead, for benchmark
runs that must reproduce bit for bit; their record says that the noise is replayable.
"""

from __future__ import annotations

import hashlib
import secrets

#: what the record says about the noise of a run that opted into reproducible streams
REPRODUCIBLE_NOTE = ("noise reproducible from the config (privacy.noise_seed): a benchmark run, "
                     "not a private release")
SECRET_NOTE = ("noise and sampling drawn from per-run secret seeds (operating-system entropy, "
               "never recorded or sent)")


def dp_seed(noise_seed: int | None, stream: str, *context: object) -> int:
    """The seed of one DP random stream (``stream`` names it: ``"noise"``, ``"sampler"``...).

    ``noise_seed`` None: a fresh secret 63-bit seed from the OS's entropy on every call.
    Otherwise a hash of ``(noise_seed, stream, *context)``, so streams of different purposes,
    sites or run seeds never coincide while each is reproducible.
    """
    if noise_seed is None:
        return secrets.randbits(63)
    text = ":".join(str(x) for x in (noise_seed, stream, *context))
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) >> 1


def noise_note(noise_seed: int | None) -> str:
    """How a run's DP randomness was drawn, in words for its record."""
    return SECRET_NOTE if noise_seed is None else REPRODUCIBLE_NOTE


def refuse_replayable_noise(cfg, who: str) -> None:
    """Raise ValueError if ``cfg`` (a RunConfig) is a DP run whose noise is replayable from the
    config (``privacy.noise_seed``): a deployed party must draw its noise in secret."""
    if cfg.privacy.enabled and cfg.privacy.noise_seed is not None:
        raise ValueError(f"{who}: refusing a config with privacy.noise_seed: its DP noise "
                         "would be replayable by whoever holds the config; remove the key")
