"""The numbers the paper (Cheng et al., BinW-SLT) prints, for ``binwslt reproduce`` to set beside measured ones.

Only numbers printed in the paper's text and tables are here; Fig. 2 and Fig. 3 are images whose curves the
paper does not list, so their points have no paper value except where a table gives the same setting (r_p = 0.4,
T = 4, λ = 0.99: Table 1 on CIFAR-10). Accuracies are in percent, OPs in G, energy in mJ per image.
"""
from __future__ import annotations

from typing import Optional

# Table 1 (CIFAR-10, r_p = 0.4, T = 4, λ = 0.99): test accuracy (%) per model and kind.
TABLE1_DATASET = "cifar10"
TABLE1 = {
    "conv4": {"ann": 84.60, "snn": 83.41, "bnn-binact": 79.21, "binwslt": 83.65},
    "vgg9": {"ann": 86.70, "snn": 85.30, "bnn-binact": 80.68, "binwslt": 85.35},
    "vgg11": {"ann": 88.10, "snn": 87.20, "bnn-binact": 83.84, "binwslt": 87.76},
    "resnet19": {"ann": 92.05, "snn": 91.78, "bnn-binact": 86.74, "binwslt": 91.82},
}
# The BinW-SLT - BNN-BinAct gaps the paper prints beside Table 1 (points): +5.61, +5.79, +4.68, +5.86.
TABLE1_GAP = {"conv4": 5.61, "vgg9": 5.79, "vgg11": 4.68, "resnet19": 5.86}

# Table 2 (CIFAR-100, r_p = 0.4, T = 4, λ = 0.99): OPs (G), power (mJ) and test accuracy (%).
TABLE2_DATASET = "cifar100"
TABLE2 = {
    "vgg11": {"ann": (0.209, 0.966, 68.64), "snn": (0.140, 0.131, 62.94),
              "bnn-binact": (0.209, 0.966, 58.57), "binwslt": (0.132, 0.127, 61.74)},
    "resnet19": {"ann": (2.223, 10.225, 86.74), "snn": (1.778, 1.609, 64.27),
                 "bnn-binact": (2.223, 10.225, 60.60), "binwslt": (1.689, 1.528, 63.73)},
}
TABLE2_GAP = {"vgg11": 3.17, "resnet19": 3.31}

# Fig. 3 (left) and the abstract: BinW-SLT's energy saving "up to" 1.86x against the dense SNN, 8.92x against the ANN.
ENERGY_SAVING_VS_SNN = 1.86
ENERGY_SAVING_VS_ANN = 8.92

PAPER_SETTING = {"prune_rate": 0.4, "timesteps": 4, "decay": 0.99}


def accuracy(model: str, kind: str, dataset: str, prune_rate: float = 0.4, timesteps: int = 4,
             decay: float = 0.99) -> Optional[float]:
    """The paper's test accuracy (%) for this setting, or None where the paper prints none.

    ``dataset`` "cifar10" reads Table 1, "cifar100" Table 2; only r_p 0.4 (binary kinds), T 4 and λ 0.99 (spiking
    kinds) have printed values.
    """
    binary = kind in ("bnn-binact", "binwslt")
    spiking = kind in ("snn", "binwslt")
    if binary and abs(prune_rate - 0.4) > 1e-9:
        return None
    if spiking and (timesteps != 4 or abs(decay - 0.99) > 1e-9):
        return None
    if dataset == TABLE1_DATASET:
        return TABLE1.get(model, {}).get(kind)
    if dataset == TABLE2_DATASET and model in TABLE2:
        return TABLE2[model][kind][2]
    return None
