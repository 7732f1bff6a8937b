"""Ingest: every input format, every bad-input class, and the real 18 studies."""

import json
import os
import zipfile

import pytest

from psych201_jax.data import metadata, records

pytestmark = pytest.mark.quick

GOOD = {"text": "You see A or B. You choose <<A>>.\nAgain. You choose <<B>>.", "experiment": "e1", "participant": 7}


def _write_study(tmp_path, lines, study="toystudy", name="prompts.jsonl"):
    folder = tmp_path / study
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def _read(path):
    return list(records.iter_records(path))


def _only_rejection(path):
    items = _read(path)
    rejected = [r for r in items if isinstance(r, records.Rejected)]
    assert len(rejected) == 1, items
    return rejected[0]


def test_good_record_fields(tmp_path):
    path = _write_study(tmp_path, [GOOD])
    (rec,) = _read(path)
    assert isinstance(rec, records.Record)
    assert (rec.study, rec.experiment, rec.participant, rec.line) == ("toystudy", "e1", "7", 1)
    assert rec.metadata == {c: "N/A" for c in metadata.META_COLUMNS}


BAD_CASES = {
    "malformed_json": ('{"text": "You <<A>>", "participant": ', "malformed JSON"),
    "not_an_object": ('["You <<A>>"]', "expected an object"),
    "missing_text": ({"experiment": "e1", "participant": 1}, "missing field 'text'"),
    "empty_text": ({**GOOD, "text": "   "}, "empty text"),
    "text_wrong_type": ({**GOOD, "text": 42}, "field 'text' must be a string"),
    "missing_participant": ({"text": GOOD["text"], "experiment": "e1"}, "missing field 'participant'"),
    "participant_wrong_type": ({**GOOD, "participant": [1]}, "must be a string or an integer"),
    "participant_float": ({**GOOD, "participant": 1.5}, "must be a string or an integer"),
    "missing_experiment": ({"text": GOOD["text"], "participant": 1}, "missing field 'experiment'"),
    "experiment_wrong_type": ({**GOOD, "experiment": 3}, "field 'experiment' must be a string"),
    "no_marker": ({**GOOD, "text": "no responses here."}, "no response marker"),
    "unclosed_marker": ({**GOOD, "text": "You choose <<A. Done."}, "is never closed"),
    "stray_close": ({**GOOD, "text": "You choose A>> and <<B>>."}, "closes no '<<'"),
    "nested_marker": ({**GOOD, "text": "You choose <<A <<B>>>>."}, "nested marker"),
    "no_space_before_marker": ({**GOOD, "text": "You choose:<<A>>."}, "not preceded by a space"),
    "marker_at_start": ({**GOOD, "text": "<<A>> was chosen."}, "not preceded by a space"),
    "empty_response": ({**GOOD, "text": "You choose <<>>."}, "empty response"),
    "rts_wrong_type": ({**GOOD, "RTs": "fast"}, "field 'RTs' must be a list"),
    "rts_non_numeric": ({**GOOD, "RTs": [1.0, "slow"]}, "non-numeric"),
    "rts_length": ({**GOOD, "RTs": [1.0]}, "has 1 entries but the text has 2 responses"),
    "metadata_wrong_type": ({**GOOD, "age": [30, 31]}, "field 'age' must be a scalar"),
    "lone_surrogate": (
        '{"text": "You pick \\ud83d <<A>>.", "experiment": "e1", "participant": 7}',
        "not valid Unicode",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_is_rejected_with_location_and_reason(tmp_path, case):
    line, reason = BAD_CASES[case]
    path = _write_study(tmp_path, [GOOD, line])
    items = _read(path)
    assert len(items) == 2 and isinstance(items[0], records.Record)
    bad = items[1]
    assert isinstance(bad, records.Rejected)
    assert reason in bad.reason
    assert (bad.study, bad.line, bad.source) == ("toystudy", 2, path)
    if isinstance(line, dict) and isinstance(line.get("participant"), int):
        assert bad.participant == str(line["participant"])
    assert "toystudy" in bad.describe() and "line 2" in bad.describe()


def test_duplicate_participant_in_same_experiment_is_rejected(tmp_path):
    path = _write_study(tmp_path, [GOOD, {**GOOD, "experiment": "e2"}, GOOD])
    items = _read(path)
    assert [type(i).__name__ for i in items] == ["Record", "Record", "Rejected"]
    assert "duplicate participant id" in items[2].reason and "line 1" in items[2].reason
    assert items[2].participant == "7"


def test_build_fixes_are_applied_to_raw_text(tmp_path):
    text = "Rate it. You say <<-3>>. You <<skip>>. More Details >> here. You choose <<A>>."
    (rec,) = _read(_write_study(tmp_path, [{**GOOD, "text": text}]))
    assert rec.text == "Rate it. You say << -3>>. You <<skip>>.. More Details -> here. You choose <<A>>."


def test_zip_with_macosx_and_other_member_name(tmp_path):
    folder = tmp_path / "zipstudy"
    folder.mkdir()
    with zipfile.ZipFile(folder / "prompts.jsonl.zip", "w") as zf:
        zf.writestr("__MACOSX/._data.jsonl", b"\x00\x05garbage")
        zf.writestr("data.jsonl", json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "participant": 8}) + "\n")
    items = _read(str(tmp_path))
    assert [i.participant for i in items] == ["7", "8"]
    assert all(isinstance(i, records.Record) and i.study == "zipstudy" for i in items)
    assert items[0].source.endswith("prompts.jsonl.zip!data.jsonl")


def _hf_row(**over):
    row = {
        "text": GOOD["text"],
        "study": "s1",
        "experiment": "s1/exp.csv",
        "participant": "abc",
        "participant_reindexed": "0",
        "RTs": [float("nan"), 1.0],
        **{c: "N/A" for c in metadata.META_COLUMNS},
    }
    row.update(over)
    return row


def test_hf_layout_parquet_and_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        _hf_row(),
        _hf_row(participant_reindexed="1", age="31.0", gender="female"),
        _hf_row(participant_reindexed="2", text="no markers"),
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000.parquet")
    with open(tmp_path / "more.jsonl", "w") as fh:
        fh.write(json.dumps(_hf_row(study="s2")) + "\n")
    items = _read(str(tmp_path))
    assert [(i.study, i.participant, type(i).__name__) for i in items] == [
        ("s2", "0", "Record"),
        ("s1", "0", "Record"),
        ("s1", "1", "Record"),
        ("s1", "2", "Rejected"),
    ]
    assert items[2].metadata["age"] == "31.0" and items[2].metadata["gender"] == "female"
    assert items[3].line == 3 and "no response marker" in items[3].reason


def test_hf_dataset_name_offline_gives_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(records.DataError, match="huggingface-cli download marcelbinz/Psych-201-test"):
        list(records.iter_records("hf:marcelbinz/Psych-201-test"))


def test_missing_path_gives_clear_error(tmp_path):
    with pytest.raises(records.DataError, match="no such file or directory"):
        list(records.iter_records(str(tmp_path / "nope")))
    with pytest.raises(records.DataError, match="no prompts.jsonl"):
        list(records.iter_records(str(tmp_path)))


def _readme_counts(data_root):
    """{study: (participants, responses)} from the data README's per-study table."""
    expected = {}
    with open(os.path.join(data_root, "README.md")) as fh:
        for line in fh:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and cells[1].isdigit() and not cells[0].startswith("**"):
                expected[cells[0]] = (int(cells[1]), int(cells[2]))
    return expected


def test_list_of_paths_and_comma_list(data_root):
    a, b = f"{data_root}/thoma2025riskychoice", f"{data_root}/franke2024bayesian"
    from_list = [(r.study, r.participant) for r in records.iter_records([a, b])]
    from_commas = [(r.study, r.participant) for r in records.iter_records(f"{a},{b}")]
    counts = _readme_counts(data_root)
    assert from_list == from_commas
    assert len(from_list) == counts["thoma2025riskychoice"][0] + counts["franke2024bayesian"][0] > 0


def test_iter_records_streams(data_root):
    """The largest study yields its first record without reading the whole file."""
    import tracemalloc

    study = f"{data_root}/alsobay2025publicGoodsGame"
    with zipfile.ZipFile(f"{study}/prompts.jsonl.zip") as zf:
        size = max(info.file_size for info in zf.infolist())  # 1.2 MB vendored, 75 MB in the full corpus
    tracemalloc.start()
    first = next(records.iter_records(study))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(first, records.Record)
    assert peak < size / 3  # reading the whole file would hold all of it


def test_all_real_studies_read_cleanly(data_root):
    """Participant and response counts equal the data README's table, with no rejection."""
    expected = _readme_counts(data_root)
    assert len(expected) == 18
    counts: dict[str, list[int]] = {}
    for item in records.iter_records(data_root):
        assert isinstance(item, records.Record), item.describe()
        c = counts.setdefault(item.study, [0, 0])
        c[0] += 1
        c[1] += item.text.count("<<")
    assert {k: tuple(v) for k, v in counts.items()} == expected


def test_hf_layout_numeric_and_missing_metadata(tmp_path):
    """A numeric parquet column: NaN is missing (not the persona answer "nan"), numbers are cast."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_hf_row(participant_reindexed=str(i)) for i in range(2)]
    table = pa.Table.from_pylist(rows).set_column(list(rows[0]).index("age"), "age", pa.array([float("nan"), 37.0]))
    pq.write_table(table, tmp_path / "t.parquet")
    first, second = _read(str(tmp_path))
    assert first.metadata["age"] == "N/A" and not metadata.has_persona(first.metadata)
    assert second.metadata["age"] == "37.0"
