from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly_rl.data.errors import DataError
from anomaly_rl.data.records import Sample
from anomaly_rl.data.splits import Splits, make_splits, sample_key


def fake(category: str, split: str, defect: str, index: int) -> Sample:
    anomalous = defect != "good"
    return Sample(image_path=f"/data/{category}/{split}/{defect}/{index:03d}.png",
                  label="anomalous" if anomalous else "normal", category=category, defect_type=defect,
                  mask_path=f"/data/{category}/ground_truth/{defect}/{index:03d}_mask.png" if anomalous else None,
                  boxes=((1.0, 1.0, 3.0, 3.0),) if anomalous else (), image_size=(8, 8), split=split)


def dataset(train_good: int = 10, test_good: int = 5, test_bad: int = 12) -> list[Sample]:
    """MVTec-shaped: anomalous only in test; file names repeat across folders as in MVTec."""
    out = []
    for category in ("bottle", "grid"):
        out += [fake(category, "train", "good", i) for i in range(train_good)]
        out += [fake(category, "test", "good", i) for i in range(test_good)]
        out += [fake(category, "test", "crack" if i % 2 else "hole", i) for i in range(test_bad)]
    return out


def paths(samples: list[Sample]) -> set[str]:
    return {s.image_path for s in samples}


def assert_no_leak(splits: Splits) -> None:
    train, val, test = paths(splits.train), paths(splits.val), paths(splits.test)
    assert not train & val and not train & test and not val & test
    used_refs = {r for s in splits.all() for r in s.reference_paths}
    assert not used_refs & (val | test)


def test_few_shot_takes_k_of_each_label_per_category_and_removes_them_from_eval() -> None:
    samples = dataset()
    splits = make_splits(samples, shots=3, seed=0)
    assert Counter((s.category, s.label) for s in splits.train) == {
        ("bottle", "normal"): 3, ("bottle", "anomalous"): 3, ("grid", "normal"): 3, ("grid", "anomalous"): 3}
    # Normal shots come from train/good (never evaluated); anomalous shots from the test split.
    assert all("/train/good/" in s.image_path for s in splits.train if not s.is_anomalous)
    assert_no_leak(splits)
    test_split = paths([s for s in samples if s.split == "test"])
    shot_paths = paths(splits.train)
    assert paths(splits.test) == test_split - shot_paths
    assert {s.split for s in splits.train} == {"train"} and {s.split for s in splits.test} == {"test"}


def test_shots_are_seeded() -> None:
    samples = dataset()
    a, b = make_splits(samples, shots=2, seed=1), make_splits(list(reversed(samples)), shots=2, seed=1)
    assert paths(a.train) == paths(b.train)  # input order does not matter
    others = [paths(make_splits(samples, shots=2, seed=s).train) for s in range(2, 8)]
    assert any(o != paths(a.train) for o in others)


def test_full_split_with_and_without_anomalous_training_share() -> None:
    samples = dataset()
    plain = make_splits(samples)
    assert Counter(s.label for s in plain.train) == {"normal": 20}
    assert len(plain.test) == 2 * (5 + 12)
    share = make_splits(samples, train_anomalous_fraction=0.75, seed=0)
    assert Counter((s.category, s.label) for s in share.train) == {
        ("bottle", "normal"): 10, ("bottle", "anomalous"): 9, ("grid", "normal"): 10, ("grid", "anomalous"): 9}
    assert Counter(s.label for s in share.test) == {"normal": 10, "anomalous": 6}
    assert_no_leak(share)


def test_shots_take_precedence_over_the_fraction() -> None:
    splits = make_splits(dataset(), shots=2, train_anomalous_fraction=0.5)
    assert Counter(s.label for s in splits.train) == {"normal": 4, "anomalous": 4}


def test_validation_split_is_balanced_seeded_and_disjoint() -> None:
    splits = make_splits(dataset(), shots=1, val_size=4, seed=0)
    assert Counter((s.category, s.label) for s in splits.val) == {
        ("bottle", "normal"): 2, ("bottle", "anomalous"): 2, ("grid", "normal"): 2, ("grid", "anomalous"): 2}
    assert {s.split for s in splits.val} == {"val"}
    assert_no_leak(splits)
    assert len(splits.val) + len(splits.test) == 2 * (5 + 12 - 1)
    assert paths(make_splits(dataset(), shots=1, val_size=4, seed=0).val) == paths(splits.val)
    # One label short: the other fills the rest.
    short = make_splits(dataset(test_good=1), val_size=5, seed=0)
    assert Counter(s.label for s in short.val if s.category == "grid") == {"normal": 1, "anomalous": 4}


def test_categories_subset_and_unknown() -> None:
    splits = make_splits(dataset(), categories=["grid"], shots=1)
    assert {s.category for s in splits.all()} == {"grid"}
    with pytest.raises(DataError, match=r"unknown category \['carpet'\].*available: \['bottle', 'grid'\]"):
        make_splits(dataset(), categories=["carpet"])


def test_references_come_from_training_normals_of_the_same_category() -> None:
    splits = make_splits(dataset(), shots=2, val_size=2, num_references=3, seed=5)
    train_normals = {s.image_path: s for s in dataset() if s.split == "train" and s.label == "normal"}
    for s in splits.all():
        assert len(s.reference_paths) == 3 and len(set(s.reference_paths)) == 3
        assert s.image_path not in s.reference_paths
        assert all(r in train_normals and train_normals[r].category == s.category for r in s.reference_paths)
    assert_no_leak(splits)
    shuffled = dataset()
    random.Random(0).shuffle(shuffled)
    again = make_splits(shuffled, shots=2, val_size=2, num_references=3, seed=5)
    assert {s.image_path: s.reference_paths for s in again.all()} == {
        s.image_path: s.reference_paths for s in splits.all()}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"shots": 11}, "shots=11 but category 'bottle' has only 10 normal training"),
     ({"val_size": 18}, "val_size=18"), ({"num_references": 10}, "only 9 normal training"),
     ({"shots": 0}, "shots"), ({"train_anomalous_fraction": 1.5}, "train_anomalous_fraction")],
)
def test_impossible_requests_are_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        make_splits(dataset(), **kwargs)


def test_too_few_anomalous_images_for_the_shots() -> None:
    with pytest.raises(DataError, match="shots=13 but category 'bottle' has only 12 anomalous"):
        make_splits(dataset(train_good=20), shots=13)


def test_sample_key_separates_repeated_file_names() -> None:
    assert sample_key(fake("bottle", "train", "good", 0)) != sample_key(fake("bottle", "test", "good", 0))


@settings(max_examples=40, deadline=None)
@given(shots=st.one_of(st.none(), st.integers(1, 8)), fraction=st.sampled_from([None, 0.0, 0.3, 1.0]),
       val=st.integers(0, 3), refs=st.integers(0, 2), seed=st.integers(0, 2**31))
def test_nothing_trained_is_evaluated(shots, fraction, val, refs, seed) -> None:
    samples = dataset(train_good=8, test_good=4, test_bad=9)
    splits = make_splits(samples, shots=shots, train_anomalous_fraction=fraction, val_size=val,
                         num_references=refs, seed=seed)
    assert_no_leak(splits)
    # Every test-split image is accounted for exactly once, unless it trained.
    test_split = paths([s for s in samples if s.split == "test"])
    assert (paths(splits.val) | paths(splits.test)) == test_split - paths(splits.train)
