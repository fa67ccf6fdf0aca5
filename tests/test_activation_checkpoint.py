"""Activation checkpointing and per-block torch.compile, applied from outside the model."""

import pytest
import torch

from tests.conftest import tiny_model_config
from toolkit.activation_checkpoint import apply_ac, apply_compile, selected_kinds
from toolkit.model import HybridLM


def build(seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(tiny_model_config(), vocab_size=100)


def loss_and_grads(model: HybridLM, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def count_mixer_calls(model: HybridLM) -> dict[int, int]:
    """Mixer forward calls per block (pre-hooks: the recomputation stops early, as soon as the
    tensors the backward needs exist again, so a mixer's forward may not return)."""
    calls = dict.fromkeys(range(len(model.layers)), 0)
    for i, block in enumerate(model.layers):
        block.mixer.register_forward_pre_hook(
            lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1)
        )
    return calls


@pytest.mark.parametrize("spec", ["full", ["mamba"], ["attention", "mlp"]])
def test_same_loss_and_gradients_and_recomputes(spec):
    """Recomputation replays the same fp32 ops on the same inputs: the loss and every gradient
    must equal the plain run's (tolerance 1e-6 relative, 1e-7 absolute; bitwise in practice).
    Each checkpointed block's mixer runs twice per step (forward, then again in backward), the
    others once: the test fails if the wrapping is removed."""
    tokens = torch.randint(0, 100, (2, 33))
    plain, wrapped = build(), build()
    loss_ref, grads_ref = loss_and_grads(plain, tokens)
    chosen = apply_ac(wrapped, spec)
    calls = count_mixer_calls(wrapped)
    loss, grads = loss_and_grads(wrapped, tokens)

    kinds = selected_kinds(spec)
    expected = [i for i, b in enumerate(wrapped.layers) if b.kind in kinds]
    assert chosen == expected and chosen
    assert calls == {i: 2 if i in chosen else 1 for i in calls}
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointing_saves_fewer_tensors_for_backward():
    """With every block checkpointed, autograd keeps only the blocks' inputs (and the output
    layer's): far fewer saved tensors than the plain forward keeps."""

    def saved_count(model: HybridLM) -> int:
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        tokens = torch.randint(0, 100, (2, 32))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens)
        return count[0]

    plain, wrapped = build(), build()
    apply_ac(wrapped, "full")
    assert saved_count(wrapped) < saved_count(plain) / 3


def test_no_recomputation_without_grad_or_with_decode_state():
    model = build()
    apply_ac(model, "full")
    calls = count_mixer_calls(model)
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 8)))
    assert set(calls.values()) == {1}
    states = model.allocate_states(1, 16)
    model(torch.randint(0, 100, (1, 4)), states)  # prefill through the decode path
    assert set(calls.values()) == {2}


def test_names_and_state_dict_unchanged():
    plain, wrapped = build(), build()
    apply_ac(wrapped, "full")
    apply_compile(wrapped, ["mlp"])  # compiles lazily: nothing is traced here
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_none_and_false_change_nothing():
    model = build()
    assert apply_ac(model, "none") == [] and apply_compile(model, False) == []
    assert all("forward" not in vars(b) for b in model.layers)


def inductor_available() -> str | None:
    """Why torch.compile cannot run here (None if it can)."""
    try:
        fn = torch.compile(lambda x: x * 2 + 1)
        fn(torch.ones(4))
    except Exception as e:  # noqa: BLE001 - any failure means no compiler toolchain
        return f"torch.compile (inductor) does not work on this CPU: {type(e).__name__}: {e}"
    return None


# The whole-model region takes minutes to compile on the 2-core VM: make test-long.
@pytest.mark.parametrize("scope", ["block", pytest.param("model", marks=pytest.mark.long)])
def test_compiled_blocks_train_to_the_same_losses(scope):
    """Three SGD steps of the tiny model with every block compiled (checkpointed too, the
    combination the GPU runs), or the whole model as one region, against eager: losses within
    1e-4 relative (inductor fuses and reorders fp32 reductions)."""
    reason = inductor_available()
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    tokens = torch.randint(0, 100, (3, 2, 33))

    def run(model: HybridLM) -> list[float]:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for batch in tokens:
            loss, _ = loss_and_grads(model, batch)
            opt.step()
            losses.append(loss.item())
        return losses

    eager, compiled = build(), build()
    apply_ac(compiled, "full")
    chosen = apply_compile(compiled, True, scope=scope)
    assert chosen == list(range(len(compiled.layers)))
    # One region: the model itself compiled, no block on its own; or each block.
    assert (compiled._compiled_call_impl is not None) == (scope == "model")
    assert all((b._compiled_call_impl is not None) == (scope == "block") for b in compiled.layers)
    ref, got = run(eager), run(compiled)
    assert ref[-1] < ref[0]
    assert got == pytest.approx(ref, rel=1e-4)


def test_the_whole_model_scope_is_refused_where_it_cannot_run():
    from toolkit.config import RecipeError, load_recipe

    recipe = "recipes/tiny_hybrid.toml"
    model_scope = 'train.compile_scope="model"'
    with pytest.raises(RecipeError, match="train.compile_scope: 'model' compiles every block"):
        load_recipe(recipe, [model_scope, 'train.compile=["mlp"]'])
    for layout in ("parallel.pp=2", "parallel.tp=2"):
        with pytest.raises(RecipeError, match="train.compile_scope: 'model' runs at TP=1 and PP=1"):
            load_recipe(recipe, [model_scope, "train.compile=true", layout])
    cfg = load_recipe(recipe, [model_scope, "train.compile=true"]).train
    assert (cfg.compile_scope, cfg.compile_mode) == ("model", "default")
    with pytest.raises(RecipeError, match="train.compile_mode"):
        load_recipe(recipe, ['train.compile_mode="fastest"'])
    # A mode with nothing compiled would tune nothing: refused, naming the key it needs.
    tuned = 'train.compile_mode="coordinate-descent-tuning"'
    with pytest.raises(RecipeError, match="train.compile_mode: 'coordinate-descent-tuning' tunes"):
        load_recipe(recipe, [tuned])
    assert load_recipe(recipe, [tuned, 'train.compile=["mlp"]']).train.compile == ["mlp"]


def test_coordinate_descent_tuning_compiles_the_blocks_with_inductors_option():
    """train.compile_mode='coordinate-descent-tuning' is no torch.compile mode but an Inductor
    option: the blocks compile with it (torch.compile refuses an unknown mode or option) and
    give eager's loss."""
    from toolkit.activation_checkpoint import compile_options
    from toolkit.config import load_recipe

    reason = inductor_available()
    if reason:
        pytest.skip(reason)
    mode = "coordinate-descent-tuning"
    cfg = load_recipe(
        "recipes/tiny_hybrid.toml", [f'train.compile_mode="{mode}"', "train.compile=true"]
    ).train
    assert cfg.compile_mode == mode
    assert compile_options(mode) == {"options": {"coordinate_descent_tuning": True}}
    assert compile_options("default") == {"mode": None}
    torch._dynamo.reset()
    eager, compiled = build(), build()
    assert apply_compile(compiled, ["mlp"], mode=mode) != []
    tokens = torch.randint(0, 100, (2, 33))
    want, _ = loss_and_grads(eager, tokens)
    got, _ = loss_and_grads(compiled, tokens)
    assert float(got) == pytest.approx(float(want), rel=1e-4)
