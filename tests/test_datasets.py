"""Indexed datasets in recipes: train/valid/test splits, samples packed across documents and
shuffled from the seed, cached index files, weighted blends, exact resume, DP slices,
validation and `python -m toolkit.evaluate`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.test_train import make_recipe
from toolkit.build import build_blend, build_data
from toolkit.config import RecipeError, recipe_from_dict
from toolkit.data.index_cache import IndexCache
from toolkit.data.indexed import IndexedDataset, IndexedDatasetWriter
from toolkit.data.packed import PackedSamples, parse_split, split_ranges
from toolkit.data.sampler import rank_samples
from toolkit.tokenizer import ByteTokenizer
from toolkit.train import train

EOD = ByteTokenizer().eod
SEQ = 16


def tagged_dataset(prefix, base: int, n_docs: int) -> list[list[int]]:
    """Documents whose tokens name them: doc i of the dataset at `base` holds base + 100 i + p."""
    rng = np.random.default_rng(base)
    docs = [[base + 100 * i + p for p in range(rng.integers(3, 30))] + [EOD] for i in range(n_docs)]
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return docs


def owner(tokens: np.ndarray) -> tuple[int, set[int]]:
    """(dataset base, the documents) a sample's tokens come from."""
    real = tokens[tokens != EOD].astype(int)
    return int(real[0]) // 10000 * 10000, set((real % 10000 // 100).tolist())


def blend_recipe(tmp_path, blend, split="80,20,0", **data):
    table = {
        "model": {"num_layers": 1, "hidden_size": 8, "seq_length": SEQ, "pattern": "-"},
        "data": {"blend": blend, "split": split, **data},
        "train": {"steps": 1, "seed": 11},
    }
    return recipe_from_dict(table)


def test_split_shares_round_like_the_reference():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("98,2") == pytest.approx([0.98, 0.02, 0.0])
    assert split_ranges(1000, parse_split("969,30,1")) == [range(969), range(969, 999),
                                                           range(999, 1000)]  # fmt: skip
    # 10 x 1/3 rounds to 3, 6, 9: the shortfall moves every boundary after the first.
    assert split_ranges(10, parse_split("1,1,1")) == [range(4), range(4, 7), range(7, 10)]
    for bad in ("a,b", "1,1,1,1", "0,0,0", "-1,2"):
        with pytest.raises(ValueError):
            parse_split(bad)


def test_samples_cut_the_shuffled_document_stream(tmp_path):
    docs = tagged_dataset(tmp_path / "a", 10000, 60)
    ds = IndexedDataset(tmp_path / "a")
    samples = PackedSamples(ds, range(60), SEQ, seed=3, cache=IndexCache(tmp_path / "c"))
    order, _, _ = samples.epoch_index(0)
    assert sorted(order.tolist()) == list(range(60))
    stream = np.concatenate([docs[i] for i in order])
    n = samples.samples_per_epoch
    assert n == (sum(map(len, docs)) - 1) // SEQ
    windows = {tuple(stream[j * SEQ : j * SEQ + SEQ + 1]) for j in range(n)}
    epoch0 = [tuple(samples.sample(k)) for k in range(n)]
    assert set(epoch0) == windows and len(set(epoch0)) == n  # every window once, shuffled
    assert epoch0 != sorted(windows, key=lambda w: stream.tolist().index(w[0]))
    assert any(EOD in w[:-1] for w in epoch0)  # samples run across document boundaries
    assert samples.epoch_index(1)[0].tolist() != order.tolist()  # a new order each epoch
    again = PackedSamples(ds, range(60), SEQ, seed=3, cache=IndexCache(tmp_path / "other"))
    assert [tuple(again.sample(k)) for k in range(n, n + 5)] == [
        tuple(samples.sample(k)) for k in range(n, n + 5)
    ]
    other_seed = PackedSamples(ds, range(60), SEQ, seed=4, cache=IndexCache(tmp_path / "o2"))
    assert [tuple(other_seed.sample(k)) for k in range(5)] != epoch0[:5]


def test_index_files_are_cached_next_to_the_data_and_reused(tmp_path, monkeypatch):
    tagged_dataset(tmp_path / "a", 10000, 60)
    recipe = blend_recipe(tmp_path, [str(tmp_path / "a")])
    first = build_blend(recipe, "train")
    want = [first.sample(k).tolist() for k in range(3 * first.samples_per_epoch)]  # 3 epochs
    cached = sorted(p.name for p in (tmp_path / "index_cache").iterdir())
    assert len(cached) == 9 and len(first.cache.built) == 9  # 3 files per epoch

    def no_rebuilding(*args):
        raise AssertionError("an index was rebuilt instead of read from the cache")

    for name in ("_documents", "_starts", "_shuffle"):
        monkeypatch.setattr(PackedSamples, name, no_rebuilding)
    second = build_blend(recipe, "train")
    assert [second.sample(k).tolist() for k in range(len(want))] == want
    assert second.cache.built == []
    elsewhere = blend_recipe(tmp_path, [str(tmp_path / "a")], cache_dir=str(tmp_path / "idx"))
    monkeypatch.undo()
    build_blend(elsewhere, "valid").sample(0)
    assert len(list((tmp_path / "idx").iterdir())) == 3


def test_blend_weights_and_splits(tmp_path):
    a = tagged_dataset(tmp_path / "a", 10000, 50)
    tagged_dataset(tmp_path / "b", 20000, 40)
    recipe = blend_recipe(tmp_path, [[0.7, str(tmp_path / "a")], [0.3, str(tmp_path / "b")]])
    train_samples, valid = build_data(recipe, ByteTokenizer())
    owners = [owner(train_samples.sample(k)) for k in range(10_000)]
    from_a = [base == 10000 for base, _ in owners]
    assert sum(from_a) == 7000 and abs(sum(from_a[:100]) - 70) <= 1  # exact, and evenly spread
    assert set().union(*(d for base, d in owners if base == 10000)) == set(range(40))  # 80%
    valid_owners = [owner(valid.sample(k)) for k in range(200)]
    assert {base for base, _ in valid_owners} == {10000, 20000}
    assert set().union(*(d for base, d in valid_owners if base == 10000)) <= set(range(40, 50))
    assert "blend of 0.7000 x" in train_samples.describe() and len(a) == 50


def test_valid_and_test_datasets_of_their_own_are_used_whole(tmp_path):
    """data.valid_blend / data.test_blend (Megatron's --valid-data-path, --test-data-path):
    validation and test read every document of their own datasets, training all of its blend's
    (split 100,0,0); the samples are those of the dataset used whole as a train split."""
    tagged_dataset(tmp_path / "a", 10000, 50)
    tagged_dataset(tmp_path / "v", 30000, 20)
    tagged_dataset(tmp_path / "t", 40000, 10)
    recipe = blend_recipe(
        tmp_path, [str(tmp_path / "a")], split="100,0,0",
        valid_blend=[str(tmp_path / "v")], test_blend=[[1.0, str(tmp_path / "t")]],
    )  # fmt: skip
    train_samples, valid = build_data(recipe, ByteTokenizer())
    train_docs = set().union(*(owner(train_samples.sample(k))[1] for k in range(2000)))
    assert train_docs == set(range(50))  # the whole training dataset
    valid_owners = [owner(valid.sample(k)) for k in range(500)]
    assert {base for base, _ in valid_owners} == {30000}
    assert set().union(*(d for _, d in valid_owners)) == set(range(20))  # every document
    test = build_blend(recipe, "test")
    assert {owner(test.sample(k))[0] for k in range(100)} == {40000}
    alone = blend_recipe(tmp_path, [str(tmp_path / "v")], split="100,0,0")
    assert all(
        (valid.sample(k) == build_data(alone, ByteTokenizer())[0].sample(k)).all()
        for k in range(50)
    )


def test_a_split_given_twice_is_refused(tmp_path):
    tagged_dataset(tmp_path / "a", 10000, 50)
    a = str(tmp_path / "a")
    with pytest.raises(RecipeError, match=r"data.valid_blend: and a valid share in data.split"):
        blend_recipe(tmp_path, [a], split="80,20,0", valid_blend=[a])
    with pytest.raises(RecipeError, match=r"data.test_blend: and a test share in data.split"):
        blend_recipe(tmp_path, [a], split="80,10,10", test_blend=[a])
    with pytest.raises(RecipeError, match=r"data.valid_blend\[0\]: weight must be"):
        blend_recipe(tmp_path, [a], split="100,0,0", valid_blend=[[-1, a]])
    missing = blend_recipe(tmp_path, [a], split="100,0,0", valid_blend=[str(tmp_path / "nope")])
    with pytest.raises(RecipeError, match=r"data.valid_blend\[0\]: .*nope\.idx: no such file"):
        build_data(missing, ByteTokenizer())


def test_each_dp_rank_gets_a_disjoint_slice_of_every_global_batch(tmp_path):
    tagged_dataset(tmp_path / "a", 10000, 50)
    tagged_dataset(tmp_path / "b", 20000, 40)
    recipe = blend_recipe(tmp_path, [[1, str(tmp_path / "a")], [1, str(tmp_path / "b")]])
    samples, _ = build_data(recipe, ByteTokenizer())
    for consumed in (0, 8, 96):
        slices = [rank_samples(consumed, 8, r, 4) for r in range(4)]
        assert sorted(k for s in slices for k in s) == list(range(consumed, consumed + 8))
        rows = [tuple(samples.sample(k)) for s in slices for k in s]
        assert len(set(rows)) == 8  # different data on every rank


def test_recipe_errors_name_the_key(tmp_path):
    tagged_dataset(tmp_path / "a", 10000, 50)
    a = str(tmp_path / "a")
    cases = [
        ([[0, a], [0.0, a]], {}, r"data.blend: weights must sum to a positive number"),
        ([[0.5, a, 3]], {}, r"data.blend\[0\]: expected \[weight, \"prefix\"\]"),
        ([[-1, a], [2, a]], {}, r"data.blend\[0\]: weight must be a finite number >= 0"),
        ([a], {"split": "1,x"}, r"data.split: '1,x' is not a list of numbers"),
        ([a], {"source": "x.txt"}, r"data.source: set either data.source or data.blend"),
    ]
    for blend, data, message in cases:
        with pytest.raises(RecipeError, match=message):
            blend_recipe(tmp_path, blend, **data)
    missing = blend_recipe(tmp_path, [[1, a], [1, str(tmp_path / "b")]])
    with pytest.raises(RecipeError, match=r"data.blend\[1\]: .*b\.idx: no such file"):
        build_data(missing, ByteTokenizer())
    with pytest.raises(RecipeError, match=r"train.eval_interval: needs a validation split"):
        recipe_from_dict(
            {
                "model": {"num_layers": 1, "hidden_size": 8, "seq_length": SEQ, "pattern": "-"},
                "data": {"blend": [a], "split": "1,0,0"},
                "train": {"steps": 1, "eval_interval": 1},
            }
        )


# ---------------------------------------------------------------------------------------------
# Training on a blend: exact resume, validation, and the standalone evaluation.


def training_recipe(tmp_path, name, **train_overrides):
    data = tmp_path / "data"
    if not (data / "x.idx").exists():
        for prefix, text in (("x", "0123456789"), ("y", "abcdefghij")):
            with IndexedDatasetWriter(data / prefix, np.uint16) as w:
                for i in range(120):
                    w.add_document(list((text * (3 + i % 5)).encode()) + [EOD])
    recipe = make_recipe(tmp_path / name, "unused", **train_overrides)
    recipe.data.source = "stdlib"
    recipe.data.blend = [[0.7, str(data / "x")], [0.3, str(data / "y")]]
    recipe.data.split = "90,10,0"
    recipe.train.eval_interval, recipe.train.eval_batches = 3, 2
    return recipe


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend")
    recipe = training_recipe(tmp, "full", steps=6)
    return tmp, recipe, train(recipe)


def test_a_resumed_run_sees_the_samples_an_uninterrupted_run_sees(full_run):
    tmp, _, full = full_run
    first = train(training_recipe(tmp, "resumed", steps=3, decay_steps=6))
    resumed = train(training_recipe(tmp, "resumed", steps=6))
    assert min(resumed.losses) == 4  # it resumed (from 12 consumed samples)
    for step in range(1, 7):
        assert (first.losses | resumed.losses)[step] == full.losses[step], step


def test_validation_is_logged_and_evaluate_reproduces_it(full_run):
    tmp, recipe, result = full_run
    acc = EventAccumulator(recipe.logging.dir)
    acc.Reload()
    valid = {e.step: e.value for e in acc.Scalars("valid/loss")}
    assert sorted(valid) == [3, 6] and valid[6] < valid[3]
    ppl = {e.step: e.value for e in acc.Scalars("valid/perplexity")}
    assert ppl[6] == pytest.approx(np.exp(valid[6]), rel=1e-5)
    toml = tmp / "eval.toml"
    blend = ", ".join(f'[{w}, "{p}"]' for w, p in recipe.data.blend)
    model = "\n".join(
        f"{k} = {json.dumps(v)}"  # TOML's strings, numbers, booleans and arrays
        for k, v in recipe.to_dict()["model"].items()
        if v is not None
    )
    toml.write_text(
        f'[model]\n{model}\n[data]\nblend = [{blend}]\nsplit = "90,10,0"\n'
        "[train]\nsteps = 1\nseed = 7\nmicro_batch_size = 2\nglobal_batch_size = 2\n"
        'eval_batches = 2\nprecision = "fp32"\n'
    )
    cmd = [sys.executable, "-m", "toolkit.evaluate", "--recipe", str(toml)]
    done = subprocess.run(
        cmd + ["--checkpoint", result.checkpoint, "--device", "cpu"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    loss = float(done.stdout.split()[2])
    assert loss == pytest.approx(valid[6], abs=1e-4) and "valid loss" in done.stdout
    bad = subprocess.run(cmd + ["--checkpoint", result.checkpoint, "--split", "test"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "data.blend[0]:" in bad.stderr and "test split" in bad.stderr


def test_eod_mask_loss_leaves_out_the_label_after_each_end_of_document(tmp_path):
    """data.eod_mask_loss (Megatron's --eod-mask-loss): where the input is an end of document,
    the label (the next document's first token) is IGNORE_INDEX, in the training, validation
    and evaluation samples alike; every other label and every input is unchanged."""
    from toolkit.evaluate import evaluation_samples
    from toolkit.loss import IGNORE_INDEX

    tagged_dataset(tmp_path / "a", 10000, 50)
    plain = blend_recipe(tmp_path, [str(tmp_path / "a")])
    masked = blend_recipe(tmp_path, [str(tmp_path / "a")], eod_mask_loss=True)
    tokenizer = ByteTokenizer()
    pairs = [
        *zip(build_data(plain, tokenizer), build_data(masked, tokenizer)),
        (build_blend(plain, "valid"), evaluation_samples(masked, tokenizer, "valid")),
    ]
    for without, with_mask in pairs:
        inputs, labels = without.batch(3, 8)
        got_inputs, got_labels = with_mask.batch(3, 8)
        at_eod = inputs == EOD
        assert at_eod.sum() >= 4 and (labels != IGNORE_INDEX).all()
        assert torch.equal(got_inputs, inputs)
        assert (got_labels[at_eod] == IGNORE_INDEX).all()
        assert torch.equal(got_labels[~at_eod], labels[~at_eod])


def test_eod_mask_loss_trains_on_the_masked_loss(tmp_path):
    """A run with data.eod_mask_loss logs, at its first step, the mean loss of its first batch
    over the positions whose input is not an end of document (computed here from the same
    starting weights, through checkpoint.init_from); without the key, the loss over all."""
    from toolkit.build import model_from_checkpoint

    tokenizer = ByteTokenizer()
    with IndexedDatasetWriter(tmp_path / "docs", np.uint16) as w:
        for i in range(300):
            w.add_document(tokenizer.encode(f"doc {i}: " + "abcdefghij"[: 1 + i % 9]) + [EOD])

    def recipe(name: str, **data):
        table = make_recipe(tmp_path / name, "unused", steps=1, micro_batch_size=4).to_dict()
        table["data"] = {"blend": [str(tmp_path / "docs")], "split": "100,0,0", **data}
        return recipe_from_dict(table)

    train(recipe("base"))
    base = str(tmp_path / "base" / "ckpt")
    losses = {}
    for mask in (True, False):
        run = recipe(f"mask_{mask}", eod_mask_loss=mask)
        run.checkpoint.init_from = base
        losses[mask] = train(run).losses[1]
    model, _, _ = model_from_checkpoint(base)
    inputs, labels = build_data(run, tokenizer)[0].batch(0, 4)
    with torch.no_grad():
        logits = model(inputs)[..., : model.vocab_size].flatten(0, 1).float()
    labels, keep = labels.flatten(), inputs.flatten() != EOD
    assert 0 < (~keep).sum() < keep.sum()
    cross_entropy = torch.nn.functional.cross_entropy
    assert losses[True] == pytest.approx(cross_entropy(logits[keep], labels[keep]).item(), rel=1e-5)
    assert losses[False] == pytest.approx(cross_entropy(logits, labels).item(), rel=1e-5)
    assert losses[True] != pytest.approx(losses[False], rel=1e-3)
