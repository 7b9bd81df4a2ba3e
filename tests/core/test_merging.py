"""lichtenberg.core.merging against hand computations on small tensors."""

import io
import math

import pytest
import torch

from lichtenberg.core.merging import METHODS, check_compatible, greedy_soup, merge

T = torch.tensor


def state(w, b=0.0, n=0):
    """A tiny module state: a weight, a bias and an integer counter."""
    return {"w": T(w, dtype=torch.float32), "b": T(b, dtype=torch.float32), "n": T(n)}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# -- the methods, by hand ---------------------------------------------------------------------------

def test_methods_tuple():
    assert METHODS == ("uniform", "greedy", "model_stock", "wise_ft", "task_arithmetic", "ties", "dare")


def test_uniform_is_the_mean_and_keeps_dtype():
    a = {"w": T([1.0, 2.0], dtype=torch.float16), "d": T([1.0], dtype=torch.float64)}
    b = {"w": T([2.0, 5.0], dtype=torch.float16), "d": T([2.0], dtype=torch.float64)}
    c = {"w": T([3.0, 5.0], dtype=torch.float16), "d": T([6.0], dtype=torch.float64)}
    out = merge([a, b, c])
    assert out["w"].dtype == torch.float16 and out["d"].dtype == torch.float64
    assert out["w"].tolist() == [2.0, 4.0] and out["d"].tolist() == [3.0]


def test_uniform_of_identical_states_is_the_identity():
    s = {"w": torch.randn(5, 3), "v": torch.randn(7)}
    for k in (2, 4):  # a mean of 2^j equal floats is exact
        out = merge([s] * k)
        assert all(torch.equal(out[n], s[n]) and out[n] is not s[n] for n in s)
    torch.testing.assert_close(merge([s] * 3), s, rtol=0, atol=1e-6)


def test_wise_ft_interpolates_between_base_and_fine_tuned():
    base, ft = state([0.0, 4.0], 1.0), state([2.0, 0.0], 3.0)
    out = merge([ft], "wise_ft", base, alpha=0.25)
    assert out["w"].tolist() == [0.5, 3.0] and out["b"].item() == 1.5
    assert torch.equal(merge([ft], "wise_ft", base, alpha=0.0)["w"], base["w"])
    assert torch.equal(merge([ft], "wise_ft", base, alpha=1.0)["w"], ft["w"])


def test_task_arithmetic_adds_scaled_task_vectors():
    base = state([1.0, 1.0])
    out = merge([state([2.0, 1.0]), state([1.0, 4.0])], "task_arithmetic", base, scale=0.5)
    assert out["w"].tolist() == [1.5, 2.5]  # 1 + 0.5 * (1 + 0), 1 + 0.5 * (0 + 3)


def test_model_stock_t_formula():
    base = state([0.0, 0.0])
    # Task vectors [1, 0] and [1, 1]: cos = 1/sqrt(2); t = 2 cos / (1 + cos); w = t * mean.
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    out = merge([state([1.0, 0.0]), state([1.0, 1.0])], "model_stock", base)
    torch.testing.assert_close(out["w"], t * T([1.0, 0.5]))
    # Three vectors: the pairwise cosines are averaged, t = 3 cos / (1 + 2 cos).
    vs = [T([1.0, 0.0]), T([0.0, 1.0]), T([1.0, 1.0])]
    cos3 = (0 + 2 / math.sqrt(2)) / 3
    t3 = 3 * cos3 / (1 + 2 * cos3)
    out3 = merge([{"w": v} for v in vs], "model_stock", {"w": T([0.0, 0.0])})
    torch.testing.assert_close(out3["w"], t3 * torch.stack(vs).mean(0))


def test_model_stock_limits():
    base = state([1.0, 1.0], 2.0)
    same = merge([state([3.0, 2.0], 5.0)] * 2, "model_stock", base)  # cos = 1 -> t = 1: the mean
    torch.testing.assert_close(same["w"], T([3.0, 2.0]))
    ortho = merge([state([2.0, 1.0], 2.0), state([1.0, 2.0], 2.0)], "model_stock", base)  # cos = 0 -> the base
    torch.testing.assert_close(ortho["w"], base["w"])
    assert ortho["b"].item() == 2.0  # zero task vectors: cosine 0, the base (which is the mean too)
    apart = merge([state([2.0, 1.0]), state([0.0, 1.0])], "model_stock", base)  # cos = -1: clamped, the base
    torch.testing.assert_close(apart["w"], base["w"])


def test_ties_trims_elects_and_averages_the_agreeing_entries():
    base = {"w": torch.ones(4)}
    taus = [T([4.0, -1.0, 0.5, 2.0]), T([-3.0, -2.0, 0.1, 1.0]), T([1.0, 4.0, -0.2, -5.0])]
    # trim=0.25 resets floor(0.25 * 4) = 1 entry per vector, the smallest: 0.5, 0.1, -0.2.
    # Trimmed sum [2, 1, 0, -2] elects signs [+, +, 0, -]; agreeing entries: {4, 1}, {4}, {}, {-5}.
    out = merge([{"w": 1 + t} for t in taus], "ties", base, trim=0.25, scale=0.5)
    assert out["w"].tolist() == [1 + 0.5 * 2.5, 1 + 0.5 * 4.0, 1.0, 1 + 0.5 * -5.0]
    # Without trimming, entry 2's sum is 0.4 > 0: the mean of 0.5 and 0.1.
    untrimmed = merge([{"w": 1 + t} for t in taus], "ties", base, trim=0.0)
    torch.testing.assert_close(untrimmed["w"][2], T(1.3))


def test_ties_trim_counts_entries():
    base = {"w": torch.zeros(10)}
    tau = torch.arange(1.0, 11.0) * T([1.0, -1.0] * 5)  # magnitudes 1..10
    out = merge([{"w": tau}], "ties", base, trim=0.7)  # the 7 smallest go
    assert out["w"].tolist() == [0.0] * 7 + tau[7:].tolist()


def test_dare_drops_rescales_and_is_seeded():
    base = {"w": torch.zeros(4000), "v": torch.zeros(3)}
    ft = {"w": torch.full((4000,), 2.0), "v": T([1.0, 2.0, 3.0])}
    out = merge([ft], "dare", base, density=0.25, seed=3)
    values = set(out["w"].unique().tolist())
    assert values <= {0.0, 8.0}  # dropped, or kept and scaled by 1 / 0.25
    kept = (out["w"] != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.03
    again = merge([ft], "dare", base, density=0.25, seed=3)
    assert torch.equal(again["w"], out["w"])
    assert not torch.equal(merge([ft], "dare", base, density=0.25, seed=4)["w"], out["w"])
    # The draws of a tensor depend on its name and the seed, not on the dict order.
    reordered = merge([dict(reversed(ft.items()))], "dare", dict(reversed(base.items())), density=0.25, seed=3)
    assert torch.equal(reordered["w"], out["w"]) and list(reordered) == ["v", "w"]
    # density 1 is task arithmetic.
    torch.testing.assert_close(merge([ft, ft], "dare", base, density=1.0), merge([ft, ft], "task_arithmetic", base))


# -- what is not averaged, masks, ties --------------------------------------------------------------

def test_integer_and_bool_buffers_come_from_the_first_state():
    a = {"w": T([1.0]), "bn.num_batches_tracked": T(10), "q.initialized": T(True), "q.level": T([3], dtype=torch.int16)}
    b = {"w": T([3.0]), "bn.num_batches_tracked": T(50), "q.initialized": T(False), "q.level": T([7], dtype=torch.int16)}
    out = merge([a, b])
    assert out["w"].item() == 2.0
    assert out["bn.num_batches_tracked"].item() == 10 and out["q.initialized"].item() is True
    assert out["q.level"].tolist() == [3] and out["q.level"].dtype == torch.int16
    assert out["bn.num_batches_tracked"] is not a["bn.num_batches_tracked"]  # a copy, not the input


def test_quantizer_float_state_is_merged_like_weights():
    a = {"fc.weight": T([1.0]), "fc.weight_quantizer.scale": T([0.1])}
    b = {"fc.weight": T([3.0]), "fc.weight_quantizer.scale": T([0.3])}
    torch.testing.assert_close(merge([a, b])["fc.weight_quantizer.scale"], T([0.2]))


def masked(w, mask):
    return {"fc.weight": T(w), "fc.weight_mask": T(mask), "fc.bias": T([1.0])}


@pytest.mark.parametrize("rule, mask, weight", [
    ("intersection", [True, False, False, False], [2.0, 0.0, 0.0, 0.0]),
    # Union: a weight a state prunes counts as 0 there (its stored 9.0 is not what it computes with).
    ("union", [True, True, True, False], [2.0, 1.5, 2.0, 0.0]),
])
def test_masks_intersection_and_union(rule, mask, weight):
    a = masked([1.0, 3.0, 9.0, 5.0], [True, True, False, False])
    b = masked([3.0, 7.0, 4.0, 5.0], [True, False, True, False])
    out = merge([a, b], masks=rule)
    assert out["fc.weight_mask"].tolist() == mask and out["fc.weight_mask"].dtype == torch.bool
    assert out["fc.weight"].tolist() == weight
    assert (out["fc.weight"][~out["fc.weight_mask"]] == 0).all()


def test_masks_hold_for_task_vector_methods():
    base = masked([0.0, 0.0, 0.0, 0.0], [True, True, True, True])
    a = masked([1.0, 3.0, 9.0, 5.0], [True, True, False, False])
    b = masked([3.0, 7.0, 4.0, 5.0], [True, False, True, False])
    for method in ("task_arithmetic", "ties", "dare", "model_stock"):
        out = merge([a, b], method, base)
        assert out["fc.weight_mask"].tolist() == [True, False, False, False]
        assert out["fc.weight"][1:].tolist() == [0.0, 0.0, 0.0], method


def tied_state(seed=0, masked_=False):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(6, 4, generator=g)
    s = {"emb.weight": emb, "head.weight": emb, "head.bias": torch.randn(6, generator=g)}
    if masked_:
        mask = torch.rand(6, 4, generator=g) > 0.3
        s |= {"emb.weight_mask": mask, "head.weight_mask": mask}
    return s


@pytest.mark.parametrize("method", ["uniform", "model_stock", "task_arithmetic", "ties", "dare"])
def test_tied_aliases_are_one_object_after_merge(method):
    states = [tied_state(1, True), tied_state(2, True)]
    base = tied_state(0, True) if method != "uniform" else None
    out = merge(states, method, base)
    assert out["head.weight"] is out["emb.weight"] and out["head.weight_mask"] is out["emb.weight_mask"]
    assert (out["emb.weight"][~out["emb.weight_mask"]] == 0).all()
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert loaded["head.weight"].data_ptr() == loaded["emb.weight"].data_ptr()  # the tie survives saving


def test_a_tie_broken_in_one_state_is_still_merged_once():
    a, b = tied_state(1), tied_state(2)
    b["head.weight"] = b["emb.weight"].clone()  # e.g. a checkpoint that cloned each key
    out = merge([a, b])
    assert out["head.weight"] is out["emb.weight"]


def test_a_tie_copied_apart_in_every_state_is_merged_once():
    states = [tied_state(i) for i in range(3)]
    for s in states:  # as a checkpoint writer that clones each name leaves it
        s["head.weight"] = s["emb.weight"].clone()
    out = merge(states[1:], "dare", states[0], density=0.5)
    assert out["head.weight"] is out["emb.weight"]  # one draw for both names: still equal
    assert out["head.bias"] is not out["emb.weight"]


def test_hugging_face_gpt2_tied_head_stays_tied():
    from tests.zoo import gpt2

    torch.manual_seed(0)
    states = [gpt2().state_dict() for _ in range(3)]
    out = merge(states[1:], "dare", states[0], density=0.3)
    assert out["lm_head.weight"] is out["transformer.wte.weight"]
    model = gpt2()
    model.load_state_dict(out, strict=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model.transformer.wte.weight.detach(), out["lm_head.weight"])


# -- greedy soup -------------------------------------------------------------------------------------

def test_greedy_soup_adds_ingredients_while_the_score_does_not_drop():
    # Scalar "models"; the score is closeness of w to 2.  Own scores: 0 -> 2.5 (best), 1 -> 0.5, 2 -> 3, 3 -> -10.
    states = [{"w": T([v]), "n": T(i)} for i, v in enumerate([2.5, 0.5, 3.0, -10.0])]
    calls = []

    def score(s):
        calls.append(s["w"].item())
        return -abs(s["w"].item() - 2.0)

    soup, chosen = greedy_soup(states, score)
    # Rank by own score: 0 (2.5), 2 (3.0), 1 (0.5), 3 (-10). Soups tried: {0,2}=2.75 worse -> no;
    # {0,1}=1.5 -> 0.5 off, as good as 2.5 alone -> yes; {0,1,3} -> no.
    assert chosen == [0, 1]
    assert soup["w"].item() == 1.5 and soup["n"].item() == 0
    assert calls == pytest.approx([2.5, 0.5, 3.0, -10.0, 2.75, 1.5, -7 / 3])  # once per ingredient, once per soup


def test_greedy_soup_masks():
    a = masked([1.0, 3.0, 9.0, 5.0], [True, True, False, False])
    b = masked([3.0, 7.0, 4.0, 5.0], [True, False, True, False])
    for rule, expected in (("intersection", [True, False, False, False]), ("union", [True, True, True, False])):
        soup, chosen = greedy_soup([a, b], lambda s: 1.0, masks=rule)
        assert chosen == [0, 1] and soup["fc.weight_mask"].tolist() == expected


def test_greedy_soup_lower_is_better_and_nan():
    states = [{"w": T([v])} for v in (1.0, float("nan"), 3.0)]
    soup, chosen = greedy_soup(states, lambda s: abs(s["w"].item() - 2.0), higher_is_better=False)
    assert chosen == [0, 2] and soup["w"].item() == 2.0  # the NaN ingredient ranks last and never helps


# -- bad input: one line, before anything is computed -----------------------------------------------

def test_different_keys_shapes_dtypes_name_the_state_and_key():
    a, b = state([1.0, 2.0]), state([1.0, 2.0])
    del b["b"]
    with pytest.raises(ValueError, match=r"b\.ckpt lacks 'b', which a\.ckpt holds") as err:
        merge([a, b], names=["a.ckpt", "b.ckpt"])
    one_line(err)
    with pytest.raises(ValueError, match=r"b\.ckpt: 'w' is torch\.float32 \[3\], torch\.float32 \[2\] in a\.ckpt"):
        merge([a, state([1.0, 2.0, 3.0])], names=["a.ckpt", "b.ckpt"])
    with pytest.raises(ValueError, match=r"state 1: 'w' is torch\.float64"):
        merge([a, {**a, "w": a["w"].double()}])
    with pytest.raises(ValueError, match=r"the base lacks 'n'"):
        merge([a], "task_arithmetic", {"w": a["w"], "b": a["b"]})
    with pytest.raises(ValueError, match=r"'x' is a int"):
        check_compatible([{"x": T(1)}, {"x": 1}])


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="uniformm"), r"method='uniformm' is unknown; did you mean 'uniform'\?"),
    (dict(method="ties"), r"method='ties' needs a base"),
    (dict(method="model_stock", n=1, base=True), r"'model_stock' merges at least 2 fine-tuned state\(s\), got 1"),
    (dict(method="wise_ft", n=2, base=True), r"'wise_ft' merges exactly 1 fine-tuned state\(s\), got 2"),
    (dict(method="uniform", n=1), r"'uniform' merges at least 2"),
    (dict(method="uniform", base=True), r"'uniform' takes no base"),
    (dict(method="greedy"), r"greedy_soup"),
    (dict(method="wise_ft", n=1, base=True, alpha=1.5), r"alpha=1\.5 must lie in \[0, 1\]"),
    (dict(method="ties", base=True, trim=1.0), r"trim=1\.0 must lie in \[0, 1\); .*trim=0\.8"),
    (dict(method="dare", base=True, density=0.0), r"density=0\.0 must lie in \(0, 1\]"),
    (dict(method="dare", base=True, scale=float("nan")), r"scale=nan must be a finite number"),
    (dict(method="dare", base=True, seed=1.5), r"seed=1\.5 must be an int"),
    (dict(masks="both"), r"masks='both' must be one of 'intersection', 'union'"),
])
def test_bad_arguments(kwargs, match):
    kwargs = dict(kwargs)
    n, base = kwargs.pop("n", 2), kwargs.pop("base", False)
    states = [state([float(i)]) for i in range(n)]
    with pytest.raises(ValueError, match=match) as err:
        merge(states, base=state([0.0]) if base else None, **kwargs)
    one_line(err)


def test_bad_state_containers():
    with pytest.raises(ValueError, match="wrap a single state dict in a list"):
        merge(state([1.0]))
    with pytest.raises(ValueError, match="non-empty list"):
        merge([])
    with pytest.raises(ValueError, match="names has 1 labels for 2 states"):
        merge([state([1.0]), state([2.0])], names=["a"])
    with pytest.raises(ValueError, match="'greedy' merges at least 2"):
        greedy_soup([state([1.0])], lambda s: 0.0)
