"""Sparse expert dispatch against a dense reference, and the MoE block against the built-in."""

import contextlib
import copy
import pickle
from unittest import mock

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_llama4 import Llama4TextConfig, Llama4TextExperts, Llama4TextMoe, cpu_experts, moe

from conftest import tiny_text_kwargs


def dense_reference(experts: Llama4TextExperts, x, expert_indices, expert_weights):
    """Every expert on every row, kept where the row picked it, times its weight; foreign ids (>= E) give 0."""
    num_experts = experts.gate_up_proj.shape[0]
    out = torch.zeros_like(x)
    for e in range(num_experts):
        gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)
        expert_out = (up * experts.act_fn(gate)) @ experts.down_proj[e]
        weight = (expert_weights * (expert_indices == e)).sum(-1, keepdim=True)  # (N, 1)
        out = out + expert_out * weight
    return out


@st.composite
def routings(draw):
    num_experts = draw(st.integers(1, 9))
    top_k = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(0, 40))
    # Restrict routing to a random subset so some experts often receive no tokens; ids >= num_experts stand for
    # experts on another expert-parallel rank.
    allowed = draw(st.lists(st.integers(0, num_experts + 1), min_size=top_k, max_size=num_experts + 2, unique=True))
    rows = [
        draw(st.lists(st.sampled_from(allowed), min_size=top_k, max_size=top_k, unique=True))
        for _ in range(num_tokens)
    ]
    hidden = draw(st.sampled_from([8, 12, 16]))  # 12: strides the grouped GEMM refuses -> loop path
    intermediate = draw(st.sampled_from([4, 8]))
    seed = draw(st.integers(0, 2**16))
    return num_experts, top_k, rows, hidden, intermediate, seed


def _experts_config(num_experts: int, top_k: int, hidden: int, intermediate: int) -> Llama4TextConfig:
    return Llama4TextConfig(
        **tiny_text_kwargs(
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            hidden_size=hidden,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=intermediate,
        )
    )


PATHS = ["gather", "dense", "cpu_kernel", "grouped_mm", "loop"]
# The autograd node each path leaves in the graph (the loop leaves plain matmuls).
PATH_NODES = {
    "gather": "BmmBackward0",
    "dense": "BmmBackward0",
    "cpu_kernel": "_RoutedSwiGLUBackward",
    "grouped_mm": "GroupedMmBackward0",
}


@contextlib.contextmanager
def forced_path(experts: Llama4TextExperts, path: str):
    """Run `experts` down one expert path whatever the row count: gathered weights + bmm (decode), every expert on
    every row (traced on CPU), the CPU kernel (`cpu_experts.routed_swiglu`), torch's grouped GEMM, or the
    per-expert loop that the grouped GEMM falls back to."""
    if path == "cpu_kernel" and not cpu_experts.available():
        pytest.skip("the CPU expert kernel's platform hooks are missing here")
    chosen = path if path in ("gather", "dense") else "sorted"
    experts.use_cpu_kernel = path == "cpu_kernel"
    with (
        mock.patch.object(experts, "_path", lambda rows, num_assignments: chosen),
        mock.patch.object(moe, "_GROUPED_MM", None) if path == "loop" else contextlib.nullcontext(),
    ):
        yield
    experts.use_cpu_kernel = True


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=40, deadline=None)
@given(routing=routings())
def test_sparse_experts_match_dense_reference(path, routing):
    """Every expert path, forced, against every expert on every row: outputs and the gradients of the rows, the
    output weights and both fused weights."""
    num_experts, top_k, rows, hidden, intermediate, seed = routing
    torch.manual_seed(seed)
    config = _experts_config(num_experts, top_k, hidden, intermediate)
    experts = Llama4TextExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    x = torch.randn(len(rows), hidden, requires_grad=True)
    indices = torch.tensor(rows, dtype=torch.long).reshape(len(rows), top_k)
    scores = torch.rand(len(rows), top_k, requires_grad=True)  # output weights

    with forced_path(experts, path):
        sparse = experts(x, indices, scores)
    dense = dense_reference(experts, x, indices, scores)
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)
    # The forced path really ran (the grouped GEMM refuses the 12-wide rows' strides: those take the loop).
    has_local_rows = bool((indices < num_experts).any())
    if path in PATH_NODES and has_local_rows and not (path == "grouped_mm" and hidden == 12):
        assert PATH_NODES[path] in _routed_graph_nodes(sparse)
    if path != "cpu_kernel":
        assert "_RoutedSwiGLUBackward" not in _routed_graph_nodes(sparse)

    upstream = torch.randn_like(sparse)
    params = [x, scores, experts.gate_up_proj, experts.down_proj]
    sparse_grads = torch.autograd.grad((sparse * upstream).sum(), params, allow_unused=True)
    dense_grads = torch.autograd.grad((dense * upstream).sum(), params, allow_unused=True)
    for param, got, want in zip(params, sparse_grads, dense_grads):
        # None is autograd's zero gradient (the loop runs no GEMM when every row is another rank's)
        zero = torch.zeros_like(param)
        torch.testing.assert_close(zero if got is None else got, zero if want is None else want, atol=1e-4, rtol=1e-4)


def test_loop_fallback_equals_grouped_gemm(monkeypatch):
    rows = torch.randn(20, 16)
    weight = torch.randn(5, 16, 8)
    tokens_per_expert = torch.tensor([4, 0, 9, 7, 0])
    grouped = moe.grouped_matmul(rows, weight, tokens_per_expert)
    monkeypatch.setattr(moe, "_GROUPED_MM", None)
    looped = moe.grouped_matmul(rows, weight, tokens_per_expert)
    torch.testing.assert_close(grouped, looped)
    expected = torch.cat([rows[:4] @ weight[0], rows[4:13] @ weight[2], rows[13:] @ weight[3]])
    torch.testing.assert_close(looped, expected)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_block_matches_builtin_forward_and_backward(top_k):
    kwargs = tiny_text_kwargs(num_local_experts=8, num_experts_per_tok=top_k)
    ours = Llama4TextMoe(Llama4TextConfig(**kwargs))
    builtin = transformers.models.llama4.modeling_llama4.Llama4TextMoe(transformers.Llama4TextConfig(**kwargs))
    with torch.no_grad():
        for p in builtin.parameters():
            p.normal_(std=0.2)
    ours.load_state_dict(builtin.state_dict())
    x = torch.randn(3, 10, 64)
    x_ours, x_builtin = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, logits = ours(x_ours)
    ref_out, ref_logits = builtin(x_builtin)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref_out * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_builtin.grad, atol=1e-5, rtol=1e-5)
    builtin_params = dict(builtin.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, builtin_params[name].grad, atol=1e-5, rtol=1e-5, msg=name)


def test_moe_block_puts_the_router_score_on_the_expert_input():
    config = Llama4TextConfig(**tiny_text_kwargs(num_local_experts=2))
    block = Llama4TextMoe(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    x = torch.randn(4, 64)
    out, logits = block(x)
    top, expert = logits.max(-1)
    score = torch.sigmoid(top)[:, None]
    experts = block.experts
    per_token = []
    for t in range(4):
        gate, up = (x[t : t + 1] * score[t] @ experts.gate_up_proj[expert[t]]).chunk(2, dim=-1)
        per_token.append((up * experts.act_fn(gate)) @ experts.down_proj[expert[t]])
    on_input = torch.cat(per_token) + block.shared_expert(x)
    torch.testing.assert_close(out, on_input, atol=1e-4, rtol=1e-4)
    on_output = []
    for t in range(4):
        gate, up = (x[t : t + 1] @ experts.gate_up_proj[expert[t]]).chunk(2, dim=-1)
        on_output.append(score[t] * (up * experts.act_fn(gate)) @ experts.down_proj[expert[t]])
    assert (torch.cat(on_output) + block.shared_expert(x) - out).abs().max() > 1e-3


def _routed_graph_nodes(tensor):
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_hand_written_expert_backward_matches_autograd(dtype, top_k):
    """The CPU path's own backward (_RoutedSwiGLU) against autograd through the dense reference: gradients of the
    input rows, both fused weights and the output weights, with an expert that gets no rows and foreign ids."""
    num_experts, hidden, intermediate, num_rows = 6, 32, 16, 48
    torch.manual_seed(0)
    config = _experts_config(num_experts, top_k, hidden, intermediate)
    experts = Llama4TextExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.3)
        experts.down_proj.normal_(std=0.3)
    experts.to(dtype)
    # Expert 3 gets nothing; ids 6 and 7 belong to another expert-parallel rank.
    choices = torch.tensor([0, 1, 2, 4, 5, 6, 7])
    indices = torch.stack([choices[torch.randperm(len(choices))[:top_k]] for _ in range(num_rows)])
    x = torch.randn(num_rows, hidden, dtype=dtype, requires_grad=True)
    scores = torch.rand(num_rows, top_k, dtype=dtype, requires_grad=True)

    out = experts(x, indices, scores)
    assert "_RoutedSwiGLUBackward" in _routed_graph_nodes(out)
    upstream = torch.randn_like(out)
    params = [x, scores, experts.gate_up_proj, experts.down_proj]
    grads = torch.autograd.grad((out * upstream).sum(), params)

    # Reference: autograd through every expert on every row, in fp32 from the same (possibly bf16) values.
    reference = Llama4TextExperts(config)
    reference.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    ref_params = [x.detach().float().requires_grad_(), scores.detach().float().requires_grad_()]
    ref_out = dense_reference(reference, ref_params[0], indices, ref_params[1])
    ref_grads = torch.autograd.grad(
        (ref_out * upstream.float()).sum(), [*ref_params, reference.gate_up_proj, reference.down_proj]
    )
    for name, got, want in zip(
        ["out", "rows", "scores", "gate_up_proj", "down_proj"], [out, *grads], [ref_out, *ref_grads]
    ):
        assert got.dtype == dtype, name
        # bf16: its rounding of the intermediates, ~0.5% of the largest entry here (the generic path's too).
        atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2 * want.abs().max().item(), 2e-2)
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol, msg=name)
    assert (grads[2][3] == 0).all() and (grads[3][3] == 0).all()  # the expert without rows
    foreign_rows = (indices >= num_experts).all(-1)
    assert (grads[0][foreign_rows] == 0).all()

    # Deterministic, and equal to autograd through the generic (grouped GEMM) path on the same dtype.
    again = torch.autograd.grad((experts(x, indices, scores) * upstream).sum(), params)
    for got, want in zip(again, grads):
        assert torch.equal(got, want)
    generic = torch.autograd.grad((_generic_experts_forward(experts, x, indices, scores) * upstream).sum(), params)
    # Not bitwise: at 2+ threads MKL splits the generic path's GEMMs differently (~1e-6 relative in fp32).
    generic_tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for name, got, want in zip(["rows", "scores", "gate_up_proj", "down_proj"], grads, generic):
        torch.testing.assert_close(got, want, **generic_tolerance, msg=name)


def test_kept_memory_is_reused_only_when_free(monkeypatch):
    """The CPU experts keep their large buffers between steps (`KeptMemory`), but never overwrite a gradient or an
    output that someone still holds, and the results stay those of fresh memory."""
    torch.manual_seed(0)
    config = _experts_config(4, 1, 16, 8)
    experts = Llama4TextExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.3)
        experts.down_proj.normal_(std=0.3)
    indices = torch.tensor([[0], [1], [1], [3], [2], [0]])

    def step(seed: int) -> list[torch.Tensor]:
        experts.zero_grad(set_to_none=True)
        x = torch.randn(6, 16, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        experts(x, indices, torch.ones(6, 1)).square().sum().backward()
        return [x.grad, experts.gate_up_proj.grad, experts.down_proj.grad]

    # References: seed 1 on fresh memory; seed 2 on the memory seed 1 left (checked against fresh memory below).
    want = [[g.clone() for g in step(seed)] for seed in (1, 2)]
    kept = step(1)
    kept_values = [g.clone() for g in kept]
    second = step(2)
    # The gradients still held were not written by the next step.
    assert all(torch.equal(held, value) for held, value in zip(kept, kept_values))
    assert second[1].data_ptr() != kept[1].data_ptr()
    assert all(torch.equal(got, expected) for got, expected in zip(second, want[1]))

    del kept, second
    allocations = []
    new_buffer = cpu_experts._new_buffer
    monkeypatch.setattr(cpu_experts, "_new_buffer", lambda *args: allocations.append(args[0]) or new_buffer(*args))
    third = step(1)
    assert allocations == []  # nothing held the memory: all of it reused
    assert all(torch.equal(got, expected) for got, expected in zip(third, want[0]))

    assert copy.deepcopy(experts).kept_memory._storages == {}
    assert pickle.loads(pickle.dumps(experts)).kept_memory._storages == {}
    experts.double()
    assert experts.kept_memory._storages == {}


def _generic_experts_forward(experts, x, indices, scores):
    with forced_path(experts, "grouped_mm"):
        out = experts(x, indices, scores)
    assert "_RoutedSwiGLUBackward" not in _routed_graph_nodes(out)
    return out


def test_hand_written_expert_backward_under_gradient_checkpointing():
    config = Llama4TextConfig(**tiny_text_kwargs(num_local_experts=4, num_experts_per_tok=2))
    experts = Llama4TextExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.2)
        experts.down_proj.normal_(std=0.2)
    x = torch.randn(20, config.hidden_size, requires_grad=True)
    indices = torch.randint(0, 5, (20, 2))
    scores = torch.rand(20, 2)
    params = [x, experts.gate_up_proj, experts.down_proj]
    plain = torch.autograd.grad(experts(x, indices, scores).square().sum(), params)
    checkpointed_out = torch.utils.checkpoint.checkpoint(experts, x, indices, scores, use_reentrant=False)
    checkpointed = torch.autograd.grad(checkpointed_out.square().sum(), params)
    for got, want in zip(checkpointed, plain):
        assert torch.equal(got, want)


def test_expert_threads_run_under_inference_mode():
    # The expert ranges run on helper threads, which do not inherit the caller's inference mode; generation under
    # `torch.inference_mode` must still work and give the no-grad result.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        block = Llama4TextMoe(Llama4TextConfig(**tiny_text_kwargs(num_local_experts=4)))
        for parameter in block.parameters():
            torch.nn.init.normal_(parameter, std=0.1)
        hidden = torch.randn(64, block.hidden_dim)
        with forced_path(block.experts, "cpu_kernel"), mock.patch.object(cpu_experts, "_MIN_FLOPS_PER_THREAD", 0):
            with torch.inference_mode():
                inference_out, _ = block(hidden)
            with torch.no_grad():
                no_grad_out, _ = block(hidden)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(inference_out.clone(), no_grad_out, rtol=0, atol=0)


def test_grouped_gemm_out_of_memory_propagates_and_keeps_the_kernel(monkeypatch):
    """An out-of-memory error is the caller's (a smaller batch may fit): it must reach them, and must not move the
    device and dtype to the per-expert loop for the rest of the process; a kernel that refuses its inputs does."""
    rows, weight, counts = torch.randn(8, 16), torch.randn(2, 16, 8), torch.tensor([3, 5])
    monkeypatch.setattr(moe, "_GROUPED_MM_UNSUPPORTED", set())
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(moe, "_GROUPED_MM", out_of_memory)
    for _ in range(2):
        with pytest.raises(torch.OutOfMemoryError):
            moe.grouped_matmul(rows, weight, counts)
    assert calls == [1, 1] and moe._GROUPED_MM_UNSUPPORTED == set()

    def cpu_allocator_failure(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(moe, "_GROUPED_MM", cpu_allocator_failure)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        moe.grouped_matmul(rows, weight, counts)
    assert moe._GROUPED_MM_UNSUPPORTED == set()

    def unsupported(*args, **kwargs):
        raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")

    monkeypatch.setattr(moe, "_GROUPED_MM", unsupported)
    expected = torch.cat([rows[:3] @ weight[0], rows[3:] @ weight[1]])
    torch.testing.assert_close(moe.grouped_matmul(rows, weight, counts), expected)  # the loop answered
    assert moe._GROUPED_MM_UNSUPPORTED == {("cpu", torch.float32)}


def _seeded_block(**overrides) -> Llama4TextMoe:
    torch.manual_seed(0)
    block = Llama4TextMoe(Llama4TextConfig(**tiny_text_kwargs(**overrides)))
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    return block


def test_cpu_kernel_degrades_to_the_generic_path_without_its_platform_hooks(monkeypatch):
    """Where the thread hooks are missing (not Linux, a torch without MKL or libgomp) the experts take the generic
    grouped-GEMM path, with the same result; without madvise or a storage reference count the kernel still runs,
    on fresh memory."""
    block = _seeded_block(num_local_experts=4, num_experts_per_tok=2)
    x = torch.randn(32, block.hidden_dim, requires_grad=True)
    out, _ = block(x)
    assert "_RoutedSwiGLUBackward" in _routed_graph_nodes(out)
    grads = torch.autograd.grad(out.square().sum(), [x, block.experts.gate_up_proj])

    monkeypatch.setattr(cpu_experts, "_hooks", cpu_experts.PlatformHooks())  # nothing found
    assert not cpu_experts.available()
    generic, _ = block(x)
    names = _routed_graph_nodes(generic)
    assert "_RoutedSwiGLUBackward" not in names and "GroupedMmBackward0" in names
    torch.testing.assert_close(generic, out, atol=1e-6, rtol=1e-6)
    for got, want in zip(torch.autograd.grad(generic.square().sum(), [x, block.experts.gate_up_proj]), grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    hooks = cpu_experts._load_hooks()
    threads_only = cpu_experts.PlatformHooks(
        mkl_set_num_threads_local=hooks.mkl_set_num_threads_local, omp_set_num_threads=hooks.omp_set_num_threads
    )
    monkeypatch.setattr(cpu_experts, "_hooks", threads_only)
    if cpu_experts.available():
        block.experts.kept_memory.release()
        kernel_out, _ = block(x)
        assert "_RoutedSwiGLUBackward" in _routed_graph_nodes(kernel_out)
        kernel_out.square().sum().backward()
        assert block.experts.kept_memory._storages == {}  # no reference count: nothing kept
        torch.testing.assert_close(kernel_out, out, rtol=0, atol=0)


def test_decode_sizes_gather_expert_weights_without_sorting(monkeypatch):
    """Off an eager CPU (CUDA, traced graphs) a decode step's few tokens take the gathered-weights path (no sort, no
    counts, no host copy) and give the sorted path's result, also with top-2 routing and a foreign expert id."""
    block = _seeded_block(num_local_experts=8, num_experts_per_tok=2)
    x = torch.randn(1, block.hidden_dim)
    with torch.no_grad():
        with forced_path(block.experts, "grouped_mm"):
            sorted_out, _ = block(x)

        def no_sorting(*args, **kwargs):
            raise AssertionError("a decode step sorted its rows by expert")

        monkeypatch.setattr(moe, "_eager_cpu", lambda rows: False)
        monkeypatch.setattr(Llama4TextExperts, "_sorted", no_sorting)
        monkeypatch.setattr(torch.Tensor, "tolist", no_sorting)
        gathered, _ = block(x)
        rows = torch.randn(2, block.hidden_dim)
        foreign = block.experts(rows, torch.tensor([[1], [8]]), torch.ones(2, 1))
    torch.testing.assert_close(gathered, sorted_out, atol=1e-6, rtol=1e-6)
    assert (foreign[1] == 0).all() and (foreign[0] != 0).any()


def test_expert_path_choice():
    """Eager CPU inference: tiny experts run all experts on a few rows, larger ones sort even one row; training
    always sorts (the CPU kernel's backward); CUDA-like and traced calls gather a decode step's rows."""

    def path(rows: int, grad: bool = False, **shape) -> str:
        experts = Llama4TextExperts(_experts_config(**{"num_experts": 4, "top_k": 1, **shape}))
        x = torch.randn(rows, experts.hidden_size)
        with torch.set_grad_enabled(grad):
            return experts._path(x, rows)

    main = dict(hidden=128, intermediate=128)  # the main job's experts
    scout = dict(num_experts=16, hidden=256, intermediate=512)
    assert [path(n, **main) for n in (1, 8, 64)] == ["dense", "dense", "sorted"]
    assert path(8, grad=True, **main) == "sorted"
    assert path(1, **scout) == "sorted"
    with mock.patch.object(moe, "_eager_cpu", lambda rows: False):
        assert path(1, **scout) == "gather" and path(2, **scout) == "gather" and path(3, **scout) == "sorted"
