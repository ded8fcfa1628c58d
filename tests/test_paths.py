"""wldm_auto.paths: lazy data roots and nnU-Net-style dataset id resolution."""
from __future__ import annotations

from pathlib import Path

import pytest

from wldm_auto import paths
from wldm_auto.paths import (
    PREPROCESSED,
    RAW,
    RESULTS,
    PathNotSetError,
    dataset_folder_name,
    parse_dataset_id,
    resolve_dataset_name,
)


@pytest.fixture(autouse=True)
def no_roots(monkeypatch):
    for variable in (RAW, PREPROCESSED, RESULTS):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def pre_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "preprocessed"
    folder.mkdir()
    monkeypatch.setenv(PREPROCESSED, str(folder))
    return folder


@pytest.mark.parametrize("variable, getter", [
    (RAW, paths.raw_root), (PREPROCESSED, paths.preprocessed_root), (RESULTS, paths.results_root),
])
@pytest.mark.parametrize("value", [None, "", "   "])
def test_unset_root_names_the_variable(monkeypatch, variable, getter, value):
    if value is not None:
        monkeypatch.setenv(variable, value)
    with pytest.raises(PathNotSetError) as info:
        getter()
    assert f"environment variable {variable} is not set" in str(info.value)
    assert f"export {variable}=" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_roots_are_read_lazily(monkeypatch, tmp_path):
    monkeypatch.setenv(RESULTS, str(tmp_path / "a"))
    assert paths.results_root() == tmp_path / "a"
    monkeypatch.setenv(RESULTS, str(tmp_path / "b"))  # no caching at import or first call
    assert paths.results_root() == tmp_path / "b"
    assert not (tmp_path / "b").exists()
    assert paths.results_root(create=True) == tmp_path / "b"
    assert (tmp_path / "b").is_dir()


def test_root_strips_and_expands(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(PREPROCESSED, "  ~/pre  ")
    assert paths.preprocessed_root(create=True) == tmp_path / "pre"
    assert (tmp_path / "pre").is_dir()


def test_unknown_variable_is_explained_generically(monkeypatch):
    monkeypatch.delenv("wldm_nothing", raising=False)
    with pytest.raises(PathNotSetError, match="wldm_nothing is not set.*a data folder"):
        paths.root("wldm_nothing")


@pytest.mark.parametrize("text, expected", [
    (1, 1), ("1", 1), ("001", 1), (" 042 ", 42), ("Dataset001_X", 1), ("Dataset999_a-b_c", 999),
    ("x", None), ("Dataset1_X", None), ("Dataset001", None), ("Dataset001_", None), ("", None), ("-1", None),
])
def test_parse_dataset_id(text, expected):
    assert parse_dataset_id(text) == expected


@pytest.mark.parametrize("given", [1, "1", "001", "Dataset001_Pelvis", " 01 "])
def test_resolve_accepts_id_forms(raw_dir, given):
    (raw_dir / "Dataset001_Pelvis").mkdir()
    (raw_dir / "Dataset002_Brain").mkdir()
    assert resolve_dataset_name(given) == "Dataset001_Pelvis"


def test_resolve_looks_in_preprocessed_too(raw_dir, pre_dir):
    (pre_dir / "Dataset007_Only_Pre").mkdir()
    assert resolve_dataset_name(7) == "Dataset007_Only_Pre"
    with pytest.raises(ValueError, match="no dataset with id 007"):
        resolve_dataset_name(7, search_in=(RAW,))


def test_resolve_same_name_in_two_roots_is_not_ambiguous(raw_dir, pre_dir):
    (raw_dir / "Dataset003_Same").mkdir()
    (pre_dir / "Dataset003_Same").mkdir()
    assert resolve_dataset_name("3") == "Dataset003_Same"


def test_resolve_unknown_id(raw_dir):
    (raw_dir / "Dataset001_Pelvis").mkdir()
    (raw_dir / "Dataset002_NotAFolder").write_text("a file, not a dataset")
    with pytest.raises(ValueError) as info:
        resolve_dataset_name(2)
    assert "no dataset with id 002" in str(info.value)
    assert f"{RAW}={raw_dir}" in str(info.value)


@pytest.mark.parametrize("where", ["raw", "both"])
def test_resolve_ambiguous_id(raw_dir, pre_dir, where):
    (raw_dir / "Dataset005_A").mkdir()
    (raw_dir if where == "raw" else pre_dir).joinpath("Dataset005_B").mkdir()
    with pytest.raises(ValueError) as info:
        resolve_dataset_name("005")
    assert "ambiguous" in str(info.value)
    assert "Dataset005_A" in str(info.value) and "Dataset005_B" in str(info.value)
    # the full name picks one of them
    assert resolve_dataset_name("Dataset005_B") == "Dataset005_B"


def test_resolve_full_name_never_substitutes_another_dataset(raw_dir):
    (raw_dir / "Dataset001_Bar").mkdir()
    with pytest.raises(ValueError) as info:
        resolve_dataset_name("Dataset001_Foo")
    assert "Dataset001_Foo" in str(info.value) and "Dataset001_Bar" in str(info.value)


@pytest.mark.parametrize("text", ["Pelvis", "Dataset1_X", "dataset001_x", "1.5", "", "Dataset001"])
def test_resolve_rejects_non_id_text(raw_dir, text):
    (raw_dir / "Dataset001_Pelvis").mkdir()
    with pytest.raises(ValueError, match="is not a dataset id"):
        resolve_dataset_name(text)


def test_resolve_without_roots():
    # a full name passes through unchecked (like nnU-Net); a bare id needs a root to look in
    assert resolve_dataset_name("Dataset004_Foo") == "Dataset004_Foo"
    with pytest.raises(PathNotSetError, match=RAW):
        resolve_dataset_name(4)
    with pytest.raises(PathNotSetError, match=PREPROCESSED):
        resolve_dataset_name(4, search_in=(PREPROCESSED,))


@pytest.mark.parametrize("dataset_id, name, expected", [
    (1, "X", "Dataset001_X"), (42, "Pelvis_MR-CT", "Dataset042_Pelvis_MR-CT"), (999, "a1", "Dataset999_a1"),
    ("7", "x", "Dataset007_x"),
])
def test_dataset_folder_name(dataset_id, name, expected):
    assert dataset_folder_name(dataset_id, name) == expected
    assert parse_dataset_id(expected) == int(dataset_id)


@pytest.mark.parametrize("dataset_id", [0, -1, 1000, 12345])
def test_dataset_folder_name_bad_id(dataset_id):
    with pytest.raises(ValueError, match=f"1..999, got {dataset_id}"):
        dataset_folder_name(dataset_id, "X")


@pytest.mark.parametrize("name", ["", "a b", "a/b", "_x", "-x", "Pelvis!", "Bäcken", "x.y"])
def test_dataset_folder_name_bad_name(name):
    with pytest.raises(ValueError, match="may only hold letters, digits"):
        dataset_folder_name(1, name)


def test_model_folder_name_round_trips_and_refuses_ambiguous_parts():
    from wldm_auto.paths import model_folder_name, parse_model_folder_name

    assert model_folder_name("DiffusionTrainer") == "DiffusionTrainer__wldmPlans__3d_wldm"
    name = model_folder_name("VAETrainer_noSMD", "myPlans", "3d_lowres")
    assert parse_model_folder_name(name) == ("VAETrainer_noSMD", "myPlans", "3d_lowres")
    assert parse_model_folder_name(f"/results/Dataset001_X/{name}") == ("VAETrainer_noSMD", "myPlans", "3d_lowres")
    for bad in (("A__B", "p", "c"), ("", "p", "c"), ("A", "p/q", "c")):
        with pytest.raises(ValueError, match="without '__'"):
            model_folder_name(*bad)
    for bad in ("DiffusionTrainer", "a__b", "a____c", "a__b__c__d"):
        with pytest.raises(ValueError, match="not a model folder name"):
            parse_model_folder_name(bad)
