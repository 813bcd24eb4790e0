"""Latent methods: the per-method logic around the laps (docs/method.md, docs/architecture.md §5).

    model.latent                                    # the ModelConfig.latent_method; params latent.*
    out = run_laps(model, tokens, labels=labels)    # base.py: every lap of a micro-batch (PP = 1)

Files: ``base.py`` (the hooks' base class ``LatentMethod``, the registry ``METHOD_CLASSES``,
``run_laps``), ``alcot.py`` (ALCoT and vanilla: routers, halting, readout, loss), ``router.py``
(routers and the halting update, in fp32), ``fixed_depth.py`` (what the baselines share) and the
baselines of docs/method.md §9: ``loop.py``, ``pause.py``, ``ponder.py``.
"""
