"""train.adamw_kernel = "triton" (toolkit/triton_adamw.py): torch's AdamW, clipped in place, within
fp32 rounding, with the clip coefficient applied as gradients are read (and the gradients left
as they were), torch's state and checkpoints, and the eager reference for what the kernel cannot
address. On a CPU the kernel runs under Triton's interpreter in a subprocess (TRITON_INTERPRET
must be set before Triton compiles anything); on a GPU against torch's fused AdamW."""

import pytest
import torch

import toolkit.triton_adamw as module
from tests.conftest import load_benchmark
from tests.test_step_graph import interpret
from toolkit import optim
from toolkit.config import RecipeError, TrainConfig, load_recipe
from toolkit.optim import build_optimizer, gpu_adamw_kernel
from toolkit.triton_adamw import BLOCK, TritonAdamW, _block_tables

CUDA = torch.cuda.is_available()

# Sizes across the kernel's blocks: two blocks and a remainder, one exact block, tiny ones.
SHAPES = [(3, BLOCK - 5), (BLOCK,), (7,), (1,), (33, 17)]

# Shared by the interpreter's subprocess and the GPU test: both optimizers from the same weights,
# the same gradients, the clip active on odd steps (coefficient < 1) and a moving lr.
RACE = """
import torch
from toolkit.triton_adamw import TritonAdamW


def groups(params):
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]


def race(shapes, device, reference_kind, steps=5):
    torch.manual_seed(0)
    ours = [torch.randn(s, device=device).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt = TritonAdamW(groups(ours), **kw)
    ref = torch.optim.AdamW(groups(theirs), **kw, **{reference_kind: True})
    for step in range(steps):
        grads = [torch.randn(s, device=device) for s in shapes]
        coef = torch.tensor(0.37 if step % 2 else 1.0, dtype=torch.float64, device=device)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        torch._foreach_mul_([q.grad for q in theirs], coef.float())  # clipped in place
        opt.step(grad_scale=coef)
        ref.step()
        for p, g in zip(ours, grads):
            assert torch.equal(p.grad, g), "the gradients are read, not written"
        for o in (opt, ref):
            for group in o.param_groups:
                group["lr"] *= 0.7
    return ours, theirs, opt, ref


def worst(ours, theirs):
    pairs = [(p.detach(), q.detach()) for p, q in zip(ours, theirs)]
    return max(float(((p - q).abs() / (q.abs() + 1e-3)).max()) for p, q in pairs)
"""

INTERPRETED = (
    RACE
    + """
import toolkit.triton_adamw as module
from toolkit.triton_adamw import BLOCK

def refuse(*args, **kwargs):
    raise AssertionError("the eager reference ran: the kernel did not take these tensors")

SHAPES = [(3, BLOCK - 5), (BLOCK,), (7,), (1,), (33, 17)]
eager = module.adamw_update_
module.adamw_update_ = refuse
ours, theirs, opt, ref = race(SHAPES, "cpu", "foreach")
# Written through their addresses, yet seen as changed, once per step (as torch's in-place ops
# leave them).
assert all(p._version == 5 for p in ours), [p._version for p in ours]
assert all(opt.state[p]["exp_avg"]._version == 5 for p in ours)
assert worst(ours, theirs) < 1e-5, worst(ours, theirs)
for p, q in zip(ours, theirs):
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-6), key
    assert float(opt.state[p]["step"]) == 5.0

# The bf16 copies the update writes (train.bf16_weight_cache): torch's cast bit for bit, ties
# to even, infinities, subnormals, signed zeros and NaN (lr 0: the parameters stay as they are).
from toolkit.bf16_weight_cache import UpdatedCasts
special = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), float("inf"), -float("inf"), 1e-40, -0.0,
           3.4e38, 1 / 3, float("nan")]
values = torch.cat([torch.tensor(special), torch.randn(BLOCK + 3)]).requires_grad_()
values.grad = torch.zeros_like(values)
casts = UpdatedCasts()
copy, cast_now = casts.take(values, torch.bfloat16)
assert cast_now
copy.zero_()
copier = TritonAdamW([values], lr=0.0, weight_decay=0.0)
copier.write_casts(casts)
copier.step()
numbers = ~values.isnan()
want_bits = values.detach().to(torch.bfloat16).view(torch.int16)
assert torch.equal(copy.view(torch.int16)[numbers], want_bits[numbers])
assert copy[~numbers].isnan().all()
taken, cast_now = casts.take(values, torch.bfloat16)
assert taken is copy and not cast_now  # as the update left it: not cast again
with torch.no_grad():
    values.mul_(2)
assert casts.take(values, torch.bfloat16)[1]  # changed in place: cast again

# The benchmarks' variants: small blocks, three to a program (whole spans and a tensor's last,
# partial one), evict-first accesses, approximate division (exact in the interpreter): the same
# bits.
module.BLOCK, module.SPAN, module.STREAM, module.EXACT = 256, 3, True, False
spanned, _, _, _ = race(SHAPES, "cpu", "foreach")
assert all(torch.equal(p, q) for p, q in zip(ours, spanned)), "a span's update differs"
module.BLOCK, module.SPAN, module.STREAM, module.EXACT = BLOCK, 1, False, True

# Its checkpoint is torch's AdamW's: either loads the other's and steps the same.
swapped = torch.optim.AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True)
swapped.load_state_dict(opt.state_dict())
back = TritonAdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
back.load_state_dict(ref.state_dict())
back.state[theirs[0]]["step"] = 5  # a step count restored as a number is taken too
back.state[theirs[1]]["step"] = torch.tensor(5.0, dtype=torch.float64)
for p, q in zip(ours, theirs):
    g = torch.randn(p.shape)
    p.grad, q.grad = g.clone(), g.clone()
swapped.step()
back.step()
assert worst(ours, theirs) < 1e-5, worst(ours, theirs)

# A non-contiguous parameter, a bf16 one and one starting off a 16-byte boundary take the
# eager reference, beside the kernel's.
module.adamw_update_ = eager
odd = [torch.randn(5, 3).t().contiguous().t().requires_grad_(),
       torch.randn(6, dtype=torch.bfloat16).requires_grad_(), torch.randn(10)[1:].requires_grad_(),
       torch.randn(9).requires_grad_()]
assert [module.kernel_addressable(p) for p in odd] == [False, False, False, True]
copies = [p.detach().clone().requires_grad_() for p in odd]
opt = TritonAdamW([{"params": odd, "weight_decay": 0.1}], lr=1e-2)
ref = torch.optim.AdamW([{"params": copies, "weight_decay": 0.1}], lr=1e-2, foreach=False)
for _ in range(2):
    for p, q in zip(odd, copies):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
for p, q in zip(odd, copies):
    assert torch.allclose(p.float(), q.float(), rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-5)
print("triton adamw agrees")
"""
)


def test_kernel_is_torchs_adamw_clipped_in_place_under_the_interpreter():
    """The kernel (the eager reference made to fail) against torch's foreach AdamW with the
    clip applied in place first, over 5 steps of two groups, a moving lr and sizes across its
    blocks: parameters and moments within 1e-5 relative; the gradients untouched; either
    optimizer continues from the other's state_dict; the tensors it writes have their version
    counters moved; bf16, non-contiguous and unaligned parameters take the eager reference
    beside the kernel."""
    interpret(INTERPRETED, "triton adamw agrees", timeout=300)


@pytest.mark.parametrize("span", [1, 3])
def test_block_tables_cover_every_element_once(monkeypatch, span):
    """Each program's SPAN blocks of one tensor: every element in exactly one program's range,
    no program without elements."""
    monkeypatch.setattr(module, "SPAN", span)
    numels = [3 * BLOCK + 1, BLOCK, 1, 5, 7 * BLOCK]
    tensor, start = _block_tables(numels, torch.device("cpu"))
    width = BLOCK * span
    covered = [(int(t), int(s) + i) for t, s in zip(tensor, start) for i in range(width)]
    want = {(t, i) for t, n in enumerate(numels) for i in range(n)}
    assert want <= set(covered) and len(set(covered)) == len(covered)
    assert len(tensor) == sum(-(-n // width) for n in numels)
    assert all(int(s) < numels[int(t)] for t, s in zip(tensor, start))


def test_without_the_interpreter_a_cpu_update_is_the_eager_reference(monkeypatch, caplog):
    """CPU tensors with no interpreter: every parameter through flat_adamw's ops, torch's
    foreach AdamW clipped in place within fp32 rounding, and one log line saying so."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    namespace: dict = {}
    exec(RACE, namespace)
    with caplog.at_level("WARNING", logger="toolkit.triton_adamw"):
        ours, theirs, _, _ = namespace["race"](SHAPES, "cpu", "foreach", steps=3)
    assert namespace["worst"](ours, theirs) < 1e-5
    told = [r.getMessage() for r in caplog.records if "eager update" in r.getMessage()]
    assert len(told) == 1 and f"5 of {len(SHAPES)} parameters" in told[0]


def test_the_key_chooses_the_gpu_update_and_is_checked():
    """CPUs take torch's foreach AdamW whatever the key; a wrong value and the key beside
    train.flat_optimizer are refused naming it."""
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, TrainConfig(steps=1, adamw_kernel="triton"))
    assert type(opt) is torch.optim.AdamW and opt.defaults["foreach"]
    with pytest.raises(RecipeError, match="train.adamw_kernel"):
        load_recipe("recipes/tiny_hybrid.toml", ['train.adamw_kernel="apex"'])
    with pytest.raises(RecipeError, match="train.adamw_kernel"):
        load_recipe(
            "recipes/tiny_hybrid.toml",
            ['train.adamw_kernel="triton"', "train.flat_optimizer=true"],
        )
    assert (
        load_recipe("recipes/tiny_hybrid.toml", ['train.adamw_kernel="triton"']).train.adamw_kernel
        == "triton"
    )
    # The default leaves train.flat_optimizer free and picks the kernel where Triton imports.
    flat = load_recipe("recipes/tiny_hybrid.toml", ["train.flat_optimizer=true"]).train
    assert flat.adamw_kernel == "auto" and flat.flat_optimizer
    assert gpu_adamw_kernel(TrainConfig(steps=1)) == "triton"
    assert gpu_adamw_kernel(TrainConfig(steps=1, adamw_kernel="torch")) == "torch"


def test_without_triton_auto_takes_torchs_and_triton_is_refused(monkeypatch):
    monkeypatch.setattr(optim, "triton_imports", lambda: False)
    assert gpu_adamw_kernel(TrainConfig(steps=1)) == "torch"
    with pytest.raises(ValueError, match="needs Triton"):
        gpu_adamw_kernel(TrainConfig(steps=1, adamw_kernel="triton"))


def test_amsgrad_is_refused():
    with pytest.raises(NotImplementedError, match="amsgrad"):
        TritonAdamW([torch.nn.Parameter(torch.zeros(2))], amsgrad=True)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_kernel_is_torchs_fused_adamw_clipped_in_place_on_gpu():
    pytest.importorskip("triton")
    namespace: dict = {}
    exec(RACE, namespace)
    ours, theirs, opt, _ = namespace["race"](SHAPES + [(4096, 1024)], "cuda", "fused")
    assert namespace["worst"](ours, theirs) < 1e-5
    assert isinstance(
        build_optimizer(torch.nn.Linear(4, 4).cuda(), TrainConfig(steps=1)), TritonAdamW
    )  # fmt: skip (the default, 'auto')


@pytest.mark.parametrize(
    "block, warps, span, eviction, casts, sparse",
    [(BLOCK, module.NUM_WARPS, 1, "", False, False), (4096, 8, 1, "", False, False),
     (1024, 8, 4, "", False, False), (2048, 8, 2, "evict_first", False, False),
     (BLOCK, module.NUM_WARPS, 1, "", True, False), (2048, 8, 2, "", True, False),
     (BLOCK, module.NUM_WARPS, 1, "", True, True), (2048, 8, 2, "", False, True)],
)  # fmt: skip
def test_whole_blocks_load_and_store_16_bytes_at_a_time(block, warps, span, eviction, casts,
                                                        sparse):  # fmt: skip
    """The kernel compiled ahead of time for an H100/H200 (sm_90, no GPU needed): whole blocks
    move 4 floats per instruction (at 4096 a block and 8 warps, 16 per thread: 4 loads from each
    of the 4 arrays, 4 stores to each of the 3 written), in each of a program's SPAN blocks, with
    the next block's loads issued before a block is stored; evict-first when asked; with bf16
    copies to write, 4 of them per store, from the registers that hold the 4 floats, and no
    shared memory. Without the alignment hints on the loaded addresses and the unmasked path,
    every access was 4 bytes wide and the update ran at ~55% of the HBM bandwidth (16.1 ms
    against torch's 14.4 at the 800M on an H100, 2026-12-05); with the copies stored 8 at a time
    (16 bytes) the values went through shared memory in every program to regroup them, and the
    update took 30.2 ms against 19.7 at the 8B Mamba-2 widths on an H200 (2026-12-06). With
    row-sparse gradients among the tensors (HAS_SPARSE) the same: only such a tensor's gradient
    is gathered a float at a time, in a branch of its own."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"addresses": "*i64", "numels": "*i64", "scalars": "*fp32",
                 "block_tensor": "*i32", "block_start": "*i64", "grad_scale": "*fp32", "n": "i32",
                 "HAS_SCALE": "constexpr", "HAS_CASTS": "constexpr", "HAS_SPARSE": "constexpr",
                 "BLOCK": "constexpr",
                 "SCALARS": "constexpr", "SPAN": "constexpr", "EVICTION": "constexpr",
                 "EXACT": "constexpr"}  # fmt: skip
    constexprs = {"HAS_SCALE": True, "HAS_CASTS": casts, "HAS_SPARSE": sparse, "BLOCK": block,
                  "SCALARS": module.SCALARS, "SPAN": span, "EVICTION": eviction, "EXACT": True}  # fmt: skip
    from triton.backends import backends

    if "nvidia" not in backends:  # only a Triton built without its CUDA backend is excused
        pytest.skip("Triton has no CUDA backend here")

    def compiled(constexprs: dict):
        source = ASTSource(fn=module._adamw_kernel, signature=signature, constexprs=constexprs)
        target, options = GPUTarget("cuda", 90, 32), {"num_warps": warps}
        return triton.compile(source, target=target, options=options)

    ptx = compiled(constexprs)
    if sparse:  # the gather is there, beside the dense path: scalar loads the dense one lacks
        dense = compiled(constexprs | {"HAS_SPARSE": False})

        def scalar_loads(kernel) -> int:
            lines = kernel.asm["ptx"].splitlines()
            return sum(x.lstrip().startswith("ld.global") and ".v" not in x for x in lines)

        assert scalar_loads(ptx) >= scalar_loads(dense) + 2  # each block's slot and gradient
    accesses = [
        "L" if line.lstrip().startswith("ld.global") else "S"
        for line in ptx.asm["ptx"].splitlines()
        if line.lstrip().startswith(("ld.global", "st.global")) and ".v4.b32" in line
    ]
    per_block = block // (warps * 32) // 4  # 16-byte accesses per thread and array
    assert accesses.count("L") == 4 * per_block * span
    assert accesses.count("S") == 3 * per_block * span
    copies = [line for line in ptx.asm["ptx"].splitlines() if "st.global.v2.b32" in line]
    assert len(copies) == casts * per_block * span  # 4 bf16 (8 bytes) per float4 loaded
    assert ptx.metadata.shared == 0 and "bar.sync" not in ptx.asm["ptx"]
    # Block i + 1's loads come before block i's stores: loads, then (stores, loads) pairs.
    first_store = accesses.index("S")
    assert first_store == 4 * per_block * min(span, 2)
    hinted = [line for line in ptx.asm["ptx"].splitlines() if "evict_first" in line]
    assert bool(hinted) == bool(eviction)


def test_the_benchmarks_kernel_variants_name_its_shape(monkeypatch):
    """benchmarks/optimizer_step.py's triton_bBLOCK_wWARPS[_xSPAN][_stream][_approx]: the globals each
    variant sets, the defaults for the plain names, and a bad shape refused naming the part."""
    import argparse

    bench = load_benchmark("optimizer_step", monkeypatch)
    assert bench.variant("triton")[1] == (BLOCK, module.NUM_WARPS, 1, False, True)
    assert bench.variant("triton_b8192_w16")[1] == (8192, 16, 1, False, True)
    assert bench.variant("triton_b1024_w8_x4_stream") == (bench.VARIANTS["triton"],
                                                          (1024, 8, 4, True, True))  # fmt: skip
    assert bench.variant("triton_b2048_w4_stream")[1] == (2048, 4, 1, True, True)
    assert bench.variant("triton_b512_w4_approx")[1] == (512, 4, 1, False, False)
    for bad, part in [("triton_b1000_w8", "BLOCK"), ("triton_b1024_w3", "WARPS"),
                      ("triton_b1024_w8_x17", "SPAN")]:  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=part):
            bench.variant_list(f"torch,{bad}")
    with pytest.raises(argparse.ArgumentTypeError, match="triton_bBLOCK_wWARPS"):
        bench.variant_list("torch,triton_b1024")


STAGED = """
import torch
from tests.kernel_cases import refused
from toolkit.bf16_weight_cache import UpdatedCasts
from toolkit.triton_adamw import TritonAdamW

params = [torch.nn.Parameter(torch.randn(4, 8)) for _ in range(3)]
opt = TritonAdamW(params, lr=1e-3)
casts = UpdatedCasts()
opt.write_casts(casts)
casts.take(params[0], torch.bfloat16)  # one copy, made before the capture
for p in params:
    p.grad = torch.randn_like(p)
opt.step()
opt.capture()
versions = [p._version for p in params]
for steps in (2, 3):
    opt.stage()  # the count on the host; the state's tensors and versions after the step
    assert all(float(opt.state[p]["step"]) == steps - 1 for p in params)
    opt.step()  # the captured step, run eagerly here
    opt.settle()
    assert all(float(opt.state[p]["step"]) == steps for p in params)
    assert all(p._version > v for p, v in zip(params, versions))
    versions = [p._version for p in params]
opt.unstage()  # a skipped update: the count taken back, on the host too
assert all(float(opt.state[p]["step"]) == 2 for p in params)
opt.stage()
want = torch.tensor(opt._rows(opt._graph["entries"], [3.0])[0], dtype=torch.float32)
assert torch.equal(opt._graph["scalars"][0], want)  # step 3's bias corrections again
opt.step()
opt.settle()
# A bf16 copy made since the capture, or another holder of them: the captured step would write
# the old ones, and is refused
casts.take(params[1], torch.bfloat16)
refused(opt.stage, "moved since capture")
opt.capture()
opt.stage(); opt.step(); opt.settle()
opt.write_casts(UpdatedCasts())
refused(opt.stage, "moved since capture")
print("staged steps agree")
"""


def test_stage_and_settle_count_and_refuse_under_the_interpreter():
    """A captured step's host work split around the replay: stage() counts the step on the
    host and writes its scalars, settle() counts it in the state's tensors and moves the
    version counters; unstage() takes the count back in both; a bf16 copy made since the
    capture, or another holder of the copies, is refused before a replay could write the old
    ones."""
    interpret(STAGED, "staged steps agree", timeout=300)
