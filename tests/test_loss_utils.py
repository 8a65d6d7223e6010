"""compute_mtp_ce_loss against the plain per-head loop: values, gradients, options, errors."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mtp_reference import reference_mtp_ce_loss

from weighted_mtp.utils import compute_mtp_ce_loss, compute_mtp_ce_loss_unweighted

OUTPUTS = ("weighted_ce_loss", "unweighted_ce_loss", "per_head_ce_loss")
COUNTS = ("heads_with_tokens", "heads_with_weight")


def make_batch(batch, seq, heads, vocab, *, seed=0, dtype=torch.float64, weights="2d", ignored_prefix=1,
               padding=1, mask_dtype=torch.long, mask_values="binary", weight_scale=1.0):
    """Logits, labels with an ignored prefix, an attention mask with right padding, weights.

    ``mask_values``: ``"binary"`` (0/1), ``"soft"`` (in [0.1, 1)) or ``"segments"`` (ids 0..3).
    """
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, seq, heads, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, :ignored_prefix] = -100
    attention_mask = {
        "binary": lambda: torch.ones(batch, seq),
        "soft": lambda: 0.1 + 0.9 * torch.rand(batch, seq, generator=gen, dtype=torch.float64),
        "segments": lambda: torch.randint(0, 4, (batch, seq), generator=gen),
    }[mask_values]().to(mask_dtype)
    if padding:
        attention_mask[-1, seq - padding:] = 0
        labels[-1, seq - padding:] = -100
    shape = {"2d": (batch, seq), "3d": (batch, seq, heads), None: None}[weights]
    weight_tensor = None if shape is None else torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    if weight_tensor is not None:
        weight_tensor *= weight_scale
    return logits, labels, attention_mask, weight_tensor


def losses_and_grads(loss_fn, logits, labels, attention_mask, weights, **options):
    """Outputs and d(sum of outputs, mixed)/d(logits, weights) of one loss implementation."""
    logits = logits.detach().clone().requires_grad_(True)
    if weights is not None and weights.is_floating_point():  # integer and bool weights cannot require grad
        weights = weights.detach().clone().requires_grad_(True)
    out = loss_fn(logits, labels, attention_mask, weights, **options)
    mix = torch.linspace(0.5, 1.5, out["per_head_ce_loss"].numel(), dtype=out["per_head_ce_loss"].dtype)
    total = out["weighted_ce_loss"] + 0.3 * out["unweighted_ce_loss"] + (mix * out["per_head_ce_loss"]).sum()
    if total.requires_grad:  # the loop builds no graph when no head has a position (S == 1)
        total.backward()

    def grad_of(tensor):
        return torch.zeros_like(tensor) if tensor.grad is None else tensor.grad

    return out, grad_of(logits), None if weights is None or not weights.requires_grad else grad_of(weights)


def assert_same(ours, reference, atol, rtol=0.0):
    out, grad_logits, grad_weights = ours
    ref_out, ref_grad_logits, ref_grad_weights = reference
    for key in OUTPUTS:
        torch.testing.assert_close(out[key], ref_out[key].to(out[key].dtype), atol=atol, rtol=rtol, msg=key)
    for key in COUNTS:
        assert out[key].dtype == torch.int64 and out[key].dim() == 0 and out[key] == ref_out[key], key
    torch.testing.assert_close(grad_logits, ref_grad_logits, atol=atol, rtol=rtol)
    if ref_grad_weights is not None:
        torch.testing.assert_close(grad_weights, ref_grad_weights, atol=atol, rtol=rtol)


@st.composite
def problems(draw, mask_dtypes=(torch.long, torch.bool, torch.float32), mask_values=("binary",)):
    heads = draw(st.integers(1, 4))
    seq = draw(st.integers(1, 9))  # includes S <= n: heads with no positions at all
    batch = draw(st.integers(1, 3))
    weights = draw(st.sampled_from(["2d", "3d", None]))
    options = {
        "n_future": draw(st.one_of(st.none(), st.integers(1, heads))),
        "mask_ignored_labels": draw(st.booleans()),
        "normalize": draw(st.sampled_from(["mask", "weights"])),
        "head_average": draw(st.sampled_from(["all", "valid"])),
        "weight_alignment": "input" if weights == "3d" else draw(st.sampled_from(["target", "previous", "input"])),
        "chunk_size": draw(st.sampled_from([None, 1, 2, 5])),
    }
    batch_kwargs = {
        "seed": draw(st.integers(0, 2**16)),
        "weights": weights,
        "ignored_prefix": draw(st.integers(0, seq)),  # seq: everything ignored
        "padding": draw(st.integers(0, seq)),
        "mask_dtype": draw(st.sampled_from(mask_dtypes)),
        "mask_values": draw(st.sampled_from(mask_values)),
        "weight_scale": draw(st.sampled_from([1.0, 1.0, 0.0, -1.0, 3.0])),  # D_k <= 0 for zero/negative weights
    }
    vocab = draw(st.integers(2, 7))
    return make_batch(batch, seq, heads, vocab, **batch_kwargs), options


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_reference_loop_fp64(problem):
    inputs, options = problem
    ours = losses_and_grads(compute_mtp_ce_loss, *inputs, **options)
    options.pop("chunk_size")
    reference = losses_and_grads(reference_mtp_ce_loss, *inputs, **options)
    assert_same(ours, reference, atol=1e-12)


@pytest.mark.parametrize("normalize", ["mask", "weights"])
@pytest.mark.parametrize("head_average", ["all", "valid"])
@pytest.mark.parametrize("weights", ["2d", "3d"])
def test_gradcheck(normalize, head_average, weights):
    logits, labels, attention_mask, weight_tensor = make_batch(2, 6, 3, 5, weights=weights, seed=3)
    logits.requires_grad_(True)
    weight_tensor.requires_grad_(True)
    alignment = "input" if weights == "3d" else "previous"

    def fn(x, w):
        out = compute_mtp_ce_loss(x, labels, attention_mask, w, normalize=normalize, head_average=head_average,
                                  weight_alignment=alignment, chunk_size=3)
        return tuple(out[key] for key in OUTPUTS)

    assert torch.autograd.gradcheck(fn, (logits, weight_tensor))


# The attention mask as a differentiable input: the loop multiplies by its values.

WEIGHT_FORMS = [("2d", "target"), ("2d", "previous"), ("2d", "input"), ("3d", "input"), (None, "target")]


def mask_gradients(loss_fn, logits, labels, attention_mask, weights, **options):
    """Outputs, and for each output alone and for a linear combination of all three, the
    gradients of ``[attention_mask, logits, weights]`` (all of them require grad)."""
    mask = attention_mask.detach().clone().requires_grad_(True)
    inputs = [mask, logits.detach().clone().requires_grad_(True)]
    if weights is not None:
        inputs.append(weights.detach().clone().requires_grad_(True))
    out = loss_fn(inputs[1], labels, mask, None if weights is None else inputs[2], **options)
    per_head = out["per_head_ce_loss"]
    mixed_heads = (torch.linspace(0.5, 1.5, per_head.numel(), dtype=per_head.dtype) * per_head).sum()
    objectives = {
        "weighted_ce_loss": out["weighted_ce_loss"],
        "unweighted_ce_loss": out["unweighted_ce_loss"],
        "per_head_ce_loss": mixed_heads,
        "combination": -0.7 * out["weighted_ce_loss"] + 0.3 * out["unweighted_ce_loss"] + mixed_heads,
    }
    grads = {}
    for name, objective in objectives.items():
        found = [None] * len(inputs)
        if objective.requires_grad:  # the loop builds no graph when no head has a position (S == 1)
            found = torch.autograd.grad(objective, inputs, retain_graph=True, allow_unused=True)
        grads[name] = [torch.zeros_like(x) if grad is None else grad for x, grad in zip(inputs, found, strict=True)]
    return out, grads


def assert_same_mask_gradients(ours, reference, atol, rtol=0.0):
    for key in OUTPUTS:
        torch.testing.assert_close(ours[0][key], reference[0][key], atol=atol, rtol=rtol, msg=key)
    for name, grads in reference[1].items():
        for which, got, want in zip(("mask", "logits", "weights")[:len(grads)], ours[1][name], grads, strict=True):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=f"d({name})/d({which})")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(mask_dtypes=(torch.float64,), mask_values=("soft", "segments", "binary")))
def test_mask_gradient_matches_reference_loop_fp64(problem):
    inputs, options = problem
    ours = mask_gradients(compute_mtp_ce_loss, *inputs, **options)
    options.pop("chunk_size")
    assert_same_mask_gradients(ours, mask_gradients(reference_mtp_ce_loss, *inputs, **options), atol=1e-12)


@pytest.mark.parametrize(("weights", "alignment"), WEIGHT_FORMS)
def test_mask_gradient_every_option_combination(weights, alignment):
    logits, labels, mask, weight_tensor = make_batch(3, 6, 4, 5, weights=weights, seed=21, padding=2,
                                                     mask_dtype=torch.float64, mask_values="soft")
    labels[:, 4:] = -100  # head 4 sees no valid label: D_4 == 0 when ignored labels are masked
    for mask_ignored_labels, normalize, head_average, n_future, chunk_size in itertools.product(
        [True, False], ["mask", "weights"], ["all", "valid"], [None, 2], [None, 1, 5]
    ):
        options = {"mask_ignored_labels": mask_ignored_labels, "normalize": normalize, "head_average": head_average,
                   "n_future": n_future, "weight_alignment": alignment}
        ours = mask_gradients(compute_mtp_ce_loss, logits, labels, mask, weight_tensor, chunk_size=chunk_size,
                              **options)
        reference = mask_gradients(reference_mtp_ce_loss, logits, labels, mask, weight_tensor, **options)
        assert torch.count_nonzero(reference[1]["combination"][0]) > 0  # the loop does differentiate the mask
        assert_same_mask_gradients(ours, reference, atol=1e-12)


@pytest.mark.parametrize("loss_fn", [compute_mtp_ce_loss, reference_mtp_ce_loss])
@pytest.mark.parametrize("normalize", ["mask", "weights"])
@pytest.mark.parametrize("mask_ignored_labels", [True, False])
def test_gradcheck_with_mask(loss_fn, normalize, mask_ignored_labels):
    logits, labels, mask, weights = make_batch(2, 6, 3, 5, seed=4, mask_dtype=torch.float64, mask_values="soft")
    for tensor in (logits, mask, weights):
        tensor.requires_grad_(True)

    def fn(x, m, w):
        out = loss_fn(x, labels, m, w, normalize=normalize, mask_ignored_labels=mask_ignored_labels,
                      head_average="valid", weight_alignment="previous")
        return tuple(out[key] for key in OUTPUTS)

    assert torch.autograd.gradcheck(fn, (logits, mask, weights))


@pytest.mark.parametrize(("mask_values", "mask_dtype"), [
    ("segments", torch.long), ("segments", torch.int32), ("segments", torch.float64),
    ("soft", torch.float32), ("soft", torch.float64), ("soft", torch.bfloat16),
])
@pytest.mark.parametrize("normalize", ["mask", "weights"])
def test_mask_values_are_used_not_binarised(mask_values, mask_dtype, normalize):
    logits, labels, mask, weights = make_batch(3, 7, 3, 6, seed=8, mask_dtype=mask_dtype, mask_values=mask_values)
    ours = losses_and_grads(compute_mtp_ce_loss, logits, labels, mask, weights, normalize=normalize)
    assert_same(ours, losses_and_grads(reference_mtp_ce_loss, logits, labels, mask, weights, normalize=normalize),
                atol=1e-12)
    binarised = compute_mtp_ce_loss(logits, labels, mask != 0, weights, normalize=normalize)
    assert not torch.allclose(binarised["weighted_ce_loss"], ours[0]["weighted_ce_loss"], atol=1e-6, rtol=0)


def test_mask_gradient_alone_dtype_and_only_when_requested():
    logits, labels, mask, weights = make_batch(2, 7, 3, 5, seed=6, mask_dtype=torch.float32, mask_values="soft")
    # Only the mask requires grad: the Function must still save what its backward needs.
    for overwrite_logits in (False, True):
        soft = mask.clone().requires_grad_(True)
        out = compute_mtp_ce_loss(logits.clone(), labels, soft, weights, overwrite_logits=overwrite_logits)
        (out["weighted_ce_loss"] + out["unweighted_ce_loss"]).backward()
        loop_mask = mask.clone().requires_grad_(True)
        ref = reference_mtp_ce_loss(logits, labels, loop_mask, weights)
        (ref["weighted_ce_loss"] + ref["unweighted_ce_loss"]).backward()
        assert soft.grad.dtype == torch.float32
        torch.testing.assert_close(soft.grad, loop_mask.grad, atol=1e-6, rtol=1e-6)

    frozen = mask.clone()  # floating, but not requiring grad
    logits.requires_grad_(True)
    compute_mtp_ce_loss(logits, labels, frozen, weights)["weighted_ce_loss"].backward()
    assert frozen.grad is None and logits.grad is not None


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", ["mask", "weights"])
def test_bf16_mask_gradient_error_no_worse_than_loop(mask_dtype, normalize):
    """Against an fp64 run on the same bf16 values, our mask gradient's error must not exceed the loop's."""
    logits, labels, mask, weights = make_batch(4, 64, 4, 512, seed=12, dtype=torch.bfloat16, mask_dtype=mask_dtype,
                                               mask_values="soft")
    exact = mask_gradients(reference_mtp_ce_loss, logits.double(), labels, mask.double(), weights.double(),
                           normalize=normalize)
    ours = mask_gradients(compute_mtp_ce_loss, logits, labels, mask, weights, normalize=normalize)
    loop = mask_gradients(reference_mtp_ce_loss, logits, labels, mask, weights, normalize=normalize)
    for name, grads in exact[1].items():
        ours_err = (ours[1][name][0].double() - grads[0]).norm()
        loop_err = (loop[1][name][0].double() - grads[0]).norm()
        assert ours_err <= loop_err, name


# Integer and bool weights: the loop promotes them, so their values are used as they are.

@pytest.mark.parametrize("weight_dtype", [torch.long, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize(("weights", "alignment"), WEIGHT_FORMS[:4])
@pytest.mark.parametrize("normalize", ["mask", "weights"])
@pytest.mark.parametrize("head_average", ["all", "valid"])
def test_integer_and_bool_weights_match_reference_loop(weight_dtype, weights, alignment, normalize, head_average):
    logits, labels, mask, float_weights = make_batch(3, 7, 3, 6, weights=weights, seed=9)
    gen = torch.Generator().manual_seed(1)
    low = {torch.long: -1, torch.int32: -1, torch.uint8: 0, torch.bool: 0}[weight_dtype]
    high = 2 if weight_dtype == torch.bool else 4
    integer_weights = torch.randint(low, high, float_weights.shape, generator=gen).to(weight_dtype)
    options = {"weight_alignment": alignment, "normalize": normalize, "head_average": head_average}
    ours = losses_and_grads(compute_mtp_ce_loss, logits, labels, mask, integer_weights, chunk_size=4, **options)
    assert ours[2] is None
    assert_same(ours, losses_and_grads(reference_mtp_ce_loss, logits, labels, mask, integer_weights, **options),
                atol=1e-12)
    as_float = compute_mtp_ce_loss(logits, labels, mask, integer_weights.double(), **options)
    for key in OUTPUTS:
        torch.testing.assert_close(ours[0][key], as_float[key], atol=0, rtol=0)


def test_head_with_no_valid_token_and_everything_masked():
    logits, labels, attention_mask, weights = make_batch(2, 6, 3, 5)
    labels[:, 2] = -100  # head 2 at t=0 only; make head 3 fully invalid:
    labels[:, 3:] = -100
    labels[:, 3] = 1  # heads 1..3 see position 3; head 3 (k=3) sees positions 3..5
    labels[:, 4:] = -100
    out = compute_mtp_ce_loss(logits, labels, attention_mask, weights, head_average="valid")
    ref = reference_mtp_ce_loss(logits, labels, attention_mask, weights, head_average="valid")
    for key in OUTPUTS:
        torch.testing.assert_close(out[key], ref[key], atol=1e-12, rtol=0)

    attention_mask.zero_()
    logits.requires_grad_(True)
    out = compute_mtp_ce_loss(logits, labels, attention_mask, weights)
    assert out["weighted_ce_loss"].item() == 0.0 and out["unweighted_ce_loss"].item() == 0.0
    (out["weighted_ce_loss"] + out["unweighted_ce_loss"]).backward()
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("alignment", ["target", "previous", "input"])
def test_trailing_singleton_weights_are_read_as_two_dimensional(alignment):
    """``[B, S, 1]`` weights (a reward head's output) work in the loop wherever ``[B, S]`` do."""
    logits, labels, attention_mask, weights = make_batch(2, 6, 3, 5)
    flat = losses_and_grads(compute_mtp_ce_loss, logits, labels, attention_mask, weights, weight_alignment=alignment)
    column = losses_and_grads(compute_mtp_ce_loss, logits, labels, attention_mask, weights[..., None],
                              weight_alignment=alignment)
    assert column[2].shape == (2, 6, 1)
    assert_same(column, (flat[0], flat[1], flat[2][..., None]), atol=0.0)


@pytest.mark.parametrize(("weights", "alignment"), [("2d", "previous"), ("2d", "input"), ("3d", "input")])
def test_weights_that_never_reach_the_last_position_may_omit_it(weights, alignment):
    """Input- and previous-aligned weights of ``S - 1`` positions work in the loop, so they work here."""
    logits, labels, attention_mask, full = make_batch(2, 6, 3, 5, weights=weights)
    short = full[:, :-1]
    ours = losses_and_grads(compute_mtp_ce_loss, logits, labels, attention_mask, short, weight_alignment=alignment)
    reference = losses_and_grads(reference_mtp_ce_loss, logits, labels, attention_mask, short,
                                 weight_alignment=alignment)
    assert_same(ours, reference, atol=1e-12)
    out, grad_logits, _ = losses_and_grads(compute_mtp_ce_loss, logits, labels, attention_mask, full,
                                           weight_alignment=alignment)
    assert_same(ours, (out, grad_logits, ours[2]), atol=1e-12)  # the last position changes nothing


def test_target_aligned_weights_need_every_position():
    logits, labels, attention_mask, weights = make_batch(2, 6, 3, 5)
    with pytest.raises(ValueError, match=r"weights must have shape \(2, 6\)"):
        compute_mtp_ce_loss(logits, labels, attention_mask, weights[:, :-1])


def test_head_counts_say_which_guards_fired():
    """``heads_with_tokens``: heads with ``sum(m) > 0``; ``heads_with_weight``: heads with ``D_k > 0``."""
    logits, labels, attention_mask, weights = make_batch(2, 6, 4, 5, ignored_prefix=0, padding=0)
    labels[:, 2:] = -100  # only head 1 (positions 1..) keeps a label: position 1
    weights[:, 1] = 0.0  # ... and its weight is 0
    out = compute_mtp_ce_loss(logits, labels, attention_mask, weights, normalize="weights")
    assert (int(out["heads_with_tokens"]), int(out["heads_with_weight"])) == (1, 0)
    out = compute_mtp_ce_loss(logits, labels, attention_mask.zero_(), weights)
    assert (int(out["heads_with_tokens"]), int(out["heads_with_weight"])) == (0, 0)
    assert not out["heads_with_tokens"].requires_grad


def test_output_dtypes():
    for dtype, expected in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]:
        out = compute_mtp_ce_loss(*make_batch(2, 5, 2, 4, dtype=dtype))
        assert {out[key].dtype for key in OUTPUTS} == {expected}
        assert out["weighted_ce_loss"].dim() == 0 and out["per_head_ce_loss"].shape == (2,)


def test_unweighted_wrapper_equals_unweighted_output():
    logits, labels, attention_mask, _ = make_batch(3, 7, 3, 6, seed=5)
    loss = compute_mtp_ce_loss_unweighted(logits, labels, attention_mask, n_future=2, mask_ignored_labels=False)
    ref = reference_mtp_ce_loss(logits, labels, attention_mask, n_future=2, mask_ignored_labels=False)
    torch.testing.assert_close(loss, ref["unweighted_ce_loss"], atol=1e-12, rtol=0)


def test_bf16_error_no_worse_than_loop():
    """Against an fp64 run on the same bf16 values, our error must not exceed the loop's."""
    logits, labels, attention_mask, weights = make_batch(4, 64, 4, 512, seed=11, dtype=torch.bfloat16)
    exact = losses_and_grads(reference_mtp_ce_loss, logits.double(), labels, attention_mask, weights.double())
    ours = losses_and_grads(compute_mtp_ce_loss, logits, labels, attention_mask, weights)
    loop = losses_and_grads(reference_mtp_ce_loss, logits, labels, attention_mask, weights)
    for key in OUTPUTS:
        ours_err = (ours[0][key].double() - exact[0][key]).abs().max()
        loop_err = (loop[0][key].double() - exact[0][key]).abs().max()
        assert ours_err <= loop_err, key
    for index in (1, 2):  # gradients of logits, then weights
        ours_err = (ours[index].double() - exact[index]).norm()
        loop_err = (loop[index].double() - exact[index]).norm()
        assert ours_err <= loop_err
    assert (ours[0]["weighted_ce_loss"].double() - exact[0]["weighted_ce_loss"]).abs() < 1e-5


def test_non_contiguous_logits():
    logits, labels, attention_mask, weights = make_batch(2, 6, 3, 5, seed=2)
    # Vocab-major storage and a vocab slice of a wider tensor: neither is contiguous.
    permuted = logits.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    padded = torch.cat([logits, torch.randn(2, 6, 3, 4, dtype=logits.dtype)], dim=-1)[..., :5]
    reference = losses_and_grads(reference_mtp_ce_loss, logits, labels, attention_mask, weights)
    for strided in (permuted, padded):
        assert not strided.is_contiguous()
        assert_same(losses_and_grads(compute_mtp_ce_loss, strided, labels, attention_mask, weights), reference, 1e-12)


def test_chunk_size_does_not_change_result():
    inputs = make_batch(3, 10, 3, 6, seed=7)
    one_row = losses_and_grads(compute_mtp_ce_loss, *inputs, chunk_size=1)
    for chunk_size in (4, 10_000, None):
        assert_same(losses_and_grads(compute_mtp_ce_loss, *inputs, chunk_size=chunk_size), one_row, atol=1e-13)


def test_no_grad_builds_no_graph_and_matches():
    logits, labels, attention_mask, weights = make_batch(2, 6, 3, 5, mask_dtype=torch.float64, mask_values="soft")
    for tensor in (logits, attention_mask, weights):
        tensor.requires_grad_(True)
    with torch.no_grad():
        out = compute_mtp_ce_loss(logits, labels, attention_mask, weights)
    assert all(out[key].grad_fn is None and not out[key].requires_grad for key in OUTPUTS)
    ref = reference_mtp_ce_loss(logits.detach(), labels, attention_mask.detach(), weights.detach())
    for key in OUTPUTS:
        torch.testing.assert_close(out[key], ref[key], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_overwrite_logits_reuses_storage_and_matches(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 8, dtype=torch.float64).to(dtype)
    head = torch.randn(8, 3 * 5, dtype=torch.float64).to(dtype)
    _, labels, attention_mask, weights = make_batch(2, 7, 3, 5)

    def run(overwrite):
        w = head.clone().requires_grad_(True)
        logits = (hidden @ w).view(2, 7, 3, 5)
        seen = []
        logits.register_hook(lambda grad: seen.append(grad))
        out = compute_mtp_ce_loss(logits, labels, attention_mask, weights.to(dtype), overwrite_logits=overwrite,
                                  n_future=2)
        (out["weighted_ce_loss"] + out["unweighted_ce_loss"]).backward()
        return w.grad, seen[0], logits

    grad_default, logits_grad, _ = run(False)
    grad_overwrite, overwritten_grad, logits = run(True)
    assert overwritten_grad.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(overwritten_grad, logits_grad, atol=0, rtol=0)
    torch.testing.assert_close(grad_overwrite, grad_default, atol=0, rtol=0)


def test_retain_graph_and_double_backward():
    logits, labels, attention_mask, weights = make_batch(2, 6, 3, 5, mask_dtype=torch.float64, mask_values="soft")
    logits.requires_grad_(True)
    attention_mask.requires_grad_(True)
    loss = compute_mtp_ce_loss(logits, labels, attention_mask, weights)["weighted_ce_loss"]
    loss.backward(retain_graph=True)
    first, first_mask = logits.grad.clone(), attention_mask.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * first, atol=1e-15, rtol=0)
    torch.testing.assert_close(attention_mask.grad, 2 * first_mask, atol=1e-15, rtol=0)

    for wrt in (logits, attention_mask):  # a gradient penalty: refused at once, never silently dropped
        loss = compute_mtp_ce_loss(logits, labels, attention_mask, weights)["weighted_ce_loss"]
        with pytest.raises(RuntimeError, match="differentiated only once"):
            torch.autograd.grad(loss, wrt, create_graph=True)


def test_weights_receive_gradient_only_when_requested():
    logits, labels, attention_mask, weights = make_batch(2, 6, 3, 5)
    logits.requires_grad_(True)
    compute_mtp_ce_loss(logits, labels, attention_mask, weights)["weighted_ce_loss"].backward()
    assert weights.grad is None and logits.grad is not None

    weights.requires_grad_(True)
    out = compute_mtp_ce_loss(logits.detach(), labels, attention_mask, weights)
    out["unweighted_ce_loss"].backward()  # does not depend on the weights
    assert torch.count_nonzero(weights.grad) == 0


def _bad_calls():
    logits, labels, mask, weights = make_batch(2, 5, 3, 4)
    yield "logits", (logits[0], labels, mask), {}, ValueError
    yield "logits", (logits.long(), labels, mask), {}, TypeError
    yield "labels", (logits, labels[:, :4], mask), {}, ValueError
    yield "labels", (logits, labels.double(), mask), {}, TypeError
    yield "attention_mask", (logits, labels, mask[0]), {}, ValueError
    yield "weights", (logits, labels, mask, weights[0]), {}, ValueError
    yield "weights", (logits, labels, mask, weights.to(torch.complex128)), {}, TypeError
    yield "weight_alignment", (logits, labels, mask, torch.rand(2, 5, 3, dtype=torch.float64)), {}, ValueError
    yield "weight_alignment", (logits, labels, mask, weights), {"weight_alignment": "next"}, ValueError
    yield "normalize", (logits, labels, mask), {"normalize": "sum"}, ValueError
    yield "head_average", (logits, labels, mask), {"head_average": "mean"}, ValueError
    yield "n_future", (logits, labels, mask), {"n_future": 4}, ValueError
    yield "n_future", (logits, labels, mask), {"n_future": 0}, ValueError
    yield "chunk_size", (logits, labels, mask), {"chunk_size": 0}, ValueError
    yield "overwrite_logits", (logits, labels, mask), {"overwrite_logits": "yes"}, TypeError
    out_of_range = labels.clone()
    out_of_range[0, 3] = 4
    yield "labels", (logits, out_of_range, mask), {}, ValueError


@pytest.mark.parametrize(("argument", "args", "kwargs", "error"), list(_bad_calls()))
def test_bad_input_names_the_argument(argument, args, kwargs, error):
    with pytest.raises(error, match=argument):
        compute_mtp_ce_loss(*args, **kwargs)


def test_an_empty_batch_and_narrow_integer_labels_read_as_cross_entropy_reads_them():
    empty = compute_mtp_ce_loss(torch.randn(0, 7, 3, 11), torch.zeros(0, 7, dtype=torch.long), torch.ones(0, 7))
    assert float(empty["weighted_ce_loss"]) == 0.0
    logits, labels, attention_mask, weights = make_batch(2, 7, 3, 200)
    labels = labels.clamp_min(0)
    labels[0, 3] = 156  # -100 as a uint8 would be 156: it must stay a token
    wide = compute_mtp_ce_loss(logits, labels, attention_mask, weights)
    narrow = compute_mtp_ce_loss(logits, labels.to(torch.uint8), attention_mask, weights)
    for key in ("weighted_ce_loss", "unweighted_ce_loss", "per_head_ce_loss"):
        torch.testing.assert_close(narrow[key], wide[key], atol=0, rtol=0)


@pytest.mark.parametrize("mask_ignored_labels", [True, False])
def test_non_finite_logits_at_an_ignored_label_count_zero_as_cross_entropy_counts_them(mask_ignored_labels):
    """Padding rows whose attention was fully masked come out NaN; cross_entropy gives exactly 0 at an
    ignored label whatever the logits, so the loss must stay the loop's, not NaN."""
    logits, labels, attention_mask, weights = make_batch(2, 7, 3, 11)
    labels[1, -3:] = -100
    logits = logits.detach().clone()
    logits[1, -4:-1] = float("nan")  # every head's row whose label (t + k) is one of those ignored
    logits[1, -4:-1, :, 0] = float("-inf")
    with torch.no_grad():
        ours = compute_mtp_ce_loss(logits, labels, attention_mask, weights, mask_ignored_labels=mask_ignored_labels)
        loop = reference_mtp_ce_loss(logits, labels, attention_mask, weights, mask_ignored_labels=mask_ignored_labels)
    for key in ("weighted_ce_loss", "unweighted_ce_loss", "per_head_ce_loss"):
        assert torch.isfinite(loop[key]).all()
        torch.testing.assert_close(ours[key], loop[key], atol=1e-12, rtol=0)


@pytest.mark.parametrize(("seq", "n_future"), [(1, 4), (2, 4), (3, 5), (4, 4), (4, 9)])
@pytest.mark.parametrize("weights", ["2d", "3d"])
def test_n_future_above_the_heads_where_the_extra_heads_have_no_position(seq, n_future, weights):
    """docs/semantics.md: the loop never indexes a head with no position (k >= S), so n_future may
    exceed the logits' heads there; those heads count as empty in the average."""
    logits, labels, attention_mask, weight_tensor = make_batch(2, seq, 3, 11, weights=weights, ignored_prefix=0,
                                                               padding=0)
    alignment = {"2d": "target", "3d": "input"}[weights]
    ours = losses_and_grads(compute_mtp_ce_loss, logits, labels, attention_mask, weight_tensor, n_future=n_future,
                            weight_alignment=alignment)
    loop = losses_and_grads(reference_mtp_ce_loss, logits, labels, attention_mask, weight_tensor,
                            n_future=n_future, weight_alignment=alignment)
    assert_same(ours, loop, atol=1e-12)


def test_n_future_above_the_heads_with_a_position_to_read_is_refused():
    logits, labels, attention_mask, _ = make_batch(2, 5, 3, 11)
    with pytest.raises(ValueError, match=r"n_future must be an int in \[1, 3\].*k >= seq = 5"):
        compute_mtp_ce_loss(logits, labels, attention_mask, n_future=4)
