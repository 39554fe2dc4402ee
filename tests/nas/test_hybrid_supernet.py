"""The hybrid supernet (nas.hybrid.supernet): every subnet against the plain network it extracts (outputs and
gradients), modules a subnet does not use never read (NaN canaries), BatchNorm recalibrated per subnet, images resized
to the subnet's resolution, and clear errors."""
import copy

import numpy as np
import pytest
import torch
from hybrid_models import supernet
from test_hybrid_space import replace_stage, uninet_b

from elastic_ops import plain_hybrid, recalibrate_batch_norm
from nas.hybrid.supernet import HybridSupernet, HybridSupernetConfig
from nas.spaces import load_space

TOL = dict(atol=1e-4, rtol=1e-4)


pytestmark = pytest.mark.usefixtures("one_thread")

def images(space, batch: int = 2, side: int | None = None) -> torch.Tensor:
    return torch.randn(batch, space.in_chans, side or space.img_size, side or space.img_size)


def archs_of(space, count: int):
    return [space.min_arch(), space.max_arch()] + space.sample_many(np.random.default_rng(1), count).archs()


def extraction_sources(model: HybridSupernet, arch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Where each weight of ``model.extract(arch)`` comes from: for every parameter of the plain network, the index of
    the supernet parameter and the flat position in it of each of its elements. Found by extracting from a float64
    copy of the supernet whose parameters hold distinct element numbers (exact integers in float64), the smallest
    parameters numbered first, so that those extract() rounds through float32 (relative position tables) keep theirs
    exact too (below 2^24)."""
    tagged = copy.deepcopy(model).double()
    params = list(tagged.parameters())
    order = sorted(range(len(params)), key=lambda i: params[i].numel())
    starts, owners, first = [], [], 0
    with torch.no_grad():
        for i in order:
            params[i].copy_(torch.arange(first, first + params[i].numel(), dtype=torch.float64).view_as(params[i]))
            starts.append(first)
            owners.append(i)
            first += params[i].numel()
    starts, owners = torch.tensor(starts), torch.tensor(owners)
    sources = {}
    for name, param in tagged.extract(arch).named_parameters():
        numbers = param.detach().double().flatten()
        assert torch.equal(numbers, numbers.round()) and 0 <= numbers.min() and numbers.max() < first, (
            f"{name} is not a copy of supernet weights")
        numbers = numbers.long()
        slot = torch.searchsorted(starts, numbers, right=True) - 1
        sources[name] = owners[slot], numbers - starts[slot]
    return sources


def assert_same_gradients(model: HybridSupernet, arch, x: torch.Tensor, loss) -> None:
    """Every extracted weight is a copy of one part of a super weight, and every part of a super weight the subnet
    reads is copied once: position by position, each weight gradient of the plain network is the supernet's at the
    element it was copied from, and the supernet's gradient is zero everywhere else. Both run in training mode in
    float64 (copies of both), so that rounding stays far below any gradient landing in the wrong place."""
    model64 = copy.deepcopy(model).double().train()
    model64.zero_grad(set_to_none=True)
    # extract() gives the relative position tables its plain modules' default dtype (float32), rounding them
    plain64 = model64.extract(arch).double().train()
    loss(model64(x.double(), arch)).backward()
    loss(plain64(x.double())).backward()
    supers = [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
              for p in model64.parameters()]
    plains = dict(plain64.named_parameters())
    scale = max(p.grad.abs().max().item() for p in plains.values() if p.grad is not None)
    covered = [torch.zeros(g.numel(), dtype=torch.bool) for g in supers]
    for name, (owner, position) in extraction_sources(model, arch).items():
        grad = plains[name].grad
        grad = torch.zeros(plains[name].numel(), dtype=torch.float64) if grad is None else grad.flatten()
        ours = torch.empty_like(grad)
        for o in owner.unique().tolist():
            mine = owner == o
            ours[mine] = supers[o][position[mine]]
            assert not covered[o][position[mine]].any(), f"{name} copies an element another weight copies"
            covered[o][position[mine]] = True
        torch.testing.assert_close(ours, grad, rtol=1e-6, atol=1e-9 * scale, msg=lambda m, name=name: f"{name}: {m}")
    for grad, read in zip(supers, covered):
        assert torch.equal(grad[~read], torch.zeros_like(grad[~read])), "a gradient outside the extracted elements"


@pytest.mark.parametrize("name", ["uninet-cifar", "elasticvit-mobile-cifar"])
def test_cifar_subnets_equal_their_extracted_network_forward_and_backward(name):
    model = supernet(name)
    space = model.space
    for arch in archs_of(space, 3):
        x = images(space)
        model.eval()
        plain = model.extract(arch)
        assert isinstance(plain, plain_hybrid.HybridNetwork) and not plain.training
        with torch.no_grad():
            torch.testing.assert_close(model(x, arch), plain(x), **TOL)
        # Training mode: BatchNorm on batch statistics; gradients of the input and of every weight.
        model.train(), plain.train()
        model.zero_grad(set_to_none=True)
        x_super, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = model(x_super, arch)
        torch.testing.assert_close(out, plain(x_plain), **TOL)
        upstream = torch.randn_like(out)
        out.backward(upstream)
        plain(x_plain).backward(upstream)
        torch.testing.assert_close(x_super.grad, x_plain.grad, **TOL)
        assert_same_gradients(model, arch, x, lambda out, upstream=upstream: (out * upstream.double()).sum())
    model.zero_grad(set_to_none=True)
    model.eval()


def test_a_float64_supernet_extracts_float64_subnets():
    """Every tensor of an extracted subnet has the supernet's dtype, the relative position tables cut to a smaller
    grid included (the smallest arch runs at a lower resolution than the tables were made for), and the subnet
    computes the supernet's float64 logits to float64 precision."""
    model = copy.deepcopy(supernet("elasticvit-mobile-cifar")).double()
    arch = model.space.min_arch()
    plain = model.extract(arch)
    tables = [m for m in plain.modules() if isinstance(m, plain_hybrid.RelativePositionBias)]
    assert tables and min(t.max_side for t in tables) < max(m.max_side for m in model.modules()
                                                            if isinstance(m, plain_hybrid.RelativePositionBias))
    assert {name: t.dtype for name, t in plain.state_dict().items() if t.is_floating_point()} == \
        {name: torch.float64 for name, t in plain.state_dict().items() if t.is_floating_point()}
    x = images(model.space).double()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x, arch), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["uninet", "elasticvit-mobile"])
def test_imagenet_subnets_equal_their_extracted_network(name):
    """The full presets: eval outputs of the smallest, the largest and a random subnet, and weight gradients of the
    smallest (the CIFAR presets check gradients thoroughly)."""
    model = supernet(name).eval()
    space = model.space
    x = images(space, batch=1)
    for arch in archs_of(space, 1):
        with torch.no_grad():
            torch.testing.assert_close(model(x, arch), model.extract(arch)(x), **TOL)
    arch = space.min_arch()
    assert_same_gradients(model, arch, images(space, batch=2, side=arch.resolution), lambda out: out.square().sum())


def test_uninet_b0_is_a_subnet_of_the_uninet_supernet():
    model = supernet("uninet").eval()
    x = images(model.space, batch=1, side=160)
    with torch.no_grad():
        plain = model.extract(uninet_b(160))
        torch.testing.assert_close(model(x, uninet_b(160)), plain(x), **TOL)
    layers = [type(layer).__name__ for layer in plain.layers]
    assert layers.count("InvertedResidual") == 1 + 2 + 4 + 4 and layers.count("PositionalAttentionBlock") == 12
    assert layers.count("LocalDSM") == 3 and layers.count("LocalGlobalDSM") == 2
    assert plain.stem.conv.out_channels == 32 and plain.head.conv.out_channels == 1280


def active_modules(model: HybridSupernet) -> list[torch.nn.Module]:
    return [module for module, _, _ in model.active_layers]


def test_modules_a_subnet_does_not_use_are_never_read():
    """NaN in every DSM, operator and block past the depth that the subnet does not use: its outputs stay finite and
    unchanged, and those modules get no gradient. (The layers' own tests put NaN outside the active slices.)"""
    model = supernet("uninet-cifar")
    space = model.space
    arch = replace_stage(space.sample(3), 3, op="attention", depth=1, dsm="global")
    x = images(space)
    model.eval()
    with torch.no_grad():
        before = model(x, arch)
    saved = {name: t.clone() for name, t in model.state_dict().items()}
    used = {id(t) for module in active_modules(model) for t in list(module.parameters()) + list(module.buffers())}
    poisoned = [t for stage in model.stages for t in list(stage.parameters()) + list(stage.buffers())
                if id(t) not in used and t.is_floating_point()]
    assert len(poisoned) > 50
    try:
        with torch.no_grad():
            for tensor in poisoned:
                tensor.fill_(float("nan"))
            torch.testing.assert_close(model(x, arch), before, **TOL)
        model.train()
        model(x, arch).sum().backward()
        assert all(t.grad is None for t in poisoned if isinstance(t, torch.nn.Parameter))
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)


def test_batch_norm_is_recalibrated_per_subnet():
    """Recalibrating the supernet for an arch, then extracting, gives the statistics that recalibrating the
    extracted network gives: each subnet's own, whichever subnet was calibrated before."""
    model = supernet("elasticvit-mobile-cifar")
    space = model.space
    saved = {name: t.clone() for name, t in model.state_dict().items()}
    batches = [images(space, batch=8) * 2 + 0.5 for _ in range(3)]
    first, second = space.sample_many(np.random.default_rng(4), 2).archs()
    try:
        model.recalibrate_batch_norm(batches, first)
        theirs = model.extract(second)  # its BatchNorms hold what the first subnet's recalibration left
        stale = {name: t.clone() for name, t in theirs.state_dict().items()}
        ours = model.recalibrate_batch_norm(batches, second).extract()
        recalibrate_batch_norm(theirs, batches)
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, b, **TOL, msg=name)
        assert any(not torch.allclose(b, stale[name]) for name, b in theirs.state_dict().items()
                   if name.endswith("running_var")), "vacuous: the first subnet's statistics were the second's"
        assert not model.training and all(norm.momentum == 0.1 for norm in ours.modules()
                                          if isinstance(norm, torch.nn.BatchNorm2d))
        with torch.no_grad():
            torch.testing.assert_close(model(batches[0]), theirs(batches[0]), **TOL)
    finally:
        model.load_state_dict(saved)


def test_images_are_resized_to_the_subnet_resolution():
    model = supernet("elasticvit-mobile-cifar").eval()
    arch = model.space.sample(5)
    arch = type(arch)(24, arch.stages)
    x = images(model.space)
    small = torch.nn.functional.interpolate(x, size=(24, 24), mode="bicubic", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x, arch), model(small, arch), **TOL)
        torch.testing.assert_close(model.extract(arch)(x), model(small, arch), **TOL)


def test_parameter_names_follow_the_stages():
    names = set(supernet("uninet-cifar").state_dict())
    assert {"stem.conv.weight", "stages.0.blocks.conv.0.conv_dw.weight", "stages.2.blocks.mlp.1.mlp_tokens.fc1.weight",
            "stages.3.dsm.local-global.kv.weight", "stages.4.blocks.attention.1.attn.qkv.weight",
            "head.classifier.weight"} <= names
    assert not any(name.startswith("stages.1.dsm.global") for name in names), "stage 1 allows the local DSM only"


def test_bad_archs_and_images_are_refused_and_change_nothing():
    model = supernet("uninet-cifar")
    space = model.space
    arch = space.sample(6)
    model.set_arch(arch)
    with pytest.raises(ValueError, match=r"arch.stages\[1\].channels=40 not in \(24, 32\)"):
        model.set_arch(replace_stage(arch, 1, channels=40))
    assert model.arch == arch
    with pytest.raises(TypeError, match="expected a HybridArch"):
        model.set_arch(load_space("cifar-tiny").max_arch())
    with pytest.raises(ValueError, match=r"expected square images \[batch, 3, side, side\], got \(2, 3, 32, 24\)"):
        model(torch.zeros(2, 3, 32, 24))
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        HybridSupernetConfig(space, drop_path_rate=1.0)
    with pytest.raises(TypeError, match="space must be a HybridSpace"):
        HybridSupernetConfig(load_space("cifar-tiny"))


def test_drop_path_and_head_dropout_act_in_training_only():
    space = load_space("uninet-cifar")
    torch.manual_seed(0)
    model = HybridSupernet(HybridSupernetConfig(space, drop_path_rate=0.5, head_dropout=0.5))
    x, arch = images(space), space.max_arch()
    model.train()
    assert not torch.equal(model(x, arch), model(x, arch))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, arch), model.extract(arch)(x), **TOL)
