"""``accelerator.save_state`` / ``load_state`` of an FSEP model on the GPUs (NCCL), launched by torchrun from
``tests/test_multi_gpu.py``: ``python -m torch.distributed.run --nproc-per-node 2 -m tests.fsep._nccl_resume DIR``.
Each rank prints its results as one ``@@RESULT@@`` JSON line."""

from __future__ import annotations

import json
import sys


def main() -> None:
    from accelerate import PartialState

    from tests.fsep._dist_fns import accelerate_resume

    state = PartialState()  # the process group from torchrun's environment (NCCL on GPUs)
    out = accelerate_resume(state.process_index, state.num_processes, sys.argv[1], cpu=False)
    keep = {k: v for k, v in out.items() if isinstance(v, (bool, int, float, str))}
    print("@@RESULT@@" + json.dumps({"rank": state.process_index, **keep}), flush=True)


if __name__ == "__main__":
    main()
