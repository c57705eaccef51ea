import os
import pickle
import random

import numpy as np
import pytest
import torch

from anas.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from anas.errors import ConfigError


class _ShellPayload:
    """An object whose unpickling would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _sample_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.9))
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "counters": {"d_steps": 7, "g_steps": 1},
        "name": "hinge",
        "rng": capture_rng_state(),
    }


def test_round_trip_keeps_tensors(tmp_path):
    state = _sample_state()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["counters"] == {"d_steps": 7, "g_steps": 1}
    assert loaded["name"] == "hinge"
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.0, 0.9)
    assert torch.equal(
        loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
    )


def test_round_trip_restores_rng(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": capture_rng_state()})
    expected_torch = torch.rand(5)
    expected_python = [random.random() for _ in range(5)]
    expected_numpy = np.random.rand(5)

    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(5), expected_torch)
    assert [random.random() for _ in range(5)] == expected_python
    assert np.array_equal(np.random.rand(5), expected_numpy)


def test_python_gauss_cache_restored(tmp_path):
    random.seed(5)
    random.gauss(0.0, 1.0)  # leaves the second value of the pair cached
    path = tmp_path / "gauss.pt"
    save_checkpoint(path, {"rng": capture_rng_state()})
    expected = random.gauss(0.0, 1.0)
    random.seed(6)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert random.gauss(0.0, 1.0) == expected


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_save_creates_parent_folder(tmp_path):
    path = tmp_path / "trial" / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    assert load_checkpoint(path)["step"] == 1


def test_save_rejects_object(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(TypeError, match=r"state\['bad'\]"):
        save_checkpoint(path, {"bad": object()})
    assert not path.exists()


def test_save_rejects_numpy_scalar(tmp_path):
    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"loss": np.float64(1.0)})


def test_failed_save_keeps_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"step": 2, "bad": {1, 2}})
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.99])
def test_truncated_file_rejected(tmp_path, keep):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _sample_state())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConfigError, match="truncated or corrupt") as raised:
        load_checkpoint(path)
    assert str(path) in str(raised.value)


def test_garbage_file_rejected(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    with pytest.raises(ConfigError, match="corrupt"):
        load_checkpoint(path)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_malicious_checkpoint_not_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(2), "payload": _ShellPayload(marker)}, path)
    with pytest.raises(ConfigError, match="disallowed objects") as raised:
        load_checkpoint(path)
    assert str(path) in str(raised.value)
    assert not marker.exists()


def test_malicious_plain_pickle_not_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"payload": _ShellPayload(marker)}))
    with pytest.raises(ConfigError, match="disallowed objects"):
        load_checkpoint(path)
    assert not marker.exists()


def test_payload_runs_without_guard(tmp_path):
    """The payload is live: unrestricted unpickling does create the marker."""
    marker = tmp_path / "payload-ran"
    pickle.loads(pickle.dumps(_ShellPayload(marker)))
    assert marker.exists()


def test_non_dict_rejected(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ConfigError, match="expected a dict"):
        load_checkpoint(path)
