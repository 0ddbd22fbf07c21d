"""dualnet: two-input, two-output networks on Fashion-MNIST. Plain PyTorch; never imports Ray."""

from .data import DataError, DualData, Split, load_data, make_data, pixel_overlap_fraction
from .models import ARCHS, DualNet, build_model, load_model, register, save_model
from .train import EpochReport, FitResult, TrainConfig, evaluate_split, fit

__all__ = ["ARCHS", "DataError", "DualData", "DualNet", "EpochReport", "FitResult", "Split", "TrainConfig",
           "build_model", "evaluate_split", "fit", "load_data", "load_model", "make_data",
           "pixel_overlap_fraction", "register", "save_model"]
