"""Early stopping decisions against hand-worked sequences."""

from __future__ import annotations

from gradwise.train.stopping import EarlyStopping


def test_min_mode_with_patience_and_min_delta():
    stopper = EarlyStopping("val_loss", "min", patience=2, min_delta=0.01)
    improved = []
    for step, value in enumerate([1.0, 0.8, 0.795, 0.79, 0.7], start=1):
        if stopper.should_stop:
            break
        improved.append(stopper.update(value, step))
    # 0.795 and 0.79 are within min_delta of 0.8: two bad evaluations stop it before 0.7 is seen.
    assert improved == [True, True, False, False]
    assert stopper.should_stop
    assert stopper.best == 0.8 and stopper.best_step == 2
    assert "did not improve for 2 evaluations" in (stopper.stop_reason or "")


def test_max_mode_resets_patience_on_improvement():
    stopper = EarlyStopping("val_accuracy", "max", patience=2, min_delta=0.0)
    for step, value in enumerate([0.5, 0.4, 0.6, 0.55, 0.58], start=1):
        stopper.update(value, step)
    assert stopper.best == 0.6 and stopper.best_step == 3
    assert stopper.should_stop


def test_without_patience_never_stops_but_tracks_best():
    stopper = EarlyStopping("val_loss", "min", patience=None, min_delta=0.0)
    for step, value in enumerate([3.0, 2.0, 4.0, 5.0, 6.0, 7.0], start=1):
        stopper.update(value, step)
    assert not stopper.should_stop
    assert stopper.best == 2.0


def test_nan_is_never_an_improvement():
    stopper = EarlyStopping("val_loss", "min", patience=None, min_delta=0.0)
    assert stopper.update(float("nan"), 1) is False
    assert stopper.update(1.0, 2) is True
    assert stopper.update(float("nan"), 3) is False
    assert stopper.best == 1.0


def test_state_round_trip():
    a = EarlyStopping("val_loss", "min", patience=3, min_delta=0.0)
    for step, value in enumerate([1.0, 1.1, 1.2], start=1):
        a.update(value, step)
    b = EarlyStopping("val_loss", "min", patience=3, min_delta=0.0)
    b.load_state_dict(a.state_dict())
    assert b.update(1.3, 4) is False and b.should_stop
