"""Optimizers, parameter groups, decoupled weight decay, learning-rate schedules and gradient noise."""

from gradwise.optim.noise import GradientNoise
from gradwise.optim.optimizers import build_optimizer, list_optimizers
from gradwise.optim.schedules import LRSchedule
from gradwise.optim.weight_decay import apply_decoupled_weight_decay

__all__ = ["GradientNoise", "LRSchedule", "apply_decoupled_weight_decay", "build_optimizer", "list_optimizers"]
