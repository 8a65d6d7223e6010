"""The fixture pipelines: after/ is exactly the tool's output, and it trains identically.

``fixtures/pipelines`` is a project of its own (its ``pyproject.toml``), a folder of
scripts without a ``weighted_mtp`` package: the utility is vendored beside them.
"""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mtp_migrate.config import SHIPPED_UTILITY, VENDORED_MODULE
from mtp_migrate.runner import migrate_file
from mtp_migrate.vendoring import utility_target

PIPELINES = Path(__file__).parents[1] / "fixtures" / "pipelines"
NAMES = ["run_verifiable", "run_baseline", "run_rho1"]


def _load(path: Path):
    """The pipeline as ``python path`` loads it: its own folder first on ``sys.path``."""
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop(VENDORED_MODULE, None)  # before/ has none: it must not find after/'s
    return module


@pytest.mark.parametrize("name", NAMES)
def test_after_is_exactly_the_tool_output(name):
    result = migrate_file(PIPELINES / "before" / f"{name}.py", verify=False, cache=False)
    assert result.output == (PIPELINES / "after" / f"{name}.py").read_bytes()
    assert result.sites and all(site.action.value != "skipped" or site.refusal for site in result.sites)
    assert migrate_file(PIPELINES / "after" / f"{name}.py", verify=False, cache=False).output == result.output


def test_the_utility_is_vendored_beside_the_pipelines():
    vendored = PIPELINES / "before" / f"{VENDORED_MODULE}.py"
    assert utility_target(PIPELINES / "before").writes == {vendored: (b"", SHIPPED_UTILITY.read_bytes())}
    assert (PIPELINES / "after" / vendored.name).read_bytes() == SHIPPED_UTILITY.read_bytes()
    assert utility_target(PIPELINES / "after").writes == {}


def _train_and_validate(module, dtype, lr=0.1, fp64_loss=False):
    """One training step and one validation pass; returns metrics and parameter gradients.

    ``fp64_loss`` hands the loss fp64 copies of the model's logits: the model computes in
    ``dtype`` as usual, the loss exactly.
    """
    tiny = _load(PIPELINES / "tiny_mtp.py")
    torch.manual_seed(0)
    model, reference = tiny.TinyMTP(), tiny.TinyMTP()
    for network in (model, reference):
        network.to(dtype)
        if fp64_loss:
            forward = network.forward
            network.forward = lambda ids, forward=forward: {k: v.double() for k, v in forward(ids).items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = [tiny.make_batch(seed) for seed in range(4)]
    name = module.__name__.split("_", 1)[1]
    if name == "run_verifiable":
        metrics = module.train_step(model, optimizer, batches[0], batches[1])
        metrics |= module.validate_verifiable(model, batches[2:])
    elif name == "run_baseline":
        metrics = module.train_step(model, optimizer, batches[0])
        metrics |= module.validate_baseline(model, batches[2:])
    else:
        metrics = module.train_step(model, reference, optimizer, batches[0])
        metrics |= module.validate_rho1(model, batches[2:])
    grads = {param_name: copy.deepcopy(param.grad) for param_name, param in model.named_parameters()}
    return metrics, grads


@pytest.mark.parametrize("name", NAMES)
def test_before_and_after_train_identically_in_fp64(name):
    before_metrics, before_grads = _train_and_validate(_load(PIPELINES / "before" / f"{name}.py"), torch.float64)
    after_metrics, after_grads = _train_and_validate(_load(PIPELINES / "after" / f"{name}.py"), torch.float64)
    assert after_metrics.keys() == before_metrics.keys()
    for key, value in before_metrics.items():
        assert after_metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert after_grads.keys() == before_grads.keys()
    assert before_grads["heads.weight"].abs().sum() > 0
    for param_name, grad in before_grads.items():
        if grad is None:  # a parameter this pipeline does not train
            assert after_grads[param_name] is None, param_name
        else:
            torch.testing.assert_close(after_grads[param_name], grad, rtol=1e-10, atol=1e-12, msg=param_name)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_error_is_no_worse_than_the_loops(name):
    """The bf16 rule: against the loop in fp64 on the same bf16 model, after/ errs no more than before/.

    lr=0 keeps the parameters of the validation pass identical across the three runs.
    """
    before, after = _load(PIPELINES / "before" / f"{name}.py"), _load(PIPELINES / "after" / f"{name}.py")
    exact_metrics, exact_grads = _train_and_validate(before, torch.bfloat16, lr=0.0, fp64_loss=True)
    old_metrics, old_grads = _train_and_validate(before, torch.bfloat16, lr=0.0)
    new_metrics, new_grads = _train_and_validate(after, torch.bfloat16, lr=0.0)
    for key, exact in exact_metrics.items():
        if isinstance(exact, float):
            old_error, new_error = abs(old_metrics[key] - exact), abs(new_metrics[key] - exact)
            assert new_error <= old_error * 1.01 + 1e-6, (key, new_error, old_error)
    for param_name, exact in exact_grads.items():
        if exact is not None:
            old_error = (old_grads[param_name].double() - exact.double()).norm()
            new_error = (new_grads[param_name].double() - exact.double()).norm()
            assert new_error <= old_error * 1.01 + 1e-6, (param_name, new_error, old_error)
