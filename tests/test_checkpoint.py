"""Checkpoint files: checksummed, no pickle, a corrupt latest falls back to the previous one."""
import numpy as np
import pytest

from pipeline import checkpoint


def packed(value):
    return checkpoint.pack({"0.w": np.full((2, 3), value, np.float32)}, {"step": np.array(value)},
                           {"dropout": np.array('{"state": 1}')}, {"epoch": int(value), "history": [{"a": 0.1}]})


def test_pack_read_unpack_round_trip(tmp_path):
    checkpoint.write_latest(tmp_path, packed(3))
    model, opt, rng, state = checkpoint.unpack(checkpoint.read(tmp_path / checkpoint.LATEST))
    assert model["0.w"].dtype == np.float32 and np.all(model["0.w"] == 3)
    assert int(opt["step"]) == 3 and str(rng["dropout"]) == '{"state": 1}'
    assert state == {"epoch": 3, "history": [{"a": 0.1}]}


def test_latest_becomes_previous(tmp_path):
    checkpoint.write_latest(tmp_path, packed(1))
    checkpoint.write_latest(tmp_path, packed(2))
    assert checkpoint.unpack(checkpoint.read(tmp_path / checkpoint.PREVIOUS))[3]["epoch"] == 1
    assert checkpoint.unpack(checkpoint.load_newest(tmp_path))[3]["epoch"] == 2


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_latest_falls_back_to_previous_with_a_warning(tmp_path, damage):
    checkpoint.write_latest(tmp_path, packed(1))
    checkpoint.write_latest(tmp_path, packed(2))
    latest = tmp_path / checkpoint.LATEST
    data = bytearray(latest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # flip a byte inside the stored array data: the zip still opens, the checksum catches it
        raw = np.full((2, 3), 2, np.float32).tobytes()
        at = bytes(data).index(raw)
        data[at] ^= 0xFF
    latest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="older checkpoint"):
        arrays = checkpoint.load_newest(tmp_path)
    assert checkpoint.unpack(arrays)[3]["epoch"] == 1


def test_no_checkpoint_gives_none(tmp_path):
    assert checkpoint.load_newest(tmp_path) is None


@pytest.mark.parametrize("state", ["[1, 2]", "{not json", "[" * 100000])
def test_a_state_that_is_not_a_json_object_counts_as_damaged(tmp_path, state):
    """A checkpoint rewritten by hand with its checksum: the previous one is used, with a warning."""
    checkpoint.write_latest(tmp_path, packed(1))
    arrays = packed(2)
    arrays.pop("checksum")
    arrays["state"] = np.array(state)
    arrays["checksum"] = np.array(checkpoint._checksum(arrays))
    checkpoint.write_latest(tmp_path, arrays)
    with pytest.warns(UserWarning, match="not a JSON object"):
        assert checkpoint.unpack(checkpoint.load_newest(tmp_path))[3]["epoch"] == 1
