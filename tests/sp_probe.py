"""Test helper: `hrvit train` in this process, then every rank saves its full fp32 parameters.

    python tests/sp_probe.py OUT_DIR CONFIG [key=value ...]

Runs the real training (hrvit.engine.trainer.train) and keeps a handle on the DeepSpeed engine
it creates, so tests can compare parameters across runs and across the ranks of one run:
OUT_DIR/params_rank{R}.pt holds {name: tensor} (gathered from all ranks under ZeRO-3).
"""

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from hrvit.config import load_config
from hrvit.engine.trainer import train
from hrvit.parallel.dist import release_shm_buffers


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, config, overrides = Path(args[0]), args[1], args[2:]
    engines = []
    initialize = deepspeed.initialize

    def keep(*a, **k):
        result = initialize(*a, **k)
        engines.append(result[0])
        return result

    deepspeed.initialize = keep
    train(load_config(config, overrides))
    engine = engines[0]
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=engine.zero_optimization_stage() == 3):
        state = {name: p.detach().float().clone() for name, p in params}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / f"params_rank{dist.get_rank()}.pt")
    dist.barrier()
    release_shm_buffers()  # as `hrvit train` does
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
