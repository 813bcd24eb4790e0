"""Bad checkpoints and mismatched models fail with a CheckpointError naming the path and the fix."""
import os

import pytest
import torch

from megatron_alcot.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from megatron_alcot.parallel.tensor_parallel.random import model_parallel_seed
from standin import StandIn, config_dict


@pytest.fixture
def ckpt(tmp_path):
    model_parallel_seed(1)
    model = StandIn()
    opt = torch.optim.AdamW(model.parameters())
    for it in (1, 2):
        save_checkpoint(str(tmp_path), it, model, opt, consumed_samples=it, config_dict=config_dict())
    return str(tmp_path)


def _fresh(**kw):
    model_parallel_seed(2)
    return StandIn(**kw)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; check --load"):
        load_checkpoint(str(tmp_path / "nope"), _fresh())


def test_nothing_saved_yet(tmp_path):
    with pytest.raises(CheckpointError, match="nothing was saved there yet"):
        load_checkpoint(str(tmp_path), _fresh())


def test_wrong_iteration_lists_available(ckpt):
    with pytest.raises(CheckpointError, match=r"iteration 5 .*available iterations .*\[1, 2\]"):
        load_checkpoint(ckpt, _fresh(), iteration=5)


def test_garbage_latest_pointer(ckpt):
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release\n")
    with pytest.raises(CheckpointError, match="not an iteration number.*available: \\[1, 2\\]"):
        load_checkpoint(ckpt, _fresh())


def test_missing_shard(ckpt):
    os.remove(os.path.join(ckpt, "iter_0000002", "model_tp00_pp000.pt"))
    with pytest.raises(CheckpointError, match="model_tp00_pp000.pt is missing"):
        load_checkpoint(ckpt, _fresh())


def test_truncated_shard(ckpt):
    path = os.path.join(ckpt, "iter_0000002", "optim_tp00_pp000_dp000.pt")
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(ckpt, _fresh(), torch.optim.AdamW(_fresh().parameters()))


def test_corrupt_shard_same_size(ckpt):
    path = os.path.join(ckpt, "iter_0000002", "model_tp00_pp000.pt")
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    with pytest.raises(CheckpointError, match="cannot read .*model_tp00_pp000.pt.*corrupt"):
        load_checkpoint(ckpt, _fresh())


def test_corrupt_metadata(ckpt):
    with open(os.path.join(ckpt, "iter_0000002", "metadata.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="metadata.json is corrupt"):
        load_checkpoint(ckpt, _fresh())


def test_shape_mismatch_names_tensors(ckpt):
    with pytest.raises(CheckpointError, match=r"(?s)other shapes.*linear_fc1.weight: checkpoint global "
                                              r"\[128, 32\], model global \[128, 48\]"):
        load_checkpoint(ckpt, _fresh(hidden=48))


def test_config_diff(ckpt):
    with pytest.raises(CheckpointError, match=r"hidden_size: checkpoint=32, current=48"):
        load_checkpoint(ckpt, _fresh(hidden=48), config_dict=config_dict(hidden=48))


def test_missing_and_unexpected_keys(ckpt):
    with pytest.raises(CheckpointError, match=r"missing in checkpoint \['decoder.layers.2"):
        load_checkpoint(ckpt, _fresh(num_layers=3))
    info = load_checkpoint(ckpt, _fresh(num_layers=3), strict=False)
    assert info["missing_keys"][0].startswith("decoder.layers.2.")
    with pytest.raises(CheckpointError, match=r"unexpected in checkpoint \['decoder.layers.1"):
        load_checkpoint(ckpt, _fresh(num_layers=1))


def test_no_optimizer_state_says_no_load_optim(tmp_path):
    model = _fresh()
    save_checkpoint(str(tmp_path), 1, model, consumed_samples=0, config_dict=config_dict())
    with pytest.raises(CheckpointError, match="--no-load-optim"):
        load_checkpoint(str(tmp_path), _fresh(), torch.optim.AdamW(model.parameters()))


def test_non_json_config_is_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(str(tmp_path), 1, _fresh(), consumed_samples=0,
                        config_dict={"model": {"x": object()}})
    assert not os.listdir(tmp_path)


class _Opaque:
    """An optimizer that is not a torch optimizer: stored via state_dict() as it is."""

    def __init__(self):
        self.counter = torch.tensor(0)

    def state_dict(self):
        return {"counter": self.counter.clone()}

    def load_state_dict(self, sd):
        self.counter = sd["counter"].clone()


def test_opaque_optimizer_round_trip(tmp_path):
    opt = _Opaque()
    opt.counter += 7
    save_checkpoint(str(tmp_path), 1, _fresh(), opt, consumed_samples=0, config_dict=config_dict())
    again = _Opaque()
    info = load_checkpoint(str(tmp_path), _fresh(), again)
    assert int(again.counter) == 7 and info["metadata"]["optimizer"]["kind"] == "opaque"
