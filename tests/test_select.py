"""Selection: the order in which resume tries candidates, and when a remote copy must be downloaded."""

from __future__ import annotations

from syncckpt.select import Candidate, order_candidates


def cand(name: str, step: int, location: str = "local", sha: str = "a" * 64, healthy: bool = True) -> Candidate:
    kind = "best" if name == "best_model" else ("epoch" if "epoch" in name else "step")
    return Candidate(name, kind, step, 0, location, sha, healthy)


def order(cands: list[Candidate]) -> list[tuple[str, str]]:
    return [(c.name, c.location) for c in order_candidates(cands)]


def test_newest_global_step_first():
    cands = [cand("checkpoint-step-100", 100), cand("checkpoint-step-300", 300), cand("checkpoint-step-200", 200)]
    assert [n for n, _ in order(cands)] == ["checkpoint-step-300", "checkpoint-step-200", "checkpoint-step-100"]


def test_on_equal_steps_epoch_beats_best_beats_step():
    """At an epoch's end the step checkpoint was taken before validation and the epoch/best ones after it."""
    cands = [cand("best_model", 500), cand("checkpoint-step-500", 500), cand("checkpoint-epoch-1", 500)]
    assert [n for n, _ in order(cands)] == ["checkpoint-epoch-1", "best_model", "checkpoint-step-500"]


def test_a_newer_epoch_or_best_beats_an_older_step():
    cands = [cand("checkpoint-step-500", 500), cand("checkpoint-epoch-1", 501), cand("best_model", 502)]
    assert [n for n, _ in order(cands)] == ["best_model", "checkpoint-epoch-1", "checkpoint-step-500"]


def test_healthy_before_unhealthy_even_when_older():
    cands = [
        cand("checkpoint-step-900", 900, healthy=False),
        cand("checkpoint-step-100", 100),
        cand("checkpoint-step-800", 800, healthy=False),
        cand("checkpoint-epoch-0", 50),
    ]
    assert [n for n, _ in order(cands)] == [
        "checkpoint-step-100",
        "checkpoint-epoch-0",
        "checkpoint-step-900",
        "checkpoint-step-800",
    ]


def test_local_before_remote_for_the_same_checkpoint():
    cands = [cand("checkpoint-step-5", 5, "remote"), cand("checkpoint-step-5", 5, "local")]
    assert order(cands) == [("checkpoint-step-5", "local"), ("checkpoint-step-5", "remote")]


def test_a_newer_remote_beats_an_older_local():
    cands = [cand("checkpoint-step-5", 5, "local"), cand("checkpoint-step-6", 6, "remote")]
    assert order(cands) == [("checkpoint-step-6", "remote"), ("checkpoint-step-5", "local")]


def test_order_candidates_accepts_any_iterable_and_empty():
    assert order_candidates(iter([])) == []
    assert len(order_candidates(cand(f"checkpoint-step-{i}", i) for i in range(3))) == 3
