"""Retention: which checkpoints to delete, as a pure function of plain data."""

from __future__ import annotations

from syncckpt.retention import Ref, plan_deletions, recency


def step(n: int, epoch: int = 0, healthy: bool = True) -> Ref:
    return Ref(f"checkpoint-step-{n}", "step", n, epoch, healthy)


def epoch_ref(e: int, global_step: int, healthy: bool = True) -> Ref:
    return Ref(f"checkpoint-epoch-{e}", "epoch", global_step, e, healthy)


BEST = Ref("best_model", "best", 150, 0)


def test_keep_last_keeps_the_newest_step_checkpoints():
    refs = [step(n) for n in (500, 100, 300, 200, 400)]
    assert plan_deletions(refs, keep_last=2, keep_epochs=3) == [
        "checkpoint-step-100",
        "checkpoint-step-200",
        "checkpoint-step-300",
    ]
    assert plan_deletions(refs, keep_last=1, keep_epochs=3) == [
        "checkpoint-step-100",
        "checkpoint-step-200",
        "checkpoint-step-300",
        "checkpoint-step-400",
    ]
    assert plan_deletions(refs, keep_last=10, keep_epochs=3) == []


def test_keep_last_orders_by_number_not_by_name():
    refs = [step(900), step(1000), step(80)]
    assert plan_deletions(refs, keep_last=1, keep_epochs=0) == ["checkpoint-step-80", "checkpoint-step-900"]


def test_keep_epochs_keeps_the_newest_epoch_checkpoints():
    refs = [epoch_ref(e, 100 * (e + 1)) for e in range(5)] + [step(500)]
    assert plan_deletions(refs, keep_last=1, keep_epochs=2) == [
        "checkpoint-epoch-0",
        "checkpoint-epoch-1",
        "checkpoint-epoch-2",
    ]


def test_keep_epochs_zero_deletes_every_epoch_checkpoint_but_the_newest_healthy_one():
    refs = [epoch_ref(0, 100), epoch_ref(1, 200), step(150)]
    assert plan_deletions(refs, keep_last=1, keep_epochs=0) == ["checkpoint-epoch-0"]
    refs = [epoch_ref(0, 100), epoch_ref(1, 200), step(250)]
    assert plan_deletions(refs, keep_last=1, keep_epochs=0) == ["checkpoint-epoch-0", "checkpoint-epoch-1"]


def test_best_model_is_always_kept():
    refs = [BEST, step(100), step(200), epoch_ref(0, 120), epoch_ref(1, 180)]
    assert "best_model" not in plan_deletions(refs, keep_last=1, keep_epochs=0)
    unhealthy_best = Ref("best_model", "best", 10, 0, healthy=False)
    assert plan_deletions([unhealthy_best, step(20)], keep_last=1, keep_epochs=0) == []


def test_protected_names_are_kept():
    refs = [step(100), step(200), step(300), epoch_ref(0, 50), epoch_ref(1, 250)]
    deleted = plan_deletions(refs, keep_last=1, keep_epochs=1, protected={"checkpoint-step-100", "checkpoint-epoch-0"})
    assert deleted == ["checkpoint-step-200"]
    assert plan_deletions(refs, keep_last=1, keep_epochs=1, protected=["checkpoint-step-999"]) == [
        "checkpoint-epoch-0",
        "checkpoint-step-100",
        "checkpoint-step-200",
    ]


def test_newest_healthy_is_kept_when_newer_ones_are_unhealthy():
    refs = [step(100), step(200, healthy=False), step(300, healthy=False)]
    assert plan_deletions(refs, keep_last=1, keep_epochs=3) == ["checkpoint-step-200"]
    refs = [step(100), step(200), step(300, healthy=False), step(400, healthy=False)]
    assert plan_deletions(refs, keep_last=2, keep_epochs=3) == ["checkpoint-step-100"]


def test_newest_healthy_may_be_an_epoch_checkpoint():
    refs = [epoch_ref(0, 100), epoch_ref(1, 200), step(250, healthy=False), step(150)]
    assert plan_deletions(refs, keep_last=1, keep_epochs=0) == ["checkpoint-epoch-0", "checkpoint-step-150"]


def test_once_a_newer_healthy_checkpoint_exists_the_old_healthy_one_goes():
    refs = [step(100), step(200, healthy=False), step(300)]
    assert plan_deletions(refs, keep_last=1, keep_epochs=3) == ["checkpoint-step-100", "checkpoint-step-200"]


def test_all_unhealthy_keeps_only_what_the_counts_say():
    refs = [step(100, healthy=False), step(200, healthy=False)]
    assert plan_deletions(refs, keep_last=1, keep_epochs=3) == ["checkpoint-step-100"]


def test_nothing_to_do():
    assert plan_deletions([], keep_last=1, keep_epochs=3) == []
    assert plan_deletions([step(1)], keep_last=1, keep_epochs=0) == []


def test_recency_orders_by_step_then_epoch_over_best_over_step():
    refs = [BEST, Ref("checkpoint-epoch-0", "epoch", 150, 0), step(150), step(149), step(151)]
    assert [r.name for r in sorted(refs, key=recency, reverse=True)] == [
        "checkpoint-step-151",
        "checkpoint-epoch-0",
        "best_model",
        "checkpoint-step-150",
        "checkpoint-step-149",
    ]
