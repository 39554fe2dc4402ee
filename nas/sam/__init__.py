"""SAM's image encoder (Segment Anything, Kirillov et al. 2023) as a family of supernets, one module a concern:
``supernet`` (the supernet and the conversion of SAM's weights).

The modules are imported by name, not from here, so that the spaces and the cost model load without the supernet.
"""
