"""Save -> load restores model, optimizer, scheduler and every RNG bit for bit."""
import copy
import json
import os
import random

import numpy as np
import pytest
import torch

from megatron_alcot.checkpointing import (latest_iteration, list_iterations, load_checkpoint,
                                          save_checkpoint)
from megatron_alcot.parallel.tensor_parallel.random import get_rng_tracker, model_parallel_seed
from standin import StandIn, config_dict


def _setup(seed=1):
    model_parallel_seed(seed)
    model = StandIn()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 / (1 + it))
    return model, opt, sched


def _step(model, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (2, 8), generator=g)
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _draws():
    with get_rng_tracker().fork():
        tracked = torch.rand(3)
    return (random.random(), np.random.rand(), torch.rand(3), tracked)


def test_roundtrip_bitwise(tmp_path):
    model, opt, sched = _setup()
    for s in range(3):
        _step(model, opt, sched, s)
    path = save_checkpoint(str(tmp_path), 3, model, opt, sched, consumed_samples=6,
                           config_dict=config_dict(), data_config_hash="abc", extra={"note": 1})
    assert os.path.basename(path) == "iter_0000003"
    assert latest_iteration(str(tmp_path)) == 3 and list_iterations(str(tmp_path)) == [3]
    want_params = {k: v.clone() for k, v in model.state_dict().items()}
    want_opt = copy.deepcopy(opt.state_dict())
    want_sched = copy.deepcopy(sched.state_dict())
    want_draws = _draws()
    want_loss = _step(model, opt, sched, 99)

    model2, opt2, sched2 = _setup(seed=7)            # different weights and RNG
    _step(model2, opt2, sched2, 5)
    info = load_checkpoint(str(tmp_path), model2, opt2, sched2)
    assert info["iteration"] == 3 and info["consumed_samples"] == 6
    assert info["data_config_hash"] == "abc" and info["extra"] == {"note": 1}
    assert info["rng_restored"] and not info["resharded"]
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want_params[k]), k
    got_opt = opt2.state_dict()
    assert got_opt["param_groups"] == want_opt["param_groups"]
    for i, s in want_opt["state"].items():
        for key, t in s.items():
            assert torch.equal(got_opt["state"][i][key], t), (i, key)
    assert sched2.state_dict() == want_sched
    got_draws = _draws()
    assert got_draws[0] == want_draws[0] and got_draws[1] == want_draws[1]
    assert torch.equal(got_draws[2], want_draws[2]) and torch.equal(got_draws[3], want_draws[3])
    assert _step(model2, opt2, sched2, 99) == want_loss


def test_metadata_and_layout(tmp_path):
    model, opt, sched = _setup()
    _step(model, opt, sched, 0)
    save_checkpoint(str(tmp_path), 10, model, opt, sched, consumed_samples=20,
                    config_dict=config_dict())
    d = tmp_path / "iter_0000010"
    assert sorted(os.listdir(d)) == ["metadata.json", "model_tp00_pp000.pt",
                                     "optim_tp00_pp000_dp000.pt", "state_tp00_pp000_dp000.pt"]
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["topology"] == {"tp": 1, "pp": 1, "dp": 1, "world": 1}
    assert meta["vocab"] == {"true_size": 1000, "padded_size": 1056}
    fc1 = meta["tensors"]["decoder.layers.1.mlp.linear_fc1.weight"]
    assert fc1 == {"global_shape": [128, 32], "partition_dim": 0, "partition_stride": 2,
                   "dtype": "float32", "pp_rank": 0, "vocab": False}
    assert meta["tensors"]["decoder.layers.0.mlp.linear_fc2.weight"]["partition_dim"] == 1
    assert meta["tensors"]["decoder.final_layernorm.weight"]["partition_dim"] == -1
    assert meta["tensors"]["embedding.word_embeddings.weight"]["vocab"] is True
    assert meta["optimizer"] == {"kind": "per_parameter", "dp_sharded": False}
    assert meta["iteration"] == 10 and meta["consumed_samples"] == 20
    for name, size in meta["files"].items():
        assert (d / name).stat().st_size == size
    # Every file is plain tensors and containers: weights_only loading succeeds.
    for name in meta["files"]:
        torch.load(d / name, weights_only=True)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "10"


def test_weights_only_rejects_pickled_objects(tmp_path):
    from megatron_alcot.checkpointing import CheckpointError
    model, opt, sched = _setup()
    save_checkpoint(str(tmp_path), 1, model, consumed_samples=0, config_dict=config_dict())
    shard = tmp_path / "iter_0000001" / "model_tp00_pp000.pt"
    # Keep the recorded size consistent so the weights_only check (not the size check) fires.
    torch.save({"model": {}, "payload": _Evil()}, shard)
    meta_path = tmp_path / "iter_0000001" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["model_tp00_pp000.pt"] = shard.stat().st_size
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(str(tmp_path), model)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_weights_only_load_without_optimizer(tmp_path):
    model, opt, sched = _setup()
    _step(model, opt, sched, 0)
    save_checkpoint(str(tmp_path), 1, model, opt, sched, consumed_samples=2, config_dict=config_dict())
    model2, opt2, sched2 = _setup(seed=3)
    before = opt2.state_dict()
    info = load_checkpoint(str(tmp_path), model2, opt2, sched2, load_optim=False, load_rng=False)
    assert not info["rng_restored"]
    assert opt2.state_dict() == before
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
