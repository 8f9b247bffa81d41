"""Run under torchrun: count FSDP2's all-gathers in one forward + backward of a looped LoopMoE, and
print them beside `loopmoe.planning.comm`'s count."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

from loopmoe.distributed.env import init_distributed
from loopmoe.distributed.parallelize import apply_fsdp2, build_mesh
from loopmoe.model import LoopMoEForCausalLM
from loopmoe.planning.comm import plan_comm
from loopmoe.planning.hardware import PROFILES
from loopmoe.planning.layout import Layout
from loopmoe.presets import get_preset


def main() -> None:
    reshard = sys.argv[1] == "True"
    info = init_distributed()
    cfg = get_preset("debug", num_loops=3, num_core_layers=2, hidden_size=32, head_dim=8, moe_intermediate_size=32)
    torch.manual_seed(0)
    model = apply_fsdp2(LoopMoEForCausalLM(cfg), build_mesh(info.world_size, "cpu"), reshard_core_after_forward=reshard)
    calls = [0]
    gather = _fsdp_param_group.foreach_all_gather

    def counting(*args, **kwargs):
        calls[0] += 1
        return gather(*args, **kwargs)

    _fsdp_param_group.foreach_all_gather = counting  # what every FSDP2 unit's unshard calls
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    layout = Layout(devices=info.world_size, strategy="fsdp2", reshard_after_forward=reshard)
    predicted = plan_comm(cfg, layout, PROFILES["h100"]).collectives["all_gather"]
    if info.rank == 0:
        print(calls[0], predicted)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
