"""The one-row kernels against F.linear: float32 weights, and int8 ones (the row quantized as q8_0) against their
dequantized values."""

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import rel_err


def test_the_gemv_kernel_equals_f_linear_on_awkward_shapes_and_inside_a_compiled_graph():
    from hyla.ops.gemv import available, gemv

    assert available()  # the machines that run the suite have a C++ compiler (the library path: the test above)
    for out, inp in [(1, 1), (7, 13), (1000, 1024), (3, 5000), (8192, 64), (257, 6), (9000, 7)]:  # 9000: two chunks
        w, b = torch.randn(inp, out).t(), torch.randn(out)  # stored transposed, as the engine stores weights
        for x in (torch.randn(inp), torch.randn(1, 1, inp), torch.randn(1, 2 * inp)[:, ::2]):
            assert rel_err(gemv(x, w), F.linear(x, w)) < 1e-5
            assert rel_err(gemv(x, w, b), F.linear(x, w, b)) < 1e-5
    compiled = torch.compile(lambda x, w, b: gemv(torch.tanh(x), w, b) * 2, fullgraph=True)
    x, w, b = torch.randn(1, 96), torch.randn(96, 40).t(), torch.randn(40)
    assert rel_err(compiled(x, w, b), F.linear(torch.tanh(x), w, b) * 2) < 1e-5


def test_the_gemv_kernel_splits_its_rows_over_any_number_of_threads():
    """Each thread sums its own rows; the sums agree with F.linear for 1 thread, more threads than rows, and an
    odd count."""
    from hyla.ops.gemv import gemv

    before = torch.get_num_threads()
    try:
        for threads in (1, 3, 5):
            torch.set_num_threads(threads)
            for out, inp in [(9, 2), (100, 13), (300, 1001)]:
                w, x = torch.randn(inp, out).t(), torch.randn(inp)
                assert rel_err(gemv(x, w), F.linear(x, w)) < 1e-5
    finally:
        torch.set_num_threads(before)


def test_the_q8_row_is_within_half_a_step_of_each_block_and_rounds_ties_to_even():
    from hyla.ops.gemv import q8_row

    for n in (1, 31, 32, 33, 100):
        x = torch.randn(n) * torch.logspace(-3, 3, n)  # blocks of very different scales
        blocks = torch.nn.functional.pad(x, (0, -n % 32)).view(-1, 32)
        half_step = (blocks.abs().amax(1, keepdim=True) / 254).expand(-1, 32).flatten()[:n]
        assert ((q8_row(x) - x).abs() <= half_step * 1.0001).all()
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0])  # scale 1: every other value a tie
    assert q8_row(ties).tolist() == [127.0, 0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 0.0]
    assert q8_row(torch.zeros(40)).eq(0).all()


@pytest.mark.parametrize("loop", ["plain", "avx2", "vnni"])
def test_the_q8_kernel_equals_f_linear_on_the_quantized_rows_and_the_dequantized_weight(loop):
    """Rows against an int8 weight (one scale per output row), each quantized in blocks of 32: F.linear of
    q8_row(x) on the dequantized weight up to float32 summation order, on awkward shapes (padding of both the
    outputs to 64 and the inputs to 32), rows with a zero block and ties; each loop this CPU runs (the plain one
    every CPU runs, AVX2's, AVX512-VNNI's) alike, one row and several (up to past q8_max_rows, none), eager and inside
    a compiled graph. int8_linear takes it for as many rows as q8_max_rows says, fbgemm for more."""
    from hyla.ops.gemv import gemv_q8, q8_loops, q8_row
    from hyla.ops.linear import Q8_MAX_ROWS, int8_linear, q8_max_rows, quantize_int8

    if loop not in q8_loops():
        pytest.skip(f"this CPU does not run gemv_q8's {loop} loop")

    for out, inp in [(1, 1), (7, 13), (64, 32), (65, 33), (1000, 1024), (3, 5000), (257, 6)]:
        weight, bias = torch.randn(out, inp), torch.randn(out)
        q = quantize_int8(weight, bias)
        dequantized = q.dequantized()
        assert (dequantized - weight).abs().max() <= weight.abs().amax() / 254 * 1.0001  # half a step of 127
        zero_block = torch.randn(inp)
        zero_block[32:64] = 0
        mean = torch.arange(inp) % 5 - 2.5  # a large mean: the +128 of the weights must come back out exactly
        for x in (torch.randn(inp), torch.randn(1, 1, inp) * 1e3, torch.randn(1, 2 * inp)[:, ::2], zero_block, mean):
            expected = F.linear(q8_row(x.reshape(-1)).view(x.shape), dequantized)
            assert rel_err(gemv_q8(x, q.layout, q.scale, loop=loop), expected) < 1e-5
            assert rel_err(gemv_q8(x, q.layout, q.scale, bias, loop), expected + bias) < 1e-5
            if q8_max_rows(q.layout.numel()):
                assert rel_err(int8_linear(x, q), expected + bias) < 1e-5
            else:  # fbgemm (the plain loop only, a large weight)
                assert rel_err(int8_linear(x, q), F.linear(x, dequantized, bias)) < 0.03
            assert rel_err(expected, F.linear(x, dequantized)) < 0.02  # the row's rounding: q8_0's
        for rows in (0, 2, 5, Q8_MAX_ROWS, Q8_MAX_ROWS + 1):  # each row quantized by itself, as one row alone
            several = torch.randn(rows, inp) * torch.logspace(-3, 3, rows)[:, None]
            expected = F.linear(q8_row(several), dequantized, bias)
            assert gemv_q8(several, q.layout, q.scale, bias, loop).shape == (rows, out)
            if rows:
                assert rel_err(gemv_q8(several, q.layout, q.scale, bias, loop), expected) < 1e-5
                assert rel_err(gemv_q8(several[None], q.layout, q.scale, bias, loop)[0], expected) < 1e-5
            if 1 < rows <= q8_max_rows(q.layout.numel()):
                assert rel_err(int8_linear(several, q), expected) < 1e-5
            elif rows > 1:  # fbgemm, activations quantized per call (7 bits, one scale for all rows): close
                several = torch.randn(rows, inp)
                assert rel_err(int8_linear(several, q), F.linear(several, dequantized, bias)) < 0.05
    weight, x = torch.randn(1024, 1024), torch.randn(1024)  # 2^20 weights: through fbgemm with the plain loop only
    q = quantize_int8(weight)
    q8 = gemv_q8(x, q.layout, q.scale)
    assert torch.equal(int8_linear(x, q), q8) == (q8_loops()[-1] != "plain")
    assert rel_err(int8_linear(x, q), F.linear(x, q.dequantized())) < 0.03
    q, bias = quantize_int8(torch.randn(65, 33)), torch.randn(65)  # inside a compiled graph: the C++ operator
    compiled = torch.compile(lambda x: gemv_q8(x * 2, q.layout, q.scale, bias, loop), fullgraph=True)
    for x in (torch.randn(1, 1, 33), torch.randn(3, 2, 33)):
        assert torch.equal(compiled(x), gemv_q8(x * 2, q.layout, q.scale, bias, loop))


@pytest.mark.parametrize("loop", ["plain", "avx2", "vnni"])
def test_int8_experts_in_one_call_equal_their_products_one_by_one_eager_and_compiled(loop):
    """experts_q8 against its reference: each chosen expert's gate/up and down products through gemv_q8 (the row
    and each activation quantized as q8_0), F.silu between, the router weights summing them; awkward sizes (hidden
    and intermediate not multiples of 32 or 64), one to three experts of four, a repeated expert, a zero router
    weight, a zero row, a large one, several rows; and the same sums from the operator inside a compiled graph."""
    from hyla.ops.gemv import experts_q8, gemv_q8, q8_loops
    from hyla.ops.linear import quantize_int8

    if loop not in q8_loops():
        pytest.skip(f"this CPU does not run gemv_q8's {loop} loop")
    num_experts = 4
    for hidden, inter, k in [(45, 70, 2), (64, 32, 1), (33, 130, 3), (256, 96, 2)]:
        gate_up = [quantize_int8(torch.randn(2 * inter, hidden) * 0.2) for _ in range(num_experts)]
        down = [quantize_int8(torch.randn(hidden, inter) * 0.2) for _ in range(num_experts)]
        pairs = [(w.layout, w.scale) for w in gate_up], [(w.layout, w.scale) for w in down]
        x = torch.stack([torch.randn(hidden), torch.randn(hidden) * 1e3, torch.zeros(hidden), torch.randn(hidden)])
        router = torch.stack([torch.rand(k), torch.zeros(k), torch.rand(k), torch.rand(k)])
        ids = torch.stack([torch.randperm(num_experts)[:k] for _ in range(3)] + [torch.zeros(k, dtype=torch.long)])
        expected = torch.zeros_like(x)
        for n in range(len(x)):
            for r, e in zip(router[n], ids[n].tolist(), strict=True):
                g, u = gemv_q8(x[n], gate_up[e].layout, gate_up[e].scale, loop=loop).chunk(2)
                expected[n] += r * gemv_q8(F.silu(g) * u, down[e].layout, down[e].scale, loop=loop)
        torch.compiler.reset()  # (a graph for each size and loop: past dynamo's recompile limit)
        compiled = torch.compile(
            functools.partial(experts_q8, gate_up=pairs[0], down=pairs[1], loop=loop), fullgraph=True
        )
        for got in (experts_q8(x, router, ids, *pairs, loop), compiled(x, router, ids)):
            assert got.shape == x.shape
            for n in range(len(x)):
                if expected[n].abs().max() > 0:
                    assert rel_err(got[n], expected[n]) < 1e-5
                else:
                    assert got[n].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_lightning_decode_kernel_equals_the_torch_step_in_place_eager_and_compiled(dtype):
    """gemv.lightning_decode against its reference, one recurrent step per request (lightning_attention_step):
    awkward head sizes, scattered slots, padding rows (zeros out, no state touched), q/k/v as strided views of one
    projection, 1 and 3 threads (heads split over them), and inside a compiled graph (the pool updated in place)."""
    from hyla.ops.gemv import lightning_decode
    from hyla.ops.lightning import lightning_attention_step

    before_threads = torch.get_num_threads()
    try:
        for threads, (h, d, slot_ids) in itertools.product(
            (1, 3), [(3, 17, [4, -1, 0]), (2, 1, [1]), (8, 64, [2, 5, 0, 1]), (1, 128, [-1, 3])]
        ):
            torch.set_num_threads(threads)
            pool, slope = torch.randn(6, h, d, d, dtype=dtype), torch.rand(h, dtype=dtype)
            before = pool.clone()
            qkv = torch.randn(len(slot_ids), 3, h, d, dtype=dtype)
            q, k, v = qkv.unbind(1)  # views with strides between rows
            o = lightning_decode(q, k, v, slope, pool, torch.tensor(slot_ids))
            for row, slot in enumerate(slot_ids):
                if slot < 0:
                    assert o[row].eq(0).all()
                    continue
                o_ref, s_ref = lightning_attention_step(*(x[row, None] for x in (q, k, v)), slope, before[slot, None])
                assert rel_err(o[row, None], o_ref) < (1e-5 if dtype == torch.float32 else 1e-12)
                assert rel_err(pool[slot, None], s_ref) < (1e-5 if dtype == torch.float32 else 1e-12)
            for untouched in set(range(6)) - set(slot_ids):
                assert torch.equal(pool[untouched], before[untouched])
    finally:
        torch.set_num_threads(before_threads)
    pool = torch.randn(3, 2, 16, 16, dtype=dtype)
    expected_pool, slots = pool.clone(), torch.tensor([2, 0])
    q, k, v = torch.randn(3, 2, 2, 16, dtype=dtype).unbind()
    slope = torch.rand(2, dtype=dtype)
    compiled = torch.compile(lambda q, pool: lightning_decode(q * 2, k, v, slope, pool, slots) + 1, fullgraph=True)
    with torch.inference_mode():
        got = compiled(q, pool)
    expected = lightning_decode(q * 2, k, v, slope, expected_pool, slots) + 1
    assert rel_err(got, expected) < 1e-6 and rel_err(pool, expected_pool) < 1e-6


@pytest.mark.parametrize("threads", [1, 3])
def test_the_lightning_decode_kernel_applies_a_slots_consecutive_rows_in_order(threads):
    """Rows sharing a slot (a request's last token and its drafts in one verify step) equal as many decode steps,
    one token at a time through the reference step (float64): runs of 1, 3 and 5 rows, a padding row between
    them; rows of a slot that are not consecutive are refused."""
    from hyla.ops.gemv import lightning_decode
    from hyla.ops.lightning import lightning_attention_step

    h, d, slot_ids = 3, 19, [4, 4, 4, -1, 0, 2, 2, 2, 2, 2]
    pool, slope = torch.randn(6, h, d, d, dtype=torch.float64), torch.rand(h, dtype=torch.float64)
    q, k, v = torch.randn(3, len(slot_ids), h, d, dtype=torch.float64).unbind()
    expected_pool, expected = pool.clone(), torch.zeros_like(q)
    for row, slot in enumerate(slot_ids):
        if slot >= 0:
            o, s = lightning_attention_step(q[row, None], k[row, None], v[row, None], slope, expected_pool[slot, None])
            expected[row], expected_pool[slot] = o[0], s[0]
    before_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = lightning_decode(q, k, v, slope, pool, torch.tensor(slot_ids))
        with pytest.raises(RuntimeError, match="consecutive"):
            lightning_decode(q[:3], k[:3], v[:3], slope, pool, torch.tensor([1, 2, 1]))
    finally:
        torch.set_num_threads(before_threads)
    assert rel_err(got, expected) < 1e-12 and rel_err(pool, expected_pool) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_lightning_replay_kernel_equals_the_closed_form_state(dtype):
    """gemv.lightning_replay (a verify step's rewind, all layers in one call) against its reference, lightning_state
    from the kept states, layer by layer: sequences keeping 0, 1, 3 and 6 tokens of a packed step, their kept rows
    out of order, other slots untouched."""
    from hyla.ops.gemv import lightning_replay
    from hyla.ops.lightning import lightning_state

    layers, h, d = 3, 3, 21
    pools = [torch.randn(7, h, d, d, dtype=dtype) for _ in range(layers)]
    slopes = [torch.rand(h, dtype=dtype) for _ in range(layers)]
    befores = [torch.randn(4, h, d, d, dtype=dtype) for _ in range(layers)]
    ks, vs = ([x for x in torch.randn(layers, 12, h, d, dtype=dtype)] for _ in range(2))
    slots, rows = torch.tensor([5, 0, 3, 2]), torch.tensor([2, 0, 3, 1])
    segments = [(0, 0), (1, 1), (4, 3), (6, 6)]
    expected = [pool.clone() for pool in pools]
    for pool, k, v, slope, before in zip(expected, ks, vs, slopes, befores, strict=True):
        pool[slots] = lightning_state(k, v, slope, before[rows], segments)
    starts, counts = (torch.tensor(x) for x in zip(*segments, strict=True))
    lightning_replay(pools, slots, befores, rows, ks, vs, slopes, starts, counts)
    for got, want in zip(pools, expected, strict=True):
        assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-12)
    with pytest.raises(RuntimeError, match="outside"):
        lightning_replay(pools, slots, befores, rows, ks, vs, slopes, starts, counts + 1)
    with pytest.raises(RuntimeError, match="one of each per layer"):
        lightning_replay(pools, slots, befores[:2], rows, ks, vs, slopes, starts, counts)
