"""The isotropic ViT family (AutoFormer, ViTAS, SuperSAM's plain ViT; DESIGN.md), one module a concern: ``arch`` (a
subnet: embed dim, per-layer heads and MLP ratios, layers on or off, patch size), ``space`` (the choices, validation,
sampling, evolution operators, AutoFormer's config files), ``cost`` (exact params and MACs), ``supernet`` (the
supernet and timm's weights), ``batched`` (K subnets in one pass).

The modules are imported by name, not from here, so that the spaces and the cost model load without the supernet.
"""
