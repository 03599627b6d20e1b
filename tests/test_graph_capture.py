"""graph_capture: compiled training passes give the eager step's losses and update, do not recompile in the steady
state, and fall back to eager passes (repeating the iteration) when capture fails in the forward or the backward.

The captures here use ``aot_eager`` (forward and backward traced and replayed without generating kernels), so the
suite needs no compiler; a GPU run (benchmarks/gpu_check.py) measures ``inductor`` with CUDA graphs."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from ignite.engine import Events
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

from scripts.training.cross_teaching import CrossTeachingTrainer
from scripts.training.graph_capture import GraphCapture, capture_mode
from tests.cross_teaching_fixtures import slice_batch

torch.set_num_threads(1)


def _trainer(iterations: int, capture: bool, backend="aot_eager") -> CrossTeachingTrainer:
    torch.manual_seed(0)
    net_a = BasicUNet(2, 1, 3, features=(4, 4, 8, 8, 16, 4), dropout=0.0)
    net_b = BasicUNet(2, 1, 3, features=(4, 4, 8, 8, 16, 4), dropout=0.0)
    return CrossTeachingTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[slice_batch(i) for i in range(iterations)],
        epoch_length=iterations,
        net_a=net_a,
        optimizer_a=torch.optim.AdamW(net_a.parameters(), lr=1e-2),
        net_b=net_b,
        optimizer_b=torch.optim.AdamW(net_b.parameters(), lr=1e-2),
        supervised_loss=DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5),
        consistency_weight=0.3,
        rsl_weight=0.5,
        w2s_weight=1.0,
        w2s_threshold=0.5,
        w2s_dropout=0.5,  # the feature dropout runs inside the captured pass (one persistent hook)
        graph_capture=capture,
        capture_backend=backend,
    )


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_captured_passes_give_the_eager_losses_and_update_and_do_not_recompile():
    graphs = []
    captured = _trainer(4, capture=True)
    captured.add_event_handler(Events.ITERATION_COMPLETED, lambda e: graphs.append(counters["stats"]["unique_graphs"]))
    assert captured.capture.active and captured.capture.forward(captured.network) is not captured.network
    captured.run()
    eager = _trainer(4, capture=False)
    assert not eager.capture.active and eager.capture.forward(eager.network) is eager.network
    eager.run()
    # one graph per network at most (no graph breaks); the two identical U-Nets may share theirs
    assert graphs[0] in (1, 2), f"graphs compiled: {graphs[0]}"
    assert graphs[1:] == [graphs[0]] * 3, f"recompiled in the steady state: graphs per iteration {graphs}"
    assert captured.capture.failure is None and captured.capture.active
    terms_c, terms_e = captured.state.output["terms"], eager.state.output["terms"]
    assert set(terms_c) == set(terms_e) and terms_c["fp_a"].item() > 0
    for key in terms_c:
        assert terms_c[key].item() == pytest.approx(terms_e[key].item(), rel=1e-4, abs=1e-5), key
    for net_c, net_e in ((captured.network, eager.network), (captured.net_b, eager.net_b)):
        for p, q in zip(net_c.parameters(), net_e.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # the networks themselves are not replaced: their state_dict keys are the eager ones
    assert list(captured.network.state_dict()) == list(eager.network.state_dict())


def _failing_compiler(gm, example_inputs):
    raise RuntimeError("no kernels for this machine")


def _backward_fails_at_run(gm, example_inputs):
    def run(*args):
        raise RuntimeError("CUDA graph replay failed")

    return make_boxed_func(run)


@pytest.mark.parametrize(
    "backend, where",
    [
        (_failing_compiler, "forward"),
        (aot_autograd(fw_compiler=lambda gm, ex: gm, bw_compiler=_backward_fails_at_run), "backward"),
    ],
)
def test_a_failed_capture_falls_back_to_eager_and_repeats_the_iteration(backend, where, caplog):
    trainer = _trainer(3, capture=True, backend=backend)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    with caplog.at_level(logging.WARNING, logger="scripts.training.graph_capture"):
        trainer.run()
    assert trainer.state.iteration == 3
    assert not trainer.capture.active and "RuntimeError" in trainer.capture.failure, where
    assert "off after a failure" in trainer.capture.describe()
    assert sum("capturing the training passes failed" in r.getMessage() for r in caplog.records) == 1
    terms = trainer.state.output["terms"]
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert any(not torch.equal(p, q) for p, q in zip(trainer.network.parameters(), before)), "no update"


def test_an_error_of_the_step_itself_is_not_hidden_by_the_fallback():
    trainer = _trainer(1, capture=True)
    trainer.loss_function = lambda logits, label: logits.sum() * torch.ones(3)[:5].sum(dim=7)  # a bug in a loss
    with pytest.raises(Exception, match="out of range"):
        trainer.run()
    assert trainer.capture.failure is not None  # it tried eager once, and eager raised the same error


def test_the_capture_friendly_upcat_is_upcat_and_the_networks_are_one_graph_each():
    from monai.networks.nets.basic_unet import UpCat

    from scripts.training.graph_capture import upcat_forward
    from scripts.training.networks import SwinUNETR2D

    torch.manual_seed(0)
    up = UpCat(2, 8, 4, 4, act="relu", norm="instance", bias=True, dropout=0.0, upsample="deconv")
    for skip in (
        (1, 4, 10, 10),
        (1, 4, 11, 10),
        (1, 4, 11, 11),
    ):  # even sizes, and odd ones (the one-voxel replicate pad)
        x, x_e = torch.rand(1, 8, 5, 5), torch.rand(*skip)
        torch.testing.assert_close(upcat_forward(up, x, x_e), up(x, x_e))
    unet = BasicUNet(2, 1, 3, features=(4, 4, 8, 8, 16, 4), dropout=0.0)
    assert torch._dynamo.explain(unet)(torch.rand(2, 1, 32, 32)).graph_count > 1  # MONAI's UpCat splits the graph
    GraphCapture([unet], enabled=True, backend="aot_eager")
    assert torch._dynamo.explain(unet)(torch.rand(2, 1, 32, 32)).graph_count == 1
    swin = SwinUNETR2D(1, 3, feature_size=12)
    assert torch._dynamo.explain(swin)(torch.rand(2, 1, 64, 64)).graph_count == 1
    with pytest.raises(ValueError, match="divisible by 32"):
        swin._check_input_size((64, 48))


def test_capture_mode_and_the_off_switch():
    assert capture_mode("cuda") == "reduce-overhead" and capture_mode("cpu") == "default"
    net = torch.nn.Linear(2, 2)
    off = GraphCapture([net, None], enabled=False)
    assert off.forward(net) is net and not off.active and off.describe() == "off (eager)"
    with pytest.raises(ValueError, match="the step's own"):  # nothing captured: the error is the step's, raised
        off.fall_back(ValueError("the step's own error"))
    on = GraphCapture([net, None], enabled=True, backend="aot_eager")
    assert on.active and on.forward(net) is not net and "aot_eager" in on.describe()


def test_the_config_switch_reaches_the_trainer(tmp_path_factory):
    from tests.cross_teaching_fixtures import make_rsl_datalist, run_trainer

    data = make_rsl_datalist(tmp_path_factory.mktemp("phantom"))
    trainer = run_trainer(
        tmp_path_factory.mktemp("run"),
        ["train.yaml", "variant_no_reps.yaml"],  # the default with SCL (REPS needs a registration folder)
        data["rsl"],
        num_iterations=2,
        val_interval=2,
        graph_capture="true",
        capture_backend="aot_eager",
        cl_num_anchors=50,
        cl_num_negatives=50,
    )
    assert trainer.capture.enabled and trainer.capture.failure is None, trainer.capture.failure
    terms = trainer.state.output["terms"]
    assert {"cl_a", "cl_b", "strong_a", "fp_b"} <= set(terms) and "rsl_a" not in terms  # no RSL in the default
    assert all(torch.isfinite(v).all() for v in terms.values())
