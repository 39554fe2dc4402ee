"""Native CPU kernels (elastic_ops._native, elastic_ops._C) against the PyTorch reference.

Every op runs on every instruction set this CPU has (AVX-512, AVX2, portable), on super weights that
are NaN outside the active block, with awkward shapes (197 tokens, prime widths, active size 1 and max,
strided x). The grouped (K subnets) kernels are checked against the single-subnet reference looped
over the subnets. Malformed calls straight into _C must raise, never crash.
"""
from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

import elastic_ops
from elastic_ops import BackendUnavailableError, _backend, reference

_C = pytest.importorskip("elastic_ops._C")
from kernel_checks import AttentionCase, super_tensor  # noqa: E402

from elastic_ops import _native  # noqa: E402  (needs the extension)

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(params=_C.available_isas())
def isa(request):
    """Run the test on one instruction set, then restore the best one."""
    _C.select_isa(request.param)
    yield request.param
    _C.select_isa(_C.available_isas()[0])


@pytest.fixture
def native():
    with elastic_ops.use_backend("native"), torch.no_grad():
        yield


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous layout: every other channel of a wider buffer."""
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"))
    wide[..., ::2] = x
    return wide[..., ::2]


# --- linear --------------------------------------------------------------------------------------

LINEAR_CASES = {
    # name: (leading dims of x, in, out, in_max, out_max)
    "vit-197-tokens": ((2, 197), 37, 53, 48, 64),
    "active-1": ((3, 5), 1, 1, 8, 8),
    "active-max": ((4, 7), 64, 96, 64, 96),
    "prime-wide": ((131,), 97, 193, 101, 199),
    "1d-input": ((), 13, 29, 16, 32),
}


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("case", LINEAR_CASES.values(), ids=LINEAR_CASES.keys())
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_linear_matches_reference(isa, native, case, activation, layout):
    lead, d_in, d_out, in_max, out_max = case
    x = torch.randn(*lead, d_in)
    if layout == "strided":
        x = strided(x)
    elif layout == "transposed" and x.dim() >= 3:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    weight, bias = super_tensor(out_max, in_max, active=(d_out, d_in)), super_tensor(out_max, active=(d_out,))
    y = elastic_ops.elastic_linear(x, weight, bias, d_out, activation)
    torch.testing.assert_close(y, reference.linear(x, weight, bias, d_out, activation), **TOL)


def test_linear_without_bias(isa, native):
    x, weight = torch.randn(2, 197, 40), super_tensor(72, 48, active=(70, 40))
    torch.testing.assert_close(elastic_ops.elastic_linear(x, weight, None, 70, "gelu"),
                               reference.linear(x, weight, None, 70, "gelu"), **TOL)


# --- layer norm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,d_max", [((2, 197, 37), 48), ((5, 1), 4), ((3, 64), 64), ((131, 193), 199)],
                         ids=["vit-197-tokens", "active-1", "active-max", "prime"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_layer_norm_matches_reference(isa, native, shape, d_max, affine, layout):
    x = torch.randn(*shape) * 3 + 1
    if layout == "strided":
        x = strided(x)
    d = shape[-1]
    weight = super_tensor(d_max, active=(d,)) if affine else None
    bias = super_tensor(d_max, active=(d,)) if affine else None
    y = elastic_ops.elastic_layer_norm(x, weight, bias, eps=1e-5)
    torch.testing.assert_close(y, reference.layer_norm(x, weight, bias, 1e-5), **TOL)


# --- MLP -----------------------------------------------------------------------------------------

MLP_CASES = {
    # name: (leading dims, embed, hidden, embed_max, hidden_max)
    "vit-197-tokens": ((2, 197), 37, 149, 48, 192),
    "active-1": ((3, 4), 1, 1, 8, 16),
    "active-max": ((2, 65), 48, 192, 48, 192),
    "prime": ((101,), 97, 389, 101, 401),
}


@pytest.mark.parametrize("case", MLP_CASES.values(), ids=MLP_CASES.keys())
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_mlp_matches_reference(isa, native, case, layout, with_bias):
    lead, e, hidden, e_max, hidden_max = case
    x = torch.randn(*lead, e)
    if layout == "strided":
        x = strided(x)
    w1, w2 = super_tensor(hidden_max, e_max, active=(hidden, e)), super_tensor(e_max, hidden_max, active=(e, hidden))
    b1 = super_tensor(hidden_max, active=(hidden,)) if with_bias else None
    b2 = super_tensor(e_max, active=(e,)) if with_bias else None
    y = elastic_ops.elastic_mlp(x, w1, b1, w2, b2, hidden)
    torch.testing.assert_close(y, reference.mlp(x, w1, b1, w2, b2, hidden), **TOL)


# --- attention -----------------------------------------------------------------------------------

ATTENTION_CASES = {
    "vit-197-tokens": AttentionCase(2, 197, 37, 48, 2, 3, 64),
    "one-head-prime": AttentionCase(3, 97, 29, 32, 1, 3, 16),
    "max-heads-max-embed": AttentionCase(2, 65, 64, 64, 4, 4, 16),
    "odd-head-dim-one-token": AttentionCase(2, 1, 1, 8, 2, 2, 24),
}


def attention_params(case: AttentionCase, with_bias: bool = True) -> dict[str, torch.Tensor | None]:
    """Block-layout super weights, NaN outside the active rows of each of the q, k, v blocks."""
    width, max_width = case.width, case.max_width
    qkv = super_tensor(3, max_width, case.max_embed, active=(3, width, case.embed))
    qkv_bias = super_tensor(3, max_width, active=(3, width))
    return dict(
        qkv_weight=qkv.view(3 * max_width, case.max_embed),
        qkv_bias=qkv_bias.view(-1) if with_bias else None,
        proj_weight=super_tensor(case.max_embed, max_width, active=(case.embed, width)),
        proj_bias=super_tensor(case.max_embed, active=(case.embed,)) if with_bias else None,
    )


@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
@pytest.mark.parametrize("layout", ["contiguous", "batch-minor"])
def test_attention_matches_reference(isa, native, case, layout):
    x = torch.randn(case.batch, case.tokens, case.embed)
    if layout == "batch-minor":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    params = attention_params(case)
    y = elastic_ops.elastic_attention(x, **params, num_heads=case.heads, head_dim=case.head_dim)
    expected = reference.attention(x, **params, num_heads=case.heads, head_dim=case.head_dim)
    torch.testing.assert_close(y, expected, **TOL)


def test_attention_without_bias(isa, native):
    case = ATTENTION_CASES["vit-197-tokens"]
    x, params = torch.randn(case.batch, case.tokens, case.embed), attention_params(case, with_bias=False)
    torch.testing.assert_close(elastic_ops.elastic_attention(x, **params, num_heads=2, head_dim=64),
                               reference.attention(x, **params, num_heads=2, head_dim=64), **TOL)


# --- threads -------------------------------------------------------------------------------------

def test_results_do_not_depend_on_the_thread_count(native):
    """Each output element is summed in one fixed order whatever the split across threads."""
    case = ATTENTION_CASES["vit-197-tokens"]
    x, params = torch.randn(case.batch, case.tokens, case.embed), attention_params(case)
    w1, w2 = super_tensor(192, 48, active=(149, 37)), super_tensor(48, 192, active=(37, 149))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            results.append((elastic_ops.elastic_attention(x, **params, num_heads=2, head_dim=64),
                            elastic_ops.elastic_mlp(x, w1, None, w2, None, 149)))
    finally:
        torch.set_num_threads(before)
    for one, many in zip(*results):
        assert torch.equal(one, many)


def test_concurrent_python_threads_get_their_own_results():
    x = [torch.randn(4, 65, 48) for _ in range(4)]
    w1, w2 = super_tensor(192, 48, active=(192, 48)), super_tensor(48, 192, active=(48, 192))
    results = [None] * len(x)

    def run(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = _native.mlp(x[i], w1, None, w2, None, 192)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(x))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for xi, yi in zip(x, results):
        torch.testing.assert_close(yi, reference.mlp(xi, w1, None, w2, None, 192), **TOL)


FORK_INPUTS = [torch.randn(256, 48), super_tensor(96, 48, active=(96, 48)), super_tensor(48, 96, active=(48, 96))]


def _mlp_in_child(queue):
    torch.set_num_threads(2)
    x, w1, w2 = FORK_INPUTS
    with torch.no_grad():
        queue.put(_native.mlp(x, w1, None, w2, None, 96).tolist())


def test_forked_child_can_run_the_kernels_after_the_parent_started_its_threads():
    """The child has none of the parent's pool workers: it must start its own, not wait on the parent's."""
    x, w1, w2 = FORK_INPUTS
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            expected = reference.mlp(x, w1, None, w2, None, 96)
            torch.testing.assert_close(_native.mlp(x, w1, None, w2, None, 96), expected, **TOL)  # workers up
    finally:
        torch.set_num_threads(before)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_mlp_in_child, args=(queue,))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=10)
    assert child.exitcode == 0
    torch.testing.assert_close(torch.tensor(result), expected, **TOL)


# --- dispatch ------------------------------------------------------------------------------------

def test_automatic_choice_is_native_for_cpu_float32_inference(monkeypatch):
    # As in a process that never set TRITON_INTERPRET: choices are cached per process, so start from none.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("ELASTIC_OPS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_choices", {})
    cpu = torch.device("cpu")
    for op in ("linear", "layer_norm", "mlp", "attention"):
        assert _backend.select(op, cpu, torch.float32, needs_grad=False) == "native"
        assert _backend.select(op, cpu, torch.float32, needs_grad=True) == "reference"
        assert _backend.select(op, cpu, torch.float64, needs_grad=False) == "reference"


def test_every_op_has_a_native_implementation():
    from elastic_ops.functional import implementation

    for op in ("linear", "layer_norm", "mlp", "attention"):
        assert implementation(op, "native").__module__ == "elastic_ops._native"


def test_forced_native_with_gradients_raises():
    x = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(16, 8)
    with elastic_ops.use_backend("native"), pytest.raises(BackendUnavailableError, match="forward-only"):
        elastic_ops.elastic_linear(x, weight, None, 16)
    with elastic_ops.use_backend("native"), pytest.raises(BackendUnavailableError, match="forward-only"):
        elastic_ops.elastic_layer_norm(torch.randn(4, 8), torch.randn(8, requires_grad=True), None)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), "float32"),
    (dict(x=torch.randn(4, 8, device="meta")), "CPU"),
    (dict(x=torch.randn(4, 8).to_sparse()), "strided"),
    (dict(weight=torch.randn(16, 8, requires_grad=True)), "forward-only"),
    (dict(weight=torch.randn(16, 8, 1)), "2 dimensions"),
    (dict(out_features=17), "out_sizes"),
    (dict(out_features=0), "out_sizes"),
    (dict(x=torch.randn(4, 9)), "columns"),
])
def test_native_entry_points_reject_what_the_kernels_cannot_take(bad, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(16, 8), bias=None, out_features=16, activation="gelu")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        _native.linear(**args)


def test_native_attention_rejects_a_qkv_weight_not_in_block_layout():
    with pytest.raises(ValueError, match="block layout"):
        _native.attention(torch.randn(1, 4, 8), torch.randn(100, 8), None, torch.randn(8, 32), None, 1, 16)


# --- K subnets in one pass -----------------------------------------------------------------------

def padded(outputs: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(y, (0, width - y.shape[-1])) for y in outputs])


def grouped_input(embed: list[int], batch: int, tokens: int) -> torch.Tensor:
    """[K, B, N, max(embed)] with subnet k's channels past embed[k] zero, as nas.vit.batched keeps them."""
    x = torch.randn(len(embed), batch, tokens, max(embed))
    for k, e in enumerate(embed):
        x[k, ..., e:] = 0
    return x


GROUPS = {"three-subnets": ([37, 48, 1], [149, 192, 1], [2, 3, 1]), "one-subnet-max": ([48], [192], [3])}


@pytest.mark.parametrize("embed,hidden,heads", GROUPS.values(), ids=GROUPS.keys())
def test_grouped_ops_match_the_reference_looped_over_subnets(isa, embed, hidden, heads):
    e_max, h_max, dh = 48, 192, 16
    x = grouped_input(embed, 2, 197)
    gamma, beta = super_tensor(e_max + 3, active=(e_max,)), super_tensor(e_max + 3, active=(e_max,))
    w1, b1 = super_tensor(h_max + 5, e_max + 3, active=(h_max, e_max)), super_tensor(h_max + 5, active=(h_max,))
    w2, b2 = super_tensor(e_max + 3, h_max + 5, active=(e_max, h_max)), super_tensor(e_max + 3, active=(e_max,))
    attn = attention_params(AttentionCase(2, 197, e_max, e_max + 3, 3, 4, dh))
    with torch.no_grad():
        got = {
            "linear": _native.linear_grouped(x, w1, b1, hidden, "gelu"),
            "layer_norm": _native.layer_norm_grouped(x, embed, gamma, beta),
            "mlp": _native.mlp_grouped(x, embed, w1, b1, w2, b2, hidden),
            "attention": _native.attention_grouped(x, embed, **attn, head_counts=heads, head_dim=dh),
        }
        expected = {
            "linear": padded([reference.linear(x[k], w1, b1, o, "gelu") for k, o in enumerate(hidden)], max(hidden)),
            "layer_norm": padded([reference.layer_norm(x[k, ..., :e], gamma, beta) for k, e in enumerate(embed)],
                                 e_max),
            "mlp": padded([reference.mlp(x[k, ..., :e], w1, b1, w2, b2, h)
                           for k, (e, h) in enumerate(zip(embed, hidden))], e_max),
            "attention": padded([reference.attention(x[k, ..., :e], **attn, num_heads=h, head_dim=dh)
                                 for k, (e, h) in enumerate(zip(embed, heads))], e_max),
        }
    for op in got:
        torch.testing.assert_close(got[op], expected[op], **TOL, msg=lambda m: f"{op}: {m}")


def test_grouped_padding_is_written_as_zeros():
    """The outputs are fresh tensors: every column past a subnet's size must be written, as zero."""
    x = grouped_input([5, 9], 1, 3)
    with torch.no_grad():
        y = _native.linear_grouped(x, torch.randn(12, 9), torch.randn(12), [4, 12])
    assert torch.equal(y[0, ..., 4:], torch.zeros_like(y[0, ..., 4:]))


def test_grouped_sizes_are_checked():
    x = grouped_input([5, 9], 1, 3)
    with torch.no_grad():
        with pytest.raises(ValueError, match="2 subnets"):
            _native.layer_norm_grouped(x, [5], None, None)
        with pytest.raises(ValueError, match="outside"):
            _native.layer_norm_grouped(x, [5, 10], None, None)
        with pytest.raises(TypeError, match="sequence of ints"):
            _native.layer_norm_grouped(x, [5, 9.0], None, None)


# --- malformed calls straight into _C ------------------------------------------------------------

def spec(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), tuple(t.stride())


def valid_calls() -> dict[str, tuple]:
    """For each _C entry point: a well-formed argument tuple (the tensors are kept alive by the closure)."""
    x3, x_attn = torch.randn(1, 6, 8), torch.randn(2, 5, 8)
    w, b = torch.randn(16, 8), torch.randn(16)
    w2, b2 = torch.randn(8, 16), torch.randn(8)
    qkv, qkv_b, proj = torch.randn(3 * 2 * 4, 8), torch.randn(24), torch.randn(8, 8)
    out16, out8, out_attn = torch.empty(1, 6, 16), torch.empty(1, 6, 8), torch.empty(2, 5, 8)
    valid_calls.keep = (x3, x_attn, w, b, w2, b2, qkv, qkv_b, proj, out16, out8, out_attn)
    return {
        "linear_forward": (spec(x3), spec(w), spec(b), [16], spec(out16), True, 2),
        "layer_norm_forward": (spec(x3), spec(b2), spec(b2), [8], 1e-5, spec(out8), 2),
        "mlp_forward": (spec(x3), spec(w), spec(b), spec(w2), spec(b2), [8], [16], spec(out8), 2),
        "attention_forward": (spec(x_attn), 2, spec(qkv), spec(qkv_b), spec(proj), spec(b2), 2, 4, [8], [2],
                              spec(out_attn), 2),
    }


def corruptions(value):
    """Malformed replacements for one argument, each of which _C must detect."""
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], tuple):  # a tensor spec
        ptr, shape, strides = value
        rank = len(shape)
        yield "null pointer", (0, shape, strides)
        yield "misaligned pointer", (ptr + 1, shape, strides)
        yield "negative size", (ptr, (-1,) + shape[1:], strides)
        yield "absurd size", (ptr, (1 << 40,) + shape[1:], strides)
        yield "negative stride", (ptr, shape, (-1,) + strides[1:])
        yield "rank too low", (ptr, shape[:-1], strides[:-1])
        yield "rank too high", (ptr, shape + (1,), strides + (1,))
        yield "shape not a sequence", (ptr, 5, strides)
        yield "non-int size", (ptr, ("a",) * rank, strides)
        yield "two-tuple", (ptr, shape)
        yield "not a tuple", [ptr, shape, strides]
        yield "string", "garbage"
    elif isinstance(value, list):  # a size table
        yield "too few sizes", value[:-1]
        yield "too many sizes", value + value
        yield "zero size", [0] * len(value)
        yield "negative size", [-3] * len(value)
        yield "size past the weight", [v + 1000 for v in value]
        yield "sizes not ints", ["a"] * len(value)
        yield "sizes not a list", 7
    elif isinstance(value, int) and not isinstance(value, bool):
        yield "zero", 0
        yield "negative", -5
        yield "string", "3"
    elif isinstance(value, float):
        yield "negative eps", -1.0


def test_malformed_calls_into_the_extension_raise_instead_of_crashing():
    checked = 0
    for name, args in valid_calls().items():
        entry = getattr(_C, name)
        entry(*args)  # the well-formed call runs
        with pytest.raises(TypeError):
            entry(*args[:-1])
        with pytest.raises(TypeError):
            entry(*args, 1)
        for position, value in enumerate(args):
            for what, bad in corruptions(value):
                call = args[:position] + (bad,) + args[position + 1:]
                with pytest.raises((ValueError, TypeError), match=None) as info:
                    entry(*call)
                assert str(info.value), f"{name} arg {position} ({what}): empty message"
                checked += 1
    assert checked > 100


REQUIRED_TENSORS = {"linear_forward": (0, 1, 4), "layer_norm_forward": (0, 5), "mlp_forward": (0, 1, 3, 7),
                    "attention_forward": (0, 2, 4, 10)}


def test_none_where_a_tensor_is_required_raises():
    for name, args in valid_calls().items():
        for position in REQUIRED_TENSORS[name]:
            with pytest.raises(ValueError, match="ptr, shape, strides"):
                getattr(_C, name)(*(args[:position] + (None,) + args[position + 1:]))


def test_the_extension_says_it_is_internal():
    assert "elastic_ops._native" in _C.__doc__
    with pytest.raises(ValueError, match="unsupported instruction set"):
        _C.select_isa("sse9")
