"""Numeric building blocks shared by the methods: the row quantizer (``grid``), the seeded weight
noise (``noise``), the compute dtype (``dtype``) and what every layer with salient columns has in
common (``salient``).

These modules import nothing from salientft outside ``ops``; ``saliency``, ``gift`` and ``quant``
all build on them, never on each other's internals.
"""
