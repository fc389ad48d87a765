"""The ``distributed`` options, validated in one place, and the helpers without a launcher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradsift import distributed as ddp
from gradsift.config import ConfigError, load_config
from gradsift.distributed import DistributedConfig


def test_the_section_is_settable_and_checked_naming_the_key():
    cfg = load_config(None, ["distributed.exchange=sketch", "distributed.sketch_dim=64",
                             "distributed.scope=local"])
    assert cfg.distributed == DistributedConfig(exchange="sketch", scope="local", sketch_dim=64)
    assert load_config(None).distributed == DistributedConfig("exact", "global", 256)
    for bad, key in [("distributed.exchange=zip", "distributed.exchange"),
                     ("distributed.sketch_dim=0", "distributed.sketch_dim"),
                     ("distributed.scope=world", "distributed.scope"),
                     ("distributed.exchang=exact", "distributed.exchange")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


def test_the_trainer_config_takes_the_same_keys():
    from gradsift.integrations.transformers import GradSiftConfig

    args = GradSiftConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[],
                          distributed='{"exchange": "sketch", "sketch_dim": 64}')
    assert args.distributed_config() == DistributedConfig(exchange="sketch", sketch_dim=64)
    with pytest.raises(ValueError, match="unknown distributed option"):
        GradSiftConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[],
                       distributed={"exchnge": "sketch"})


def test_without_a_launcher_the_helpers_do_nothing():
    assert (ddp.world_size(), ddp.rank(), ddp.is_main_process()) == (1, 0, True)
    assert not ddp.is_distributed() and not ddp.init_from_env()
    x = torch.arange(6.0).reshape(3, 2)
    assert ddp.all_gather_rows(x) is x
    ddp.all_reduce_sum_([x])
    assert torch.equal(x, torch.arange(6.0).reshape(3, 2))
    assert ddp.gather_objects("a") == ["a"] and ddp.broadcast_object(3) == 3
    assert ddp.rank_slice(10) == slice(0, 10)


def test_sharded_engines_are_refused_at_start():
    class FullyShardedDataParallel(nn.Module):  # what FSDP's wrapper is called
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

    with pytest.raises(NotImplementedError, match="FullyShardedDataParallel.*Use DDP"):
        ddp.check_supported(FullyShardedDataParallel())
    zero = nn.Linear(2, 2)
    zero.weight.ds_id = 0  # DeepSpeed ZeRO-3 marks its partitioned parameters
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        ddp.check_supported(zero)
    ddp.check_supported(nn.Linear(2, 2))  # a plain module passes
