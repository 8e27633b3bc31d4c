"""Few-shot data: discovery, class names, sampling, preprocessing, and every error."""

from __future__ import annotations

import pytest

from cbpt.data import discover, load_batch, sample_shots
from cbpt_guard.artifacts import read_classes
from cbpt_guard.errors import UsageError, UserError
from tests.helpers import make_image_folder


def test_image_folder_classes_from_folder_names(tmp_path):
    root = make_image_folder(tmp_path / "d", {"cat": 3, "traffic_light": 2})
    ds = discover(root)
    assert ds.classnames == ("cat", "traffic light")
    assert ds.counts() == [3, 2]


def test_classes_file_fixes_the_order_and_matches_underscored_folders(tmp_path):
    root = make_image_folder(tmp_path / "d", {"cat": 3, "traffic_light": 2})
    (tmp_path / "classes.txt").write_text("traffic light\ncat\n")
    ds = discover(root, read_classes(tmp_path / "classes.txt"))
    assert ds.classnames == ("traffic light", "cat") and ds.counts() == [2, 3]


def test_class_names_that_do_not_match_are_named(tmp_path):
    root = make_image_folder(tmp_path / "d", {"cat": 1, "dog": 1})
    with pytest.raises(UserError, match=r"no folder for class\(es\) 'bird'.*folder\(s\) 'dog' not in the classes file"):
        discover(root, ["cat", "bird"])


def test_empty_class_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "d", {"cat": 2})
    (root / "dog").mkdir()
    with pytest.raises(UserError, match="class 'dog' has no images"):
        discover(root)


def test_unreadable_images_are_named(tmp_path):
    from open_clip.transform import image_transform

    root = make_image_folder(tmp_path / "d", {"cat": 2, "dog": 2})
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = discover(root)
    with pytest.raises(UserError, match=r"1 unreadable image\(s\): .*broken\.png"):
        load_batch(ds, image_transform(16, is_train=False))


def test_load_batch_uses_the_models_preprocessing(tmp_path):
    from open_clip.transform import image_transform

    ds = discover(make_image_folder(tmp_path / "d", {"a": 2, "b": 1}, size=40))
    x, y = load_batch(ds, image_transform(16, is_train=False))
    assert tuple(x.shape) == (3, 3, 16, 16) and y.tolist() == [0, 0, 1]


def test_csv_with_names_and_indices(tmp_path):
    root = make_image_folder(tmp_path / "d", {"cat": 2, "dog": 2})
    (tmp_path / "d" / "shots.csv").write_text("path,label\ncat/000.png,cat\ndog/001.png,1\ndog/000.png,dog\n")
    ds = discover(tmp_path / "d" / "shots.csv", ["cat", "dog"])
    assert ds.labels == (0, 1, 1) and ds.paths[0] == root / "cat" / "000.png"
    (tmp_path / "d" / "bad.csv").write_text("cat/000.png,bird\n")
    with pytest.raises(UserError, match="class names do not match"):
        discover(tmp_path / "d" / "bad.csv", ["cat", "dog"])


def test_csv_missing_files_are_named(tmp_path):
    (tmp_path / "s.csv").write_text("nope.png,cat\n")
    with pytest.raises(UserError, match="do not exist: .*nope.png"):
        discover(tmp_path / "s.csv")


def test_missing_source_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="data not found"):
        discover(tmp_path / "nothing")


def test_shots_are_per_class_seeded_and_disjoint_from_the_rest(tmp_path):
    ds = discover(make_image_folder(tmp_path / "d", {"a": 10, "b": 12}))
    shots, rest = sample_shots(ds, 4, seed=1)
    again, _ = sample_shots(ds, 4, seed=1)
    other, _ = sample_shots(ds, 4, seed=2)
    assert shots.counts() == [4, 4] and len(rest) == 14
    assert shots.paths == again.paths and shots.paths != other.paths
    assert not set(shots.paths) & set(rest.paths)


def test_too_few_images_for_the_shots(tmp_path):
    ds = discover(make_image_folder(tmp_path / "d", {"a": 10, "b": 3}))
    with pytest.raises(UserError, match=r"too few images for --shots 4: 'b' has 3; lower --shots to 3"):
        sample_shots(ds, 4)


@pytest.mark.parametrize(("k", "held"), [(1, 0), (2, 0), (4, 0), (7, 0), (8, 2), (16, 4), (32, 8)])
def test_the_shot_budget_holds_out_a_quarter_of_k_from_8_shots_up(k, held):
    from cbpt.data import ShotBudget

    budget = ShotBudget(k)
    assert budget.held() == held and budget.tuning() + budget.held() == k


def test_held_out_shots_come_out_of_the_k_and_no_image_is_both(tmp_path):
    from cbpt.data import ShotBudget, split_held_out

    ds = discover(make_image_folder(tmp_path / "d", {"a": 20, "b": 17, "c": 16}))
    chosen, _ = sample_shots(ds, ShotBudget(16).shots, seed=3)
    tune, held = split_held_out(chosen, ShotBudget(16).held(), seed=3)
    assert tune.counts() == [12, 12, 12] and held.counts() == [4, 4, 4]
    assert not set(tune.paths) & set(held.paths)
    assert set(tune.paths) | set(held.paths) == set(chosen.paths)  # K in all: nothing on top
    again, _ = split_held_out(chosen, 4, seed=3)
    assert again.paths == tune.paths


def test_a_held_out_count_outside_the_budget_is_refused():
    from cbpt.data import ShotBudget

    with pytest.raises(UsageError, match=r"--held-out must be between 0 and --shots - 1 \(3\), got 4"):
        ShotBudget(4, held_out=4).check()
    ShotBudget(4, held_out=3).check()
