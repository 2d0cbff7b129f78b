"""Preference tuning of a causal LM as a task of the one loop: DPO and IPO.

The policy's log-probability of a completion is the sum of its tokens' log-probabilities (the
prompt is not scored). With the reference model's log-probabilities ``ref`` of the same pair,
the implicit reward of a completion is ``β · (logp − ref)``, and

- DPO minimises ``−log σ(β · ((logp_c − ref_c) − (logp_r − ref_r)))`` (Rafailov et al. 2023);
- IPO minimises ``((logp_c − ref_c) − (logp_r − ref_r) − 1/(2β))²`` (Azar et al. 2023), which
  does not push the margin to infinity on pairs it already ranks right.

The reference model is the model as loaded, before any training. Its log-probabilities of every
pair are computed once, when the run is built (:meth:`PreferenceTask.prepare`, as distillation's
teacher outputs are), and kept as a small float64 table indexed by example: no second model sits
in memory while training. The loss is a sum over pairs divided by the step's number of pairs, so
accumulation gives exactly the large-batch gradient, and the state of a run is the loop's own, so
resume stays bit-exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradwise.data.batches import take
from gradwise.data.types import Dataset, Split
from gradwise.tasks.language_modeling import IGNORE_INDEX

REFERENCE_BATCH = 16


def sequence_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """Σ log p(target) over each row's scored tokens: logits ``(..., L, V)``, targets ``(..., L)`` → ``(...)`` fp32."""
    logits = logits.float()
    scored = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return (token_logps * scored).sum(dim=-1)


class PreferenceTask:
    """DPO or IPO on ``(chosen, rejected)`` pairs against reference log-probabilities.

    ``outputs`` are the model's logits for the pairs ``(B, 2, L, V)``; ``targets`` ``(B, 2, 1 + L)``
    hold each pair's example index (column 0) and its next-token targets.

    Args:
        beta: The temperature of the implicit reward (DPO's β; IPO's margin target is 1/(2β)).
        loss_type: ``dpo`` or ``ipo``.
        n_examples: Pairs in the whole data set (the size of the reference table).
    """

    kind = "preference"
    default_monitor = "val_loss"
    # The reference table travels in every checkpoint: a resumed run scores against the reference it
    # started with even if model.path has since been overwritten (gradwise eval recomputes it from model.path).
    state_key = "preference_reference"

    def __init__(self, beta: float, loss_type: str, n_examples: int) -> None:
        self.beta = beta
        self.loss_name = loss_type
        self.reference = torch.zeros(n_examples, 2, dtype=torch.float64)
        self.prepared = False

    def log_ratios(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``logp − ref`` of chosen and rejected, ``(B, 2)`` fp32."""
        logps = sequence_logps(outputs, targets[..., 1:])
        rows = targets[:, 0, 0].long().cpu()
        reference = self.reference[rows].to(device=logps.device, dtype=logps.dtype)
        return logps - reference

    def loss_sum(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Summed DPO/IPO loss over the batch's pairs."""
        ratios = self.log_ratios(outputs, targets)
        margin = ratios[:, 0] - ratios[:, 1]
        if self.loss_name == "ipo":
            return ((margin - 1.0 / (2.0 * self.beta)) ** 2).sum()
        return -F.logsigmoid(self.beta * margin).sum()

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss_sum(outputs, targets) / max(1, targets.shape[0])

    def count(self, targets: Tensor) -> int:
        """Pairs in ``targets``."""
        return int(targets.shape[0])

    def new_meter(self) -> PreferenceMeter:
        return PreferenceMeter(self)

    def state_dict(self) -> dict[str, Tensor]:
        return {"reference": self.reference.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        reference = state["reference"]
        if reference.shape != self.reference.shape:
            raise ValueError(
                f"reference log-probabilities of {tuple(reference.shape)} pairs, expected {tuple(self.reference.shape)}"
            )
        self.reference = reference.to(torch.float64).clone()

    @torch.no_grad()
    def prepare(self, model: nn.Module, data: Dataset, device: torch.device, autocast: object) -> None:
        """The reference log-probabilities of every pair of every split, from ``model`` as it is now (eval mode).

        ``autocast`` is a zero-argument callable returning the run's autocast context, so the reference
        is computed at the precision training runs at. Dropout is switched off in the policy too (as
        TRL does by default): with it, the policy's log-probabilities at step 0 would differ from the
        reference's by noise, and the implicit rewards would start from that noise.
        """
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        was_training = model.training
        model.eval()
        dtype = next(model.parameters()).dtype
        for split in (data.train, data.val, data.test):
            self._reference_of(model, split, device, dtype, autocast)
        model.train(was_training)
        self.prepared = True

    def _reference_of(
        self, model: nn.Module, split: Split, device: torch.device, dtype: torch.dtype, autocast: object
    ) -> None:
        from gradwise.data.batches import to_device

        for start in range(0, len(split), REFERENCE_BATCH):
            rows = torch.arange(start, min(start + REFERENCE_BATCH, len(split)))
            inputs, targets = to_device(take(split, rows), device, dtype)
            with autocast():  # type: ignore[operator]
                logits = model(inputs)
            logps = sequence_logps(logits, targets[..., 1:])
            self.reference[targets[:, 0, 0].long().cpu()] = logps.double().cpu()


class PreferenceMeter:
    """Sums ``[pairs, Σloss, Σ(chosen ranked above rejected), Σmargin, Σchosen reward, Σrejected reward]``.

    ``accuracy`` is the preference accuracy: the share of pairs whose implicit reward
    ``β·(logp − ref)`` is higher for the chosen completion, a tie counting half (the model as
    loaded ties every pair: 0.5); rewards are reported as β-scaled.
    """

    def __init__(self, task: PreferenceTask) -> None:
        self.task = task
        self._stats = torch.zeros(6, dtype=torch.float64)

    @torch.no_grad()
    def update(self, outputs: Tensor, targets: Tensor) -> None:
        ratios = self.task.log_ratios(outputs, targets).double()
        rewards = self.task.beta * ratios
        margin = rewards[:, 0] - rewards[:, 1]
        loss = self.task.loss_sum(outputs, targets).double()
        self._stats += torch.stack(
            [
                torch.tensor(float(len(margin)), dtype=torch.float64),
                loss.cpu(),
                ((margin > 0).double() + 0.5 * (margin == 0).double()).sum().cpu(),
                margin.sum().cpu(),
                rewards[:, 0].sum().cpu(),
                rewards[:, 1].sum().cpu(),
            ]
        )

    def stats(self) -> Tensor:
        return self._stats.clone()

    def load_stats(self, t: Tensor) -> None:
        if t.numel() != 6:
            raise ValueError(f"expected 6 preference statistics, got {t.numel()}")
        self._stats = t.detach().to("cpu", torch.float64).reshape(-1).clone()

    def confusion(self) -> list[list[int]] | None:
        return None

    def compute(self) -> dict[str, float]:
        n = float(self._stats[0])
        if n == 0:
            return {k: math.nan for k in ("loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward")}
        loss, correct, margin, chosen, rejected = (float(v) for v in self._stats[1:])
        return {
            "loss": loss / n,
            "accuracy": correct / n,
            "reward_margin": margin / n,
            "chosen_reward": chosen / n,
            "rejected_reward": rejected / n,
        }
