"""SAM's image encoder (Segment Anything, Kirillov et al. 2023) as a family of supernets, one module a concern:
``space`` (the choices and the encoder a space's ``sam:`` arguments describe), ``supernet`` (the supernet, its
extraction and the conversion of SAM's weights), ``plain`` (the plain encoder a subnet extracts and exports to).

The modules are imported by name, not from here, so that the spaces and the cost model load without the supernet.
"""
