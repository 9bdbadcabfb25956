"""Self-contained demos (no data files): ``rigid`` (terrain scans), ``nonrigid`` (a bent limb)
and ``anny_fit`` (the optional parametric body, ``pip install anny``)."""
