"""Transform storage: round trip, torch export, resume after a kill, failures recorded, settings guard."""

import numpy as np
import pytest
import torch

from scripts.data.atomic_io import write_json
from scripts.registration.engine import PairResult, PairSpec
from scripts.registration.runner import RegistrationRunner
from scripts.registration.store import StoreError, TransformStore, load_transforms_torch, settings_key
from scripts.registration.synthetic import known_affine, oblique_affine
from scripts.registration.transform import PairTransform


def _result(f, m, k=0.0, field=False, ok=True):
    t = known_affine((0, 0, k), (1, 1, 1), (k, 0, 0))
    tr = (
        PairTransform(t, np.full((3, 2, 3, 2), k, np.float32), oblique_affine((9, 9, 9), (2, 3, 2)))
        if field
        else PairTransform(t)
    )
    if not ok:
        return PairResult(f, m, None, "failed", "diverged: test")
    return PairResult(f, m, tr, metric=0.5, seconds=0.1)


def test_commit_load_consolidate_round_trip(tmp_path):
    store = TransformStore(tmp_path / "s", {"engine": "x"})
    store.commit([_result("a", "b", 1.0), _result("b", "a", 2.0, field=True)])
    store.commit([_result("a", "c", ok=False)])
    table = store.consolidate()
    assert not (tmp_path / "s" / "batches").exists()
    assert (tmp_path / "s" / "transforms.npz").exists() and (tmp_path / "s" / "fields.h5").exists()
    again = TransformStore(tmp_path / "s").load()
    assert again.keys() == table.keys() == [("a", "b"), ("b", "a"), ("a", "c")]
    np.testing.assert_allclose(again.get("a", "b").matrix, known_affine((0, 0, 1.0), (1, 1, 1), (1.0, 0, 0)))
    assert again.get("b", "a").field.shape == (3, 2, 3, 2) and float(again.get("b", "a").field[0, 0, 0, 0]) == 2.0
    assert again.get("a", "c") is None and again.get("x", "y") is None
    assert again.failures() == [{"fixed": "a", "moving": "c", "status": "failed", "reason": "diverged: test"}]
    keys, mats, ok = load_transforms_torch(tmp_path / "s")
    assert isinstance(mats, torch.Tensor) and mats.shape == (3, 4, 4) and ok.tolist() == [True, True, False]


def test_settings_mismatch_is_refused(tmp_path):
    TransformStore(tmp_path, {"engine": "torch", "lr": 1})
    with pytest.raises(StoreError, match="other settings"):
        TransformStore(tmp_path, {"engine": "torch", "lr": 2})
    assert settings_key({"engine": "torch", "lr": 1}) != settings_key({"engine": "torch", "lr": 2})
    assert settings_key({"engine": "torch", "deformable": True}).startswith("torch_deformable_")


class _FakeEngine:
    """Records calls; raises KeyboardInterrupt (a kill) on the batch number ``die_at``."""

    name = "fake"

    def __init__(self, die_at=None):
        self.calls, self.die_at = [], die_at

    def settings(self):
        return {"engine": "fake"}

    def register_batch(self, pairs):
        if self.die_at is not None and len(self.calls) == self.die_at:
            raise KeyboardInterrupt
        self.calls.append([p.key for p in pairs])
        return [_result(p.fixed_id, p.moving_id, ok=p.moving_id != "bad") for p in pairs]


def _runner(tmp_path, engine):
    write_json(tmp_path / "dl.json", {"training": [{"id": "q", "image": "q.nii.gz", "label": "q_l.nii.gz"}]})
    runner = RegistrationRunner(tmp_path / "dl.json", tmp_path / "out", engine="torch", batch_size=2, progress=False)
    runner.engine, runner.settings = engine, engine.settings()
    runner.output_dir = tmp_path / "out" / settings_key(runner.settings)
    return runner


def test_resume_after_kill_loses_no_finished_batch(tmp_path):
    pairs = [PairSpec(f"u{n}", "x", m, "y") for n in range(3) for m in ("q", "bad")]
    runner = _runner(tmp_path, _FakeEngine(die_at=2))
    with pytest.raises(KeyboardInterrupt):
        runner.register(pairs)
    # a half-written temporary file of the killed batch must not count
    (runner.output_dir / "batches" / ".batch_00002.npz.tmp.npz").write_bytes(b"partial")
    done = TransformStore(runner.output_dir).done()
    assert done == {p.key for p in pairs[:4]}
    second = _FakeEngine()
    runner.engine = second
    runner.register(pairs)
    assert second.calls == [[p.key for p in pairs[4:]]]  # only the unfinished pairs
    table = TransformStore(runner.output_dir).consolidate()
    assert set(table.keys()) == {p.key for p in pairs}
    assert sorted(f["fixed"] for f in table.failures()) == ["u0", "u1", "u2"]  # recorded, not retried
    third = _FakeEngine()
    runner.engine = third
    runner.register(pairs)
    assert third.calls == []


def test_input_errors_are_retried_on_the_next_run(tmp_path):
    """A pair whose volume could not be read is not 'done'; its later result replaces the error."""
    from scripts.registration.engine import INPUT_ERROR, PairResult
    from scripts.registration.store import TransformStore
    from scripts.registration.transform import PairTransform

    store = TransformStore(tmp_path, settings={"engine": "test"})
    store.commit(
        [
            PairResult("a", "b", None, INPUT_ERROR, "load: truncated file"),
            PairResult("a", "c", None, "failed", "diverged"),
            PairResult("b", "a", PairTransform(np.eye(4))),
        ]
    )
    assert store.done() == {("a", "c"), ("b", "a")}  # the diverged pair is final, the unreadable one is not
    assert {f["status"] for f in store.load().failures()} == {INPUT_ERROR, "failed"}
    store.commit([PairResult("a", "b", PairTransform(np.eye(4)))])  # the file was fixed
    table = store.consolidate()
    assert store.done() == {("a", "b"), ("a", "c"), ("b", "a")}
    assert table.get("a", "b") is not None and len(table) == 3
