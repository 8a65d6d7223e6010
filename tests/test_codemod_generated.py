"""Hypothesis-generated loop variants: every supported spelling is rewritten, and exactly.

Names, index arithmetic, mask and weight forms, accumulators, guards and averages are
drawn independently, so the recogniser is tested on loops nobody wrote by hand.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtp_migrate.runner import migrate_source

IDENTIFIER = st.sampled_from(["k", "h", "head", "j", "step"])
NAMES = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "q", "r", "u", "x", "y", "z"]),
                 min_size=8, max_size=8, unique=True)


@st.composite
def loop_variants(draw):
    k = draw(IDENTIFIER)
    lg, tg, ms, wt, ce, den, acc_w, acc_u = (f"{n}_{i}" for i, n in enumerate(draw(NAMES)))
    zero_based = draw(st.booleans())
    head = f"{k} + 1" if zero_based else k  # the 1-based head number as an expression
    length = f"seq_len - ({head})"
    head_index = k if zero_based else f"{k} - 1"
    alignment = draw(st.sampled_from(["target", "previous", "input"]))
    weight_slice = {"target": f"[:, {head}:]", "previous": f"[:, {head} - 1:-1]", "input": f"[:, :{length}]"}[alignment]
    label_mask = draw(st.booleans())
    outputs = draw(st.sampled_from(["both", "weighted", "unweighted"]))
    accumulate = draw(st.sampled_from(["+=", "= acc +"]))
    init = draw(st.sampled_from(["0.0", "0", "torch.tensor(0.0, dtype=torch.float64)", "torch.zeros((), dtype=torch.float64)"]))
    average = draw(st.sampled_from(["/=", "= acc /"]))
    guard = draw(st.booleans())
    view = draw(st.sampled_from(["reshape(-1, vocab_size)", "contiguous().view(-1, vocab_size)"]))

    def add(name, value):
        return f"{name} += {value}" if accumulate == "+=" else f"{name} = {name} + {value}"

    def avg(name):
        return f"{name} /= n_future" if average == "/=" else f"{name} = {name} / n_future"

    mask_expr = f"attention_mask[:, {head}:].reshape(-1).float()"
    if label_mask:
        mask_expr += f" * (labels[:, {head}:].reshape(-1) != -100).float()"
    lines = [
        "import torch",
        "import torch.nn.functional as F",
        "",
        "",
        "def compute(logits, labels, attention_mask, weights):",
        "    batch_size, seq_len, n_future, vocab_size = logits.shape",
    ]
    accumulators = {"both": [acc_w, acc_u], "weighted": [acc_w], "unweighted": [acc_u]}[outputs]
    lines += [f"    {name} = {init}" for name in accumulators]
    lines.append(f"    for {k} in range({'n_future' if zero_based else '1, n_future + 1'}):")
    if guard:
        lines += [f"        if {length} <= 0:", "            continue"]
    lines += [
        f"        {lg} = logits[:, :{length}, {head_index}]",
        f"        {tg} = labels[:, {head}:]",
        f"        {ms} = {mask_expr}",
        f"        {wt} = weights{weight_slice}.reshape(-1)",
        f"        {ce} = F.cross_entropy({lg}.{view}, {tg}.reshape(-1), reduction=\"none\")",
        f"        {den} = {ms}.sum()",
        f"        if {den} > 0:",
    ]
    if acc_w in accumulators:
        lines.append(f"            {add(acc_w, f'({ce} * {wt} * {ms}).sum() / {den}')}")
    if acc_u in accumulators:
        lines.append(f"            {add(acc_u, f'({ce} * {ms}).sum() / {den}')}")
    lines += [f"    {avg(name)}" for name in accumulators]
    lines.append(f"    return {', '.join(accumulators)},")
    return "\n".join(lines) + "\n"


def _run(source: str, seed: int):
    namespace = {}
    exec(compile(source, "<generated>", "exec"), namespace)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 7, (2, 6), generator=gen)
    labels[:, :2] = -100
    attention_mask = torch.ones(2, 6)
    attention_mask[1, 4:] = 0
    attention_mask[0, 3] = 0
    logits = torch.randn(2, 6, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    outputs = namespace["compute"](logits, labels, attention_mask, weights)
    sum(o * (i + 2) for i, o in enumerate(outputs)).backward()
    return [o.detach() for o in outputs], logits.grad, weights.grad


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loop_variants(), st.integers(0, 1000))
def test_generated_variant_is_rewritten_exactly(source, seed):
    result = migrate_source(source.encode())
    assert [site.action.value for site in result.sites] == ["rewritten"], (result.sites, source)
    output = result.output.decode()
    assert "for " not in output.split("def compute", 1)[1]
    assert migrate_source(result.output).output == result.output
    want_outputs, want_logits_grad, want_weights_grad = _run(source, seed)
    got_outputs, got_logits_grad, got_weights_grad = _run(output, seed)
    for got, want in zip(got_outputs, want_outputs, strict=True):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_logits_grad, want_logits_grad, atol=1e-12, rtol=1e-12)
    if want_weights_grad is None:
        assert got_weights_grad is None or not got_weights_grad.any()
    else:
        torch.testing.assert_close(got_weights_grad, want_weights_grad, atol=1e-12, rtol=1e-12)
