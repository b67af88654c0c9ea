"""`timeline.analyse` on hand-made records: peak, the phase it falls in, and what filled it."""

import pytest

from vramplan.footprint import Category
from vramplan.timeline import Record, analyse, composition_at

W, A, T = Category.FROZEN_WEIGHTS, Category.ACTIVATIONS, Category.TEMPORARIES


def step_records():
    # load: weights 1000; forward: two activations and a temporary; backward frees them
    return [
        Record(1000, 1, None, W),
        Record(300, 2, 6, A),
        Record(200, 3, 5, A),
        Record(50, 4, 5, T),
        Record(400, 7, 8, T),
    ]


PHASES = [("load", 1), ("forward", 2), ("backward", 5)]


def test_peak_and_composition():
    a = analyse(step_records(), PHASES)
    # live after each event 1..8: 1000, 1300, 1500, 1550, 1300 (two frees), 1000, 1400, 1000
    assert a.peak_bytes == 1550 and a.peak_event == 4
    assert a.peak_phase == "forward"
    assert a.composition == {W: 1000, A: 500, T: 50}
    assert sum(a.composition.values()) == a.peak_bytes


def test_phase_peaks():
    a = analyse(step_records(), PHASES)
    peaks = {name: (peak, comp) for name, peak, comp in a.phase_peaks}
    assert [name for name, _, _ in a.phase_peaks] == ["load", "forward", "backward"]
    assert peaks["load"] == (1000, {W: 1000})
    assert peaks["forward"] == (1550, {W: 1000, A: 500, T: 50})
    # what is live when a phase starts counts for it: backward begins with the forward's peak
    assert peaks["backward"] == (1550, {W: 1000, A: 500, T: 50})


def test_peak_in_a_later_phase():
    records = [Record(10, 1, 2, T), Record(99, 3, None, A)]
    a = analyse(records, [("a", 1), ("b", 3)])
    assert (a.peak_bytes, a.peak_event, a.peak_phase) == (99, 3, "b")


def test_the_first_event_that_reaches_the_peak_wins():
    records = [Record(100, 1, 2, T), Record(100, 3, None, A)]
    a = analyse(records, [("a", 1), ("b", 3)])
    assert (a.peak_event, a.peak_phase, a.composition) == (1, "a", {T: 100})


def test_uncategorised_records_count_as_temporaries():
    a = analyse([Record(7, 1)], [("x", 1)])
    assert a.composition == {T: 7}


def test_alloc_and_free_at_the_same_event_net_out():
    # one tensor freed exactly when the next is allocated: never both live
    a = analyse([Record(100, 1, 2, T), Record(100, 2, None, A)], [("x", 1)])
    assert a.peak_bytes == 100


def test_constant_bytes_are_present_throughout():
    a = analyse([Record(10, 1, 2, T)], [("x", 1)], constant={W: 1000})
    assert a.peak_bytes == 1010
    assert a.composition == {W: 1000, T: 10}


def test_no_records():
    a = analyse([], [("x", 1)])
    assert a.peak_bytes == 0 and a.composition == {}


def test_composition_at_counts_alloc_inclusive_and_free_exclusive():
    records = [Record(5, 2, 4, A)]
    assert composition_at(records, 1) == {}
    assert composition_at(records, 2) == {A: 5}
    assert composition_at(records, 3) == {A: 5}
    assert composition_at(records, 4) == {}


def test_a_phase_without_events_reports_what_is_live():
    a = analyse([Record(100, 1, None, W)], [("a", 1), ("b", 3)])
    (_, _, _), (name, peak, comp) = a.phase_peaks
    assert name == "b"
    assert peak == sum(comp.values()) == 100


@pytest.mark.parametrize("options", [{"model": "sd15", "method": "lora", "gpu": "8GB"},
                                     {"model": "sd15", "method": "lora", "gpus": "2x6GB"}])
def test_a_search_leaves_no_cyclic_garbage(options):
    """The CLI freezes what fit's search leaves alive (`gc_paused(freeze=True)`): that is only
    safe while nothing the search drops is held by a reference cycle, which the collector would
    then never find. Run it with the collector off and unfrozen, and count what a collection
    finds."""
    import gc

    import vramplan.estimate.step as step
    import vramplan.fit.walk as walk
    from vramplan.fit import fit_request, search
    from vramplan.spec import build_spec
    from vramplan.timeline import gc_paused

    walk.clear_cache()
    step.clear_reuse()
    gc.collect()
    with gc_paused():
        search(fit_request(build_spec(options)))
        found = gc.collect()
    assert found == 0
