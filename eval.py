"""Compare pruning methods across budgets: accuracy, FLOPs, latency, memory — as a table and a plot.

    python eval.py                                               # every pruner and head, keep 11/22/33%
    python eval.py methods=[none,fastv,fastervlm] keep=[16,32]
    python eval.py data.eval_split=shift                         # the robustness split
    python eval.py hydra.run.dir=logs/eval/mygrid                # same dir again: resumes the grid
"""

import hydra
from omegaconf import DictConfig

from learned_prune.evaluate import main as run_eval


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_eval(cfg)


if __name__ == "__main__":
    main()
