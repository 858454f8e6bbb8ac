"""Everything that makes a training step private or counts its cost.

- :mod:`~privseg.dp.accounting`: σ calibration and ε accounting (Opacus' PRV and RDP);
- :mod:`~privseg.dp.private`: Opacus' grad-sample module, DP optimizer, Poisson loader and
  accountant assembled around a model (:func:`~privseg.dp.private.make_private`);
- :mod:`~privseg.dp.optimizer`, :mod:`~privseg.dp.grad_samplers`,
  :mod:`~privseg.dp.grad_sample_module`: privseg's extensions of Opacus, through its own
  extension points (optimizer subclass, ``register_grad_sampler``, module subclass);
- :mod:`~privseg.dp.exactness`: per-sample gradients checked against one-at-a-time autograd.

Opacus extensions live here and nowhere else.
"""
