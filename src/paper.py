"""The paper's Table 1 in one command: every benchmark, both decoders, the released protocol.

    python -m src.paper ckpt=Efficient-Large-Model/Fast_dLLM_v2_7B ar_ckpt=Qwen/Qwen2.5-7B-Instruct
    python -m src.paper ckpt=<export> ar_ckpt=<AR export> threshold=0.9 hydra.run.dir=<dir>
    torchrun --nproc_per_node 8 -m src.paper ckpt=... ar_ckpt=... hydra.run.dir=<dir>

Writes one `src.eval` run per benchmark and decoder (`<row>/<decoder>/`), the lm-eval rows'
results, `paper.json`, and Table 1 (`table1.md`, `table1.json`: scores, the average,
tokens/s and tokens per forward per decoder, the paper's published row beside them) into the
run folder, and prints the table (`src.evaluation.paper`, `src.evaluation.table`). The same
command into the same folder resumes after its last finished run.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from src.evaluation.paper import run_paper


@hydra.main(version_base="1.3", config_path="../conf", config_name="paper")
def main(cfg: DictConfig) -> None:
    try:
        table = run_paper(cfg, HydraConfig.get().runtime.output_dir)
    except ValueError as err:  # ConfigError included: one line
        raise SystemExit(f"error: {err}") from None
    if table is not None:
        print(table.read_text(), end="")
        print(f"wrote {table} and {table.with_suffix('.json')}", flush=True)


if __name__ == "__main__":
    main()
