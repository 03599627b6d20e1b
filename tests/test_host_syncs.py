"""A steady-state training iteration never makes the host wait for the device.

Each variant's trainer, built from the bundle's configs with its handlers as a user runs them, trains
a few iterations on the phantom; two later iterations (not a ``log_every`` one, whose single host
copy of the losses is the one allowed read) run under :class:`scripts.training.host_syncs.HostSyncCounter`,
which must see no synchronising operation (``.item()``, ``.tolist()``, ``nonzero``, ``unique``, boolean-mask
indexing, tensor-sized ``repeat_interleave``, device -> host copies). The counted iterations are neither a
``log_every`` one nor an epoch's last (iterations 3 and 6 copy the losses to the host, by design). The CPU runs the same code path
as a GPU, so this holds there too; on a CUDA machine the test also runs on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from scripts.training.host_syncs import HostSyncCounter
from tests.cross_teaching_fixtures import FAST, ROOT, make_rsl_datalist

VARIANTS = ["default", "cct_r", "cts", "ls", "mcsc", "uamt"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def datalists(tmp_path_factory):
    return make_rsl_datalist(tmp_path_factory.mktemp("syncs"))


def counted_iterations(
    run_dir, variant: str, datalists: dict, device: str, iterations: int = 6, counted=(4, 5)
) -> HostSyncCounter:
    configs = ["train.yaml"] + ([] if variant == "default" else [f"variant_{variant}.yaml"])
    registered = variant in ("default", "cct_r")  # REPS needs the registration step's transforms
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in configs])
    parser.update(
        {
            **FAST,
            "bundle_root": str(run_dir),
            "datalist_file": datalists["plain" if registered else "rsl"],
            "num_iterations": iterations,
            "val_interval": iterations,
            "log_every": 3,
            "device": f"$torch.device('{device}')",
            "registration_workers": 1,
            "registration_torch_settings#iterations": [5, 3],
            "registration_torch_settings#num_points": 256,
            "cl_num_anchors": 50,
            "cl_num_negatives": 50,
        }
    )
    counter = HostSyncCounter(where=True)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        set_determinism(seed=0)
        trainer = parser.get_parsed_content("train#trainer")

        def start(engine):
            if engine.state.iteration in counted:
                counter.__enter__()

        def end(engine):  # attached last: every handler of the iteration has run inside the count
            if engine.state.iteration in counted:
                counter.__exit__(None, None, None)

        trainer.add_event_handler(Events.ITERATION_STARTED, start)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, end)
        trainer.run()
    finally:
        os.chdir(cwd)
    return counter


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_steady_state_iterations_issue_no_host_sync(tmp_path, datalists, variant, device):
    counter = counted_iterations(tmp_path, variant, datalists, device)
    assert counter.total > 100  # the counter saw the iterations
    assert not counter.syncs, f"{variant} on {device}: host syncs {dict(counter.syncs)} at {dict(counter.where)}"


def test_the_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with HostSyncCounter() as c:
        float(x.sum())
        x[x > 2]
        torch.nonzero(x)
        torch.unique(x)
        x.masked_select(x > 1)
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0]))
        y = x.clone()
        y[x > 4] = 0.0
    names = set(c.syncs)
    assert {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::masked_select",
        "aten::index (boolean mask)",
        "aten::repeat_interleave (tensor repeats)",
    } <= names
    assert any("unique" in n for n in names) and any(n.startswith("aten::index_put") for n in names)
    with HostSyncCounter() as quiet:  # fixed-size, masked work is not a sync
        torch.where(x > 2, x, 0.0).sum()
        torch.topk(x, 3).indices
        x.repeat_interleave(2)
    assert not quiet.syncs and quiet.total > 0
