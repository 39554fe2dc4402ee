"""UniNet's compound scaling (nas.hybrid.scaling): members within the space's rules, growing together, with the FLOPs
growth the coefficients state, each a space of its own whose network has the parameters the cost model counts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nas.hybrid.export import rebuild
from nas.hybrid.scaling import CompoundScaling, compound_family, scale_arch, total_stride
from nas.hybrid.space import ATTENTION_DSMS
from nas.spaces import load_space


@pytest.mark.parametrize("seed", [None, 3, 11])
def test_a_uninet_family_grows_by_the_stated_flops_within_the_rules(seed):
    """On the ImageNet uninet space, from its smallest arch and from random ones: each member keeps the baseline's
    operators and DSMs, every size grows (depth whole blocks, channels multiples of 8 and of the head dim where a stage
    has attention, the resolution a multiple of the total stride), and the MACs grow within 30% of
    ``(alpha * beta^2 * gamma^2) ** phi``, strictly step after step."""
    space = load_space("uninet")
    baseline = space.min_arch() if seed is None else space.sample(np.random.default_rng(seed))
    scaling = CompoundScaling()
    family = compound_family(space, baseline, 4, scaling)
    assert [m.phi for m in family] == [0, 1, 2, 3, 4] and family[0].arch == baseline
    stride = total_stride(space)
    for member in family:
        member.space.validate(member.arch)
        arch = member.arch
        assert arch.resolution % stride == 0 or member.phi == 0
        assert arch.resolution >= baseline.resolution * scaling.gamma ** member.phi - stride
        for stage, base in zip(arch.stages, baseline.stages):
            assert (stage.op, stage.dsm, stage.expansion, stage.kernel_size) == (base.op, base.dsm, base.expansion,
                                                                                 base.kernel_size)
            assert stage.depth == math.ceil(base.depth * scaling.alpha ** member.phi - 1e-9)
            assert stage.channels >= 0.9 * base.channels * scaling.beta ** member.phi
            if member.phi:
                attention = stage.op == "attention" or stage.dsm in ATTENTION_DSMS
                assert stage.channels % (space.head_dim if attention else 8) == 0 and stage.channels % 8 == 0
        growth = member.macs / family[0].macs
        assert growth == pytest.approx(scaling.flops_growth ** member.phi, rel=0.3)
    assert all(a.macs < b.macs and a.params < b.params for a, b in zip(family, family[1:]))


def test_a_member_is_a_network_with_the_parameters_counted():
    """The plain network of each member of a uninet-cifar family, rebuilt from its space alone, holds the params the
    cost model counts (an independent count: its tensors)."""
    space = load_space("uninet-cifar")
    for member in compound_family(space, space.sample(5), 2):
        network = rebuild(member.space, member.arch, "meta")
        assert sum(p.numel() for p in network.parameters()) == member.params


def test_scaling_checks_its_inputs():
    space = load_space("uninet-cifar")
    with pytest.raises(ValueError, match="alpha, beta and gamma must be >= 1"):
        CompoundScaling(0.9, 1.1, 1.1)
    with pytest.raises(ValueError, match="not in"):
        scale_arch(space, load_space("elasticvit-mobile-cifar").max_arch(), 1, CompoundScaling())
